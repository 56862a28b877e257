//! Driving a response stream ahead of its consumer, and ending it when
//! the consumer stalls.
//!
//! The HTTP/2 sender polls a response body only when the client's
//! flow-control window has room, so the device reads behind a stream are
//! kept going on a task of their own ([`drive_ahead`]), which parks
//! finished messages (pool buffers) in a small queue. A client that opens
//! streams and never reads them would hold those buffers, and the reads
//! in flight behind them, for as long as it likes, starving everyone
//! else. The body is polled whenever HTTP/2 can send, so a consumer that
//! is neither waiting for a message nor has taken one for
//! `stall_timeout` belongs to a client that stopped reading (its window is
//! shut). Then the task drops the queued messages and the
//! producing stream (returning every buffer it held, and those the reads
//! behind it were waiting for), and the body's next poll ends the call
//! with the error `stalled()` makes. At most one message, already handed
//! to the HTTP/2 layer, stays held until the connection goes.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{Stream, StreamExt};

struct Queue<T> {
    items: VecDeque<T>,
    /// The producer finished: after the queue drains, the stream ends.
    done: bool,
    /// The consumer stalled: the next poll yields the stall error.
    stalled: bool,
    /// The consumer (the response body) was dropped.
    consumer_gone: bool,
    /// The consumer is waiting for an item (HTTP/2 could send one).
    consumer_waiting: bool,
    /// When the consumer last took an item or began to wait.
    progress_at: std::time::Instant,
}

struct Shared<T> {
    queue: Mutex<Queue<T>>,
    /// Something for the consumer (an item, the end, the stall).
    to_consumer: tokio::sync::Notify,
    /// Room in the queue, or the consumer went away.
    to_producer: tokio::sync::Notify,
    /// The consumer went away (kept apart from `to_producer`, so taking an
    /// item does not wake a producer busy reading the next one).
    consumer_dropped: tokio::sync::Notify,
}

impl<T> Shared<T> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue<T>> {
        self.queue.lock().expect("ahead queue poisoned")
    }
}

/// Marks the consumer gone when the response body is dropped.
struct ConsumerGuard<T>(Arc<Shared<T>>);

impl<T> Drop for ConsumerGuard<T> {
    fn drop(&mut self) {
        self.0.lock().consumer_gone = true;
        self.0.to_producer.notify_one();
        self.0.consumer_dropped.notify_one();
    }
}

