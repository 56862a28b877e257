//! The systems measured side by side: fio (the physical limit), storaged
//! over gRPC, through its FUSE mount, nginx over HTTP, and local files read
//! with pread.

pub mod fio;
pub mod local;
pub mod mount;
pub mod nginx;
pub mod storaged;
pub mod tcp;

/// One unit of work: an object (relative path) and its size.
#[derive(Debug, Clone)]
pub struct Item {
    pub path: String,
    pub size: u64,
}

/// Per-item latencies of a closed-loop pipeline with `depth` items in
/// flight, from completion times: item i entered the window when item
/// i - depth completed (or at the start).
pub fn pipeline_latencies_us(done_at_us: &[f64], depth: usize) -> Vec<f64> {
    done_at_us
        .iter()
        .enumerate()
        .map(|(i, &t)| {
            let entered = if i >= depth {
                done_at_us[i - depth]
            } else {
                0.0
            };
            t - entered
        })
        .collect()
}

/// Per-item latencies when items complete out of order but enter the
/// window in index order: the server starts item `i` (i >= depth) when the
/// (i - depth)-th completion frees a slot. `done_at_us` is in completion
/// order and `indices[k]` is the item of the k-th completion. Unlike
/// [`pipeline_latencies_us`], a slow item is charged its whole time in
/// flight, not only the gap to the completion before it.
pub fn slot_latencies_us(done_at_us: &[f64], indices: &[u32], depth: usize) -> Vec<f64> {
    done_at_us
        .iter()
        .zip(indices)
        .map(|(&t, &i)| {
            let i = i as usize;
            let entered = if i >= depth {
                done_at_us.get(i - depth).copied().unwrap_or(0.0)
            } else {
                0.0
            };
            t - entered
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_latency_model_charges_slow_items_in_full() {
        // Depth 2: item 0 is slow (done at 30); item 1 done at 10 frees the
        // slot for item 2 (done at 20), whose completion frees item 3's.
        let done = [10.0, 20.0, 30.0, 35.0];
        let indices = [1, 2, 0, 3];
        assert_eq!(
            slot_latencies_us(&done, &indices, 2),
            vec![10.0, 10.0, 30.0, 15.0]
        );
        // The completion-order model would have charged item 0 only 20.
        assert_eq!(pipeline_latencies_us(&done, 2)[2], 20.0);
    }

    #[test]
    fn pipeline_latency_model() {
        // Depth 2, each item takes 10 us, two at a time.
        let done = [10.0, 10.0, 20.0, 20.0];
        assert_eq!(
            pipeline_latencies_us(&done, 2),
            vec![10.0, 10.0, 10.0, 10.0]
        );
        assert_eq!(pipeline_latencies_us(&[5.0, 7.0], 1), vec![5.0, 2.0]);
    }
}
