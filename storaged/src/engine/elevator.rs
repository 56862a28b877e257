//! The per-device backlog of the io_uring engine: operations waiting for room in
//! their device's queue depth, served in C-SCAN order.
//!
//! Whatever the store submits (reads of many requests, read-ahead, ingest
//! writes) that does not fit in the device's queue depth waits here, and
//! leaves in ascending device offset from where the device last went,
//! wrapping to the lowest offset at the end (C-SCAN). So the device's queue
//! is refilled with the backlog's nearest next work rather than its
//! oldest, which keeps each device's reads one sweep across the disk, and
//! every operation leaves within one sweep of arriving (no starvation:
//! work behind the cursor waits at most until the sweep wraps). Ties at one
//! offset leave in arrival order.

use std::collections::BTreeMap;

/// See the module docs. Tokens are the engine's operation ids.
#[derive(Debug, Default)]
pub struct Elevator {
    waiting: BTreeMap<(u64, u64), u64>,
    cursor: u64,
    arrivals: u64,
}

impl Elevator {
    pub fn push(&mut self, offset: u64, token: u64) {
        self.waiting.insert((offset, self.arrivals), token);
        self.arrivals += 1;
    }

    /// The operation that leaves next, without taking it.
    pub fn peek(&self) -> Option<u64> {
        self.next_key().map(|k| self.waiting[&k])
    }

    /// Takes the operation [`peek`](Self::peek) returned.
    pub fn pop(&mut self) -> Option<u64> {
        let key = self.next_key()?;
        self.cursor = key.0;
        self.waiting.remove(&key)
    }

    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    fn next_key(&self) -> Option<(u64, u64)> {
        self.waiting
            .range((self.cursor, 0)..)
            .next()
            .or_else(|| self.waiting.iter().next())
            .map(|(k, _)| *k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sweeps_up_then_wraps() {
        let mut e = Elevator::default();
        for (off, tok) in [(50, 1), (10, 2), (70, 3), (30, 4)] {
            e.push(off, tok);
        }
        assert_eq!(e.pop(), Some(2)); // offset 10 first: the cursor starts at 0
        e.push(20, 5); // ahead of the cursor (10): this sweep
        e.push(5, 6); // behind it: after the wrap
        let order: Vec<u64> = std::iter::from_fn(|| e.pop()).collect();
        assert_eq!(order, vec![5, 4, 1, 3, 6]);
        assert!(e.is_empty());
    }

    #[test]
    fn same_offset_keeps_arrival_order() {
        let mut e = Elevator::default();
        e.push(8, 1);
        e.push(8, 2);
        e.push(8, 3);
        assert_eq!(e.peek(), Some(1));
        let order: Vec<u64> = std::iter::from_fn(|| e.pop()).collect();
        assert_eq!(order, vec![1, 2, 3]);
    }

    proptest! {
        // Every operation leaves exactly once; with no arrivals in between,
        // the pops are one C-SCAN sweep: ascending from the cursor, then
        // ascending from the lowest offset; peek always names what pop
        // takes.
        #[test]
        fn every_operation_leaves_once_in_sweep_order(
            offsets in prop::collection::vec(0u64..1000, 0..200),
            first_pops in 0usize..50,
        ) {
            let mut e = Elevator::default();
            for (t, &o) in offsets.iter().enumerate() {
                e.push(o, t as u64);
            }
            let mut out = Vec::new();
            for _ in 0..first_pops.min(offsets.len()) {
                let peeked = e.peek();
                let t = e.pop();
                prop_assert_eq!(peeked, t);
                out.push(t.unwrap());
            }
            let cursor = out.last().map(|&t| offsets[t as usize]).unwrap_or(0);
            let mut rest = Vec::new();
            while let Some(t) = e.pop() {
                rest.push(t);
            }
            prop_assert_eq!(e.len(), 0);
            // The rest is: offsets >= cursor ascending, then the others.
            let key = |t: &u64| {
                let o = offsets[*t as usize];
                (o < cursor, o, *t)
            };
            let mut expected = rest.clone();
            expected.sort_by_key(key);
            prop_assert_eq!(&rest, &expected);
            out.extend(rest);
            let mut all = out.clone();
            all.sort_unstable();
            prop_assert_eq!(all, (0..offsets.len() as u64).collect::<Vec<_>>());
        }
    }
}