/// Polls `stream` on its own task, at most `depth` finished items ahead of
/// the consumer. If the consumer takes nothing for `stall_timeout` while
/// the queue is full, the queue and `stream` are dropped, `on_stall` runs
/// (at once, on the task: the consumer may never be polled again), and
/// the consumer gets `stalled()` then the end. Dropping the returned
/// stream (the client went away) stops the task, which drops `stream` and
/// its reads.
pub fn drive_ahead<T: Send + 'static>(
    stream: impl Stream<Item = T> + Send + 'static,
    depth: usize,
    stall_timeout: Duration,
    on_stall: impl FnOnce() + Send + 'static,
    stalled: impl FnOnce() -> T + Send + 'static,
) -> impl Stream<Item = T> + Send + 'static {
    let depth = depth.max(1);
    let shared = Arc::new(Shared {
        queue: Mutex::new(Queue {
            items: VecDeque::with_capacity(depth.min(64)),
            done: false,
            stalled: false,
            consumer_gone: false,
            consumer_waiting: false,
            progress_at: std::time::Instant::now(),
        }),
        to_consumer: tokio::sync::Notify::new(),
        to_producer: tokio::sync::Notify::new(),
        consumer_dropped: tokio::sync::Notify::new(),
    });
    let producer = Arc::clone(&shared);
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        let mut tick = tokio::time::interval((stall_timeout / 4).max(Duration::from_millis(10)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pending: Option<T> = None;
        loop {
            // Wait for the next item, or for room for the one in hand; a
            // tick checks for a stall either way (a stream whose reads
            // wait for buffers other stalled streams hold is stalled too).
            if pending.is_none() {
                tokio::select! {
                    item = stream.next() => match item {
                        Some(item) => pending = Some(item),
                        None => {
                            producer.lock().done = true;
                            producer.to_consumer.notify_one();
                            return;
                        }
                    },
                    () = gone(&producer) => return,
                    _ = tick.tick() => {}
                }
            } else {
                tokio::select! {
                    () = producer.to_producer.notified() => {}
                    _ = tick.tick() => {}
                }
            }
            let mut q = producer.lock();
            if q.consumer_gone {
                return;
            }
            if pending.is_some() && q.items.len() < depth {
                q.items.push_back(pending.take().expect("checked"));
                drop(q);
                producer.to_consumer.notify_one();
                continue;
            }
            if !q.consumer_waiting && q.progress_at.elapsed() >= stall_timeout {
                q.stalled = true;
                let dropped = std::mem::take(&mut q.items);
                drop(q);
                tracing::warn!(
                    messages = dropped.len(),
                    stall_timeout_s = stall_timeout.as_secs_f64(),
                    "a client read nothing of a stream; ending it and returning its buffers"
                );
                drop(dropped);
                drop(pending);
                on_stall();
                producer.to_consumer.notify_one();
                // Returning drops `stream` and the reads behind it.
                return;
            }
        }
    });
    let guard = ConsumerGuard(shared);
    futures::stream::unfold((guard, Some(stalled)), |(guard, mut stalled)| async move {
        let shared = Arc::clone(&guard.0);
        loop {
            let notified = shared.to_consumer.notified();
            {
                let mut q = shared.lock();
                if let Some(item) = q.items.pop_front() {
                    q.progress_at = std::time::Instant::now();
                    q.consumer_waiting = false;
                    drop(q);
                    shared.to_producer.notify_one();
                    return Some((item, (guard, stalled)));
                }
                if q.stalled {
                    let error = stalled.take()?;
                    drop(q);
                    return Some((error(), (guard, None)));
                }
                if q.done {
                    return None;
                }
                q.consumer_waiting = true;
                q.progress_at = std::time::Instant::now();
            }
            notified.await;
        }
    })
}

/// Resolves when the consumer is gone.
async fn gone<T>(shared: &Shared<T>) {
    loop {
        let notified = shared.consumer_dropped.notified();
        if shared.lock().consumer_gone {
            return;
        }
        notified.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stalled_consumer_gets_an_error_and_the_items_are_dropped() {
        // Guards against a client that never reads holding pool buffers:
        // queued items are dropped after the stall timeout.
        let live = Arc::new(());
        let items = {
            let live = Arc::clone(&live);
            futures::stream::iter(0..1000).map(move |i| (i, Arc::clone(&live)))
        };
        let told = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let on_stall = {
            let told = Arc::clone(&told);
            move || told.store(true, std::sync::atomic::Ordering::SeqCst)
        };
        let s = drive_ahead(
            items.map(Ok::<_, &'static str>),
            4,
            Duration::from_millis(200),
            on_stall,
            || Err("stalled"),
        );
        let mut s = std::pin::pin!(s);
        assert_eq!(s.next().await.unwrap().unwrap().0, 0);
        // Stall: everything the task held is dropped, and `on_stall` runs
        // without the consumer being polled.
        let waited = std::time::Instant::now();
        while Arc::strong_count(&live) > 1 || !told.load(std::sync::atomic::Ordering::SeqCst) {
            assert!(
                waited.elapsed() < Duration::from_secs(10),
                "items were not dropped"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(s.next().await.unwrap().unwrap_err(), "stalled");
        assert!(s.next().await.is_none());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reading_consumer_gets_everything_in_order() {
        let s = drive_ahead(
            futures::stream::iter(0..500),
            3,
            Duration::from_secs(5),
            || {},
            || -1,
        );
        let got: Vec<i32> = s.collect().await;
        assert_eq!(got, (0..500).collect::<Vec<_>>());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropping_the_consumer_stops_the_producer() {
        let live = Arc::new(());
        let items = {
            let live = Arc::clone(&live);
            futures::stream::iter(0..).map(move |i: u64| (i, Arc::clone(&live)))
        };
        let s = drive_ahead(
            items,
            2,
            Duration::from_secs(60),
            || {},
            || (0, Arc::new(())),
        );
        drop(s);
        let waited = std::time::Instant::now();
        while Arc::strong_count(&live) > 1 {
            assert!(
                waited.elapsed() < Duration::from_secs(10),
                "the producer kept running"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
