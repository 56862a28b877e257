//! An ordered pipeline with a bounded reorder buffer.
//!
//! `futures::StreamExt::buffered(n)` counts completed-but-unsent results
//! against its `n`: while one slow read sits at the head, finished reads
//! behind it stop new ones from starting and the device queue drains. This
//! pipeline keeps up to `in_flight_max` tasks *running* and, separately, up
//! to `reorder_bytes_max` bytes of finished results waiting for the head,
//! then emits results strictly in task order.
//!
//! Tasks start in order, and the store's tasks take their buffers as their
//! first step from a FIFO semaphore, so a later task never holds buffers the
//! head is waiting for: the head always makes progress.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::stream::{FuturesUnordered, Stream, StreamExt};

type Tagged<T> = Pin<Box<dyn Future<Output = (u64, T)> + Send>>;

/// See the module docs.
pub struct OrderedPipeline<I, T>
where
    I: Iterator,
{
    tasks: std::iter::Fuse<I>,
    running: FuturesUnordered<Tagged<T>>,
    done: BTreeMap<u64, T>,
    done_bytes: u64,
    next_launch: u64,
    next_emit: u64,
    in_flight_max: usize,
    reorder_bytes_max: u64,
    weigh: fn(&T) -> u64,
}

impl<I, F, T> OrderedPipeline<I, T>
where
    I: Iterator<Item = F>,
    F: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    pub fn new(
        tasks: I,
        in_flight_max: usize,
        reorder_bytes_max: u64,
        weigh: fn(&T) -> u64,
    ) -> Self {
        Self {
            tasks: tasks.fuse(),
            running: FuturesUnordered::new(),
            done: BTreeMap::new(),
            done_bytes: 0,
            next_launch: 0,
            next_emit: 0,
            in_flight_max: in_flight_max.max(1),
            reorder_bytes_max,
            weigh,
        }
    }

    fn launch(&mut self) {
        while self.running.len() < self.in_flight_max
            && (self.done_bytes < self.reorder_bytes_max || self.done.is_empty())
        {
            let Some(fut) = self.tasks.next() else { break };
            let seq = self.next_launch;
            self.next_launch += 1;
            self.running.push(Box::pin(async move { (seq, fut.await) }));
        }
    }
}

impl<I, F, T> Stream for OrderedPipeline<I, T>
where
    I: Iterator<Item = F> + Unpin,
    F: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    type Item = T;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let this = &mut *self;
        loop {
            let head = this.next_emit;
            if let Some(v) = this.done.remove(&head) {
                this.next_emit += 1;
                this.done_bytes -= (this.weigh)(&v);
                return Poll::Ready(Some(v));
            }
            this.launch();
            match this.running.poll_next_unpin(cx) {
                Poll::Ready(Some((seq, v))) => {
                    this.done_bytes += (this.weigh)(&v);
                    this.done.insert(seq, v);
                }
                Poll::Ready(None) => {
                    debug_assert!(this.done.is_empty(), "the head is always running or done");
                    return Poll::Ready(None);
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    // Results come out in task order whatever order they finish in, and a
    // slow head does not stop later tasks from running. (Paused time: the
    // sleeps are exact and cost nothing.)
    #[tokio::test(start_paused = true)]
    async fn ordered_output_and_no_head_of_line_stall() {
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let tasks = (0..20u64).map(|i| {
            let (running, peak) = (Arc::clone(&running), Arc::clone(&peak));
            async move {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                // Task 0 is slow; the rest are quick.
                let ms = if i == 0 { 60 } else { 1 + (7 * i) % 5 };
                tokio::time::sleep(Duration::from_millis(ms)).await;
                running.fetch_sub(1, Ordering::SeqCst);
                i
            }
        });
        let out: Vec<u64> = OrderedPipeline::new(tasks, 4, 1 << 20, |_| 1)
            .collect()
            .await;
        assert_eq!(out, (0..20).collect::<Vec<_>>());
        assert_eq!(peak.load(Ordering::SeqCst), 4, "four ran at once");
    }

    // The reorder buffer is bounded: with a 3-unit cap, at most 3 finished
    // results wait behind a slow head.
    #[tokio::test(start_paused = true)]
    async fn reorder_buffer_is_bounded() {
        let started = Arc::new(AtomicUsize::new(0));
        let s2 = Arc::clone(&started);
        let tasks = (0..50u64).map(move |i| {
            let started = Arc::clone(&s2);
            async move {
                started.fetch_add(1, Ordering::SeqCst);
                if i == 0 {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                i
            }
        });
        let mut p = OrderedPipeline::new(tasks, 2, 3, |_| 1);
        let first = p.next().await;
        assert_eq!(first, Some(0));
        // Head (1) + up to 3 finished + 1 running when the cap was hit.
        assert!(
            started.load(Ordering::SeqCst) <= 6,
            "started {}",
            started.load(Ordering::SeqCst)
        );
        let rest: Vec<u64> = p.collect().await;
        assert_eq!(rest, (1..50).collect::<Vec<_>>());
    }
}
