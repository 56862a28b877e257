//! The systems measured side by side: fio (the physical limit), storaged
//! over gRPC, nginx over HTTP, and local files read with pread.

pub mod fio;
pub mod local;
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

#[cfg(test)]
mod tests {
    use super::*;

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
