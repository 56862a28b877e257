//! Exact reads served on the kernel's own thread, when storaged is on
//! this host.
//!
//! A read the read-ahead windows do not cover (a sample file, a random
//! `pread`) used to hop to the runtime: the FUSE thread handed it to a
//! task, the task to the batch dispatcher, the dispatcher to a request
//! task, whose socket's reply woke the runtime again, which answered the
//! kernel. Each hop is a thread wakeup, and on a small VM a wakeup of an
//! idle CPU costs more than the read's own work (BENCHMARKS.md, "The
//! mount, fifth pass": 15 context switches and 383 us of CPU per sample
//! file). Here the FUSE thread itself writes the request on a bulk channel
//! connection of its own and blocks on the reply (storaged fills and
//! verifies the thread's own region), then answers the kernel straight
//! from the region: two wakeups, no copy.
//!
//! Readers (each a 2 MiB region and a bulk channel connection) wait in a
//! pool between reads: a thread takes one, reads, and puts it back, and
//! one idle for `READER_IDLE_MAX` is closed (its region deregistered), so
//! an idle mount holds none of its user's region slots. Anything this
//! path cannot settle (no bulk channel, storaged restarting, a region
//! storaged forgot, a read too large for the region) goes back to the
//! caller, which reads it on the runtime with retries within the budget;
//! a reader that failed is dropped.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use storaged_client::retry::is_transient_status;
use storaged_client::{BlockingReader, Client, ClientError, Dataset, RegionRead};

use super::namespace::within;
use super::reader::{Answer, ReadFailure};

/// Region of each thread's reader: the kernel's largest read (1 MiB)
/// widened to whole checksum blocks fits, in one huge page's worth.
const REGION_BYTES: u64 = 2 << 20;

/// How long a reader may wait in the pool before it is closed.
const READER_IDLE_MAX: Duration = Duration::from_secs(2);

/// Idle readers, each with when it was put back.
type Idle = Mutex<Vec<(BlockingReader, Instant)>>;

/// How a direct read ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Direct {
    /// The kernel's read was answered (with bytes or an error).
    Answered,
    /// Not settled here: read it on the runtime instead.
    Declined,
}

/// The mount's direct reads: its idle readers, how to make more, and how
/// many threads may be blocked in one at once.
pub struct DirectReads {
    client: Client,
    runtime: tokio::runtime::Handle,
    /// How long one call may wait for storaged.
    timeout: Duration,
    /// Direct reads at once: fewer than the mount's threads, so that one
    /// is always free to take the kernel's next request, and reads beyond
    /// go to the runtime, where many wait at once (and leave in batches).
    in_flight_max: usize,
    in_flight: AtomicUsize,
    idle: Arc<Idle>,
}

impl DirectReads {
    /// Direct reads for a mount with `threads` FUSE threads; a task on
    /// `runtime` closes readers idle too long, and ends with this.
    pub fn new(
        client: Client,
        runtime: tokio::runtime::Handle,
        timeout: Duration,
        threads: usize,
    ) -> Self {
        let idle = Arc::new(Idle::default());
        let weak = Arc::downgrade(&idle);
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(READER_IDLE_MAX / 2).await;
                let Some(idle) = weak.upgrade() else { return };
                let stale = {
                    let mut idle = idle.lock().expect("direct readers poisoned");
                    let now = Instant::now();
                    let (stale, fresh) = std::mem::take(&mut *idle)
                        .into_iter()
                        .partition(|(_, at)| now.duration_since(*at) >= READER_IDLE_MAX);
                    *idle = fresh;
                    stale
                };
                // Closed (and their regions deregistered) outside the lock.
                drop::<Vec<_>>(stale);
            }
        });
        Self {
            client,
            runtime,
            timeout,
            in_flight_max: threads.saturating_sub(1).max(1),
            in_flight: AtomicUsize::new(0),
            idle,
        }
    }

    /// Reads `read` of `dataset` on this thread and hands its bytes (or
    /// its own error) to `answer`; `Declined` without calling `answer`
    /// when the read must go the other way.
    pub fn read(&self, dataset: &Dataset, read: &RegionRead, answer: &mut Answer<'_>) -> Direct {
        let Some(_slot) = InFlight::take(&self.in_flight, self.in_flight_max) else {
            return Direct::Declined;
        };
        let pooled = self.idle.lock().expect("direct readers poisoned").pop();
        let mut reader = match pooled {
            Some((reader, _)) => reader,
            None => match self.make_reader() {
                Ok(reader) => reader,
                Err(e) => return self.failed(e, answer),
            },
        };
        if reader.region().span(read) > reader.region().len() as u64 {
            self.put_back(reader);
            return Direct::Declined;
        }
        // The region's registration (a gRPC stream) is polled in
        // `read_into`, and may be dropped here: inside the runtime's
        // context.
        let _context = self.runtime.enter();
        let batch = match reader.read_into(dataset, std::slice::from_ref(read)) {
            Ok(batch) => batch,
            // The reader is spent: dropped.
            Err(e) => return self.failed(e, answer),
        };
        let direct = match batch.get(0) {
            Ok(bytes) => {
                answer(Ok(bytes));
                Direct::Answered
            }
            Err(status) if is_transient_status(status) => Direct::Declined,
            Err(status) => {
                answer(Err(ReadFailure::from_client_code(
                    Some(status.code()),
                    status.message().to_string(),
                )));
                Direct::Answered
            }
        };
        drop(batch);
        self.put_back(reader);
        direct
    }

    /// A new reader; the region's registration is a gRPC call, made on
    /// the runtime within the budget.
    fn make_reader(&self) -> Result<BlockingReader, ClientError> {
        let make = self.client.blocking_reader(REGION_BYTES, self.timeout);
        self.runtime.block_on(within(self.timeout, make))
    }

    fn put_back(&self, reader: BlockingReader) {
        let mut idle = self.idle.lock().expect("direct readers poisoned");
        idle.push((reader, Instant::now()));
    }

    /// After the call as a whole failed with `e`: a timeout has waited the
    /// whole budget already and fails the read (EIO); anything else (no
    /// bulk channel, storaged restarting, a region it forgot) is left to
    /// the runtime's retries.
    fn failed(&self, e: ClientError, answer: &mut Answer<'_>) -> Direct {
        if e.code() == Some(tonic::Code::DeadlineExceeded) {
            answer(Err(ReadFailure::Failed(e.to_string())));
            return Direct::Answered;
        }
        tracing::debug!(error = %e, "direct read not served; reading on the runtime");
        Direct::Declined
    }
}

/// One of the direct reads at once, given back on drop.
struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    fn take(count: &'a AtomicUsize, max: usize) -> Option<Self> {
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        Some(Self(count))
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_reads_at_once_stay_below_the_cap_and_slots_come_back() {
        // Guards the free FUSE thread: with every slot taken, the next read
        // is declined (it goes to the runtime) rather than blocking the
        // last thread that takes the kernel's requests.
        let count = AtomicUsize::new(0);
        let a = InFlight::take(&count, 2).expect("first");
        let b = InFlight::take(&count, 2).expect("second");
        assert!(InFlight::take(&count, 2).is_none());
        drop(a);
        let c = InFlight::take(&count, 2).expect("a slot came back");
        drop((b, c));
        assert_eq!(count.load(Ordering::Acquire), 0);
    }
}
