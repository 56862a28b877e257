//! The read window: the unit every read path reads, verifies and hands
//! out, and the one policy that cuts an object range into windows.
//!
//! A window starts on a checksum block of its object and ends on one (or
//! at the object's end), so every byte of it can be verified; the part the
//! caller asked for may be smaller. Read, ReadBatch (ordered and any
//! order), scrub and ReadInto's fallback all take their windows from
//! [`WindowPolicy`], so a change of window size or alignment is made once.

use crate::alloc::BLOCK_BYTES;

use super::ObjectRef;

/// Object bytes `[start, end)` read and verified together, of which
/// `[want_start, want_end)` are handed out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ReadWindow {
    pub start: u64,
    pub end: u64,
    pub want_start: u64,
    pub want_end: u64,
}

impl ReadWindow {
    /// A window all of whose bytes are wanted.
    pub fn whole(start: u64, end: u64) -> Self {
        Self {
            start,
            end,
            want_start: start,
            want_end: end,
        }
    }

    /// Object bytes the window verifies.
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    /// Bytes read from the devices: the window rounded up to whole
    /// O_DIRECT blocks.
    pub fn device_len(&self) -> u64 {
        self.len().next_multiple_of(BLOCK_BYTES)
    }

    /// The wanted bytes that lie in this window.
    pub fn wanted(&self) -> (u64, u64) {
        (self.start.max(self.want_start), self.end.min(self.want_end))
    }
}

/// How one object's ranges become windows: aligned to its checksum blocks,
/// at most `window_bytes_max` each, cut at its end.
#[derive(Clone, Copy, Debug)]
pub(crate) struct WindowPolicy {
    block_bytes: u64,
    object_bytes: u64,
    window_bytes_max: u64,
}

impl WindowPolicy {
    pub fn new(obj: &ObjectRef, window_bytes_max: u64) -> Self {
        Self {
            block_bytes: u64::from(obj.dataset.record.checksum_block_bytes).max(1),
            object_bytes: obj.record.size,
            window_bytes_max: window_bytes_max.max(1),
        }
    }

    /// Windows covering object bytes `[start, start + len)`, in order, each
    /// wanting its part of that range.
    pub fn windows(self, start: u64, len: u64) -> impl Iterator<Item = ReadWindow> + use<> {
        let end = start + len;
        let last = end
            .next_multiple_of(self.block_bytes)
            .min(self.object_bytes);
        let mut at = start / self.block_bytes * self.block_bytes;
        std::iter::from_fn(move || {
            if at >= end {
                return None;
            }
            let w_end = (at + self.window_bytes_max).min(last);
            let w = ReadWindow {
                start: at,
                end: w_end,
                want_start: start,
                want_end: end,
            };
            at = w_end;
            Some(w)
        })
    }

    /// The one window, of any size, that covers `[start, start + len)`:
    /// whole checksum blocks, cut at the object's end (what `ReadInto`
    /// verifies in place; see `storaged_proto::model::read_into_span`).
    pub fn covering(self, start: u64, len: u64) -> ReadWindow {
        let block_start = start / self.block_bytes * self.block_bytes;
        let block_end = (start + len)
            .next_multiple_of(self.block_bytes)
            .min(self.object_bytes)
            .max(block_start);
        ReadWindow {
            start: block_start,
            end: block_end,
            want_start: start,
            want_end: start + len,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use storaged_proto::model::read_into_span;

    fn policy(block: u64, size: u64, max: u64) -> WindowPolicy {
        WindowPolicy {
            block_bytes: block,
            object_bytes: size,
            window_bytes_max: max,
        }
    }

    #[test]
    fn windows_cover_the_range_on_block_boundaries() {
        let p = policy(32 << 10, 10 << 20, 1 << 20);
        let (start, len) = (100_000, 3 << 20);
        let ws: Vec<ReadWindow> = p.windows(start, len).collect();
        assert_eq!(ws[0].start, 98_304);
        for pair in ws.windows(2) {
            assert_eq!(pair[0].end, pair[1].start);
        }
        assert!(
            ws.iter()
                .all(|w| w.len() <= 1 << 20 && w.start % (32 << 10) == 0)
        );
        assert!(ws.last().unwrap().end >= start + len);
        let wanted: u64 = ws.iter().map(|w| w.wanted().1 - w.wanted().0).sum();
        assert_eq!(wanted, len);
    }

    #[test]
    fn windows_stop_at_the_object_end() {
        let p = policy(32 << 10, 70_000, 1 << 20);
        let ws: Vec<ReadWindow> = p.windows(0, 70_000).collect();
        assert_eq!(ws, vec![ReadWindow::whole(0, 70_000)]);
        assert_eq!(ws[0].device_len(), 73_728);
        assert_eq!(p.windows(0, 0).count(), 0);
    }

    #[test]
    fn covering_matches_the_read_into_contract() {
        let k32 = 32 << 10;
        for (start, len, size) in [
            (0, 5, 5),
            (40_000, 100, 1 << 20),
            (k32 - 1, 2, 1 << 20),
            (70_000, 1000, 71_000),
            (3 << 20, 5 << 20, 9 << 20),
        ] {
            let w = policy(k32, size, 1 << 20).covering(start, len);
            let (span, lead) = read_into_span(start, len, size, k32);
            assert_eq!(w.start, start - lead);
            assert_eq!(w.device_len(), span, "start {start} len {len}");
            assert_eq!(w.wanted(), (start, start + len));
        }
    }
}
