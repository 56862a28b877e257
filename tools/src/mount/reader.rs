//! Reads of open files: exact ranges for random access, large windows read
//! ahead for sequential access.
//!
//! Each open file keeps where its last read ended. A read that starts near
//! there continues a sequential run; once a run is long enough (at once
//! for a large file read from its start) the file reads in windows that
//! double from `WINDOW_MIN_BYTES` up to the configured window, keeping
//! `WINDOWS_PER_FILE_MAX` of them in flight so that storaged reads several
//! at once and a streaming reader finds its bytes already here. Any
//! other read is served exactly as asked (clamped to the object's end):
//! random small reads are never inflated, except that a file of at most
//! `WHOLE_FILE_BYTES_MAX` read from its start is read whole (a sample: the
//! kernel asks for it in 128 KiB pieces), and the first open of such a file
//! starts that fetch at once, before the kernel's read arrives (both only
//! where reads go through the runtime: on the same host an exact read is
//! served on the kernel's own thread, see `direct`, and costs less).
//! Windows count against one budget for the whole mount; without room,
//! reads are exact.
//!
//! Every byte comes from the client library's verified paths (a region
//! filled and verified in place by storaged when it is on this host, a
//! gRPC Read otherwise), pinned to the dataset id the mount listed, and a
//! failure that a restart of storaged explains is tried again within the
//! retry budget. A cluster dataset's files read through its
//! `ClusterDataset` instead (chunks straight from their nodes, parity in
//! place of a node that is down): the same windows, no direct reads or
//! batches (those are one node's paths).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use storaged_client::cluster::ClusterDataset;
use storaged_client::retry::{RetryPolicy, Retrying};
use storaged_client::{ClientError, Dataset, RegionRead, SizedRange};

use super::batch::{BATCH_ITEM_BYTES_MAX, BatchFailure, Batcher};
use super::direct::{Direct, DirectReads};

/// The first read-ahead window of a sequential run.
pub const WINDOW_MIN_BYTES: u64 = 1 << 20;
/// Reads in a row near the last one's end before windows start (the
/// first read of a file counts as one).
const SEQUENTIAL_READS_MIN: u32 = 2;
/// Windows ahead of the reader per file, the one being read included.
const WINDOWS_PER_FILE_MAX: usize = 4;
/// Files up to this size read from their start are read whole at once.
const WHOLE_FILE_BYTES_MAX: u64 = 1 << 20;

/// Read-ahead settings of a mount.
#[derive(Debug, Clone, Copy)]
pub struct ReadAheadOptions {
    /// Largest window of one file.
    pub window_bytes_max: u64,
    /// Bytes of all windows of the mount at once.
    pub budget_bytes: u64,
    /// How long a read waits for storaged to come back before EIO.
    pub retry_budget: Duration,
    /// Requests to storaged at once (each holds a region on the same
    /// host, and storaged limits regions per client).
    pub fetches_max: usize,
}

/// Takes a read's bytes (or why it failed) on the thread that has them,
/// and answers the kernel.
pub type Answer<'a> = dyn FnMut(Result<&[u8], ReadFailure>) + 'a;

/// Why a read failed, as the mount answers it.
#[derive(Debug, Clone)]
pub enum ReadFailure {
    /// The object or its dataset is gone (removed, or removed and created
    /// again): ENOENT.
    Gone(String),
    /// Anything else (corrupt bytes, storaged away past the budget): EIO,
    /// with the message logged.
    Failed(String),
}

impl ReadFailure {
    pub fn from_client(e: ClientError) -> Self {
        Self::from_client_code(e.code(), e.to_string())
    }

    pub fn from_client_code(code: Option<tonic::Code>, message: String) -> Self {
        match code {
            Some(tonic::Code::NotFound) => ReadFailure::Gone(message),
            _ => ReadFailure::Failed(message),
        }
    }

    pub fn errno(&self) -> fuser::Errno {
        match self {
            ReadFailure::Gone(_) => fuser::Errno::ENOENT,
            ReadFailure::Failed(_) => fuser::Errno::EIO,
        }
    }

    pub fn message(&self) -> &str {
        match self {
            ReadFailure::Gone(m) | ReadFailure::Failed(m) => m,
        }
    }
}

/// A window's bytes, and their share of the budget (given back when the
/// last reader of them lets go).
pub struct WindowData {
    bytes: Bytes,
    _charge: Charge,
}

type Fetch = Shared<BoxFuture<'static, Result<Arc<WindowData>, ReadFailure>>>;

/// Bytes of the mount's windows, charged while a window lives.
#[derive(Debug, Default)]
pub struct Budget {
    used: AtomicU64,
}

/// One window's share of the budget, given back on drop.
struct Charge {
    budget: Arc<Budget>,
    bytes: u64,
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

impl Budget {
    fn charge(self: &Arc<Self>, bytes: u64, max: u64) -> Option<Charge> {
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                (u + bytes <= max).then_some(u + bytes)
            })
            .ok()?;
        Some(Charge {
            budget: Arc::clone(self),
            bytes,
        })
    }

    /// Bytes held by windows now.
    #[cfg(test)]
    fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }
}

/// A range of the file read (or being read) ahead. Dropping it does not
/// stop its read: a reader may still wait for it (the kernel sends reads
/// of one run at once, in any order), and the bytes stay charged to the
/// budget until the last holder lets go.
struct Window {
    start: u64,
    len: u64,
    data: Fetch,
}

impl Window {
    fn end(&self) -> u64 {
        self.start + self.len
    }
}

#[derive(Default)]
struct Sequence {
    /// Where the last read ended.
    next: u64,
    /// Reads in a row that started near `next`.
    run: u32,
    /// The size of the next window (0: none yet).
    window_bytes: u64,
    windows: VecDeque<Window>,
}

impl Sequence {
    /// Counts a read of `[offset, end)` into the run, or starts a new run
    /// (dropping the windows) when it jumps away. Reads of one run can
    /// arrive slightly out of order (the kernel sends several at once):
    /// near the last end still counts.
    fn note_read(&mut self, offset: u64, end: u64) {
        let near = WINDOW_MIN_BYTES.max(self.window_bytes);
        if offset + near >= self.next && offset <= self.next + near {
            self.run = self.run.saturating_add(1);
            self.next = self.next.max(end);
        } else {
            self.run = 1;
            self.window_bytes = 0;
            self.windows.clear();
            self.next = end;
        }
    }
}

/// Where a mounted dataset's bytes come from.
#[derive(Clone)]
pub enum Source {
    /// A dataset of the node the mount talks to, every read pinned to its
    /// id.
    Node { dataset: Arc<Dataset>, id: u64 },
    /// A cluster dataset, read from its nodes.
    Cluster(Arc<ClusterDataset>),
}

/// One open file of the mount.
pub struct OpenFile {
    source: Source,
    path: Arc<str>,
    size: u64,
    sequence: Mutex<Sequence>,
}

impl OpenFile {
    /// The object's path in its dataset.
    pub fn path(&self) -> &str {
        &self.path
    }
}

/// The reads of a mount: its runtime, read-ahead settings and budget.
pub struct Reader {
    runtime: tokio::runtime::Handle,
    /// Set where storaged is on this host: reads the windows do not cover
    /// are served on the kernel's thread (`direct`).
    direct: Option<DirectReads>,
    options: ReadAheadOptions,
    budget: Arc<Budget>,
    fetches: Arc<tokio::sync::Semaphore>,
    batcher: Arc<Batcher>,
}

impl Reader {
    /// Reads with read-ahead `options` on `runtime`; exact reads on the
    /// caller's thread through `direct` when given.
    pub fn new(
        runtime: tokio::runtime::Handle,
        options: ReadAheadOptions,
        direct: Option<DirectReads>,
    ) -> Self {
        let fetches = Arc::new(tokio::sync::Semaphore::new(options.fetches_max.max(1)));
        Self {
            batcher: Arc::new(Batcher::new(runtime.clone(), Arc::clone(&fetches))),
            runtime,
            direct,
            fetches,
            options,
            budget: Arc::default(),
        }
    }

    pub fn open(&self, source: Source, path: String, size: u64) -> OpenFile {
        OpenFile {
            source,
            path: path.into(),
            size,
            sequence: Mutex::default(),
        }
    }

    /// Starts fetching a small file whole as it is opened: its bytes are on
    /// their way while the open's answer goes back and the kernel sends
    /// the read (a sample's open is nearly always followed by reading all
    /// of it). Within the read-ahead budget; false when nothing started
    /// (an empty or large file, no room).
    pub fn fetch_whole_at_open(&self, file: &OpenFile) -> bool {
        // Direct reads serve it on the read's own thread instead.
        let direct = self.direct.is_some() && matches!(file.source, Source::Node { .. });
        if direct || file.size == 0 || file.size > WHOLE_FILE_BYTES_MAX {
            return false;
        }
        let mut seq = file.sequence.lock().expect("sequence poisoned");
        // Not once a read came first (the open was answered before this).
        seq.run == 0
            && seq.windows.is_empty()
            && self.push_window(file, &mut seq, 0, Some(file.size))
    }

    /// Bytes `[offset, offset + size)` of `file` (fewer at its end), handed
    /// to `answer` on this thread when read-ahead already holds them or a
    /// direct read can serve them (no hop to the runtime); else a future to
    /// await.
    pub fn start_read(
        &self,
        file: &OpenFile,
        offset: u64,
        size: u32,
        answer: &mut Answer<'_>,
    ) -> Pending {
        let end = offset.saturating_add(u64::from(size)).min(file.size);
        if offset >= end {
            answer(Ok(&[]));
            return Pending::Answered;
        }
        let windows = self.plan(file, offset, end);
        if windows.is_empty() {
            if let (Some(direct), Source::Node { dataset, .. }) = (&self.direct, &file.source) {
                let read = RegionRead {
                    path: file.path.to_string(),
                    offset,
                    length: Some(end - offset),
                    object_size: file.size,
                };
                if direct.read(dataset, &read, answer) == Direct::Answered {
                    return Pending::Answered;
                }
            }
            return Pending::Wait(self.fetch(file, offset, end - offset).boxed());
        }
        let ready: Option<Vec<_>> = windows
            .iter()
            .map(|(start, data)| data.peek().cloned().map(|d| (*start, d)))
            .collect();
        match ready {
            Some(done) => {
                match assemble(offset, end, done) {
                    Ok(bytes) => answer(Ok(&bytes)),
                    Err(e) => answer(Err(e)),
                }
                Pending::Answered
            }
            None => Pending::Wait(
                async move {
                    let mut done = Vec::with_capacity(windows.len());
                    for (start, data) in windows {
                        done.push((start, data.await));
                    }
                    assemble(offset, end, done)
                }
                .boxed(),
            ),
        }
    }

    /// The windows (start, data) that cover `[offset, end)`, starting and
    /// dropping windows as the sequence goes; empty for an exact read.
    fn plan(&self, file: &OpenFile, offset: u64, end: u64) -> Vec<(u64, Fetch)> {
        let mut seq = file.sequence.lock().expect("sequence poisoned");
        seq.note_read(offset, end);
        if offset == 0 && seq.run == 1 && file.size > WHOLE_FILE_BYTES_MAX {
            // A large file read from its start is nearly always streamed
            // (a shard, `cp`, `sha256sum`): windows from the first read,
            // rather than one round trip per read until the run is seen.
            // Direct files get no kernel read-ahead to hide that ramp.
            seq.run = SEQUENTIAL_READS_MIN;
        }
        seq.windows.retain(|w| w.end() > offset);
        if file.size <= WHOLE_FILE_BYTES_MAX {
            // A small file is read whole (a sample): one request to
            // storaged instead of one per kernel read, started at its open
            // (`fetch_whole_at_open`) or at its first read from its start.
            let whole = |seq: &Sequence| {
                seq.windows
                    .front()
                    .is_some_and(|w| w.start == 0 && w.len == file.size)
            };
            // Not with direct reads: an exact read on the kernel's thread
            // costs less than a window fetched on the runtime.
            if !whole(&seq) && offset == 0 && end < file.size && self.direct.is_none() {
                seq.windows.clear();
                self.push_window(file, &mut seq, 0, Some(file.size));
            }
            if whole(&seq) {
                let covering = seq
                    .windows
                    .iter()
                    .map(|w| (w.start, w.data.clone()))
                    .collect();
                // Read to its end: the bytes go back to the budget once
                // this read is answered.
                seq.windows.retain(|w| w.end() > end);
                return covering;
            }
        }
        if seq.run < SEQUENTIAL_READS_MIN {
            return Vec::new();
        }
        let covered = |seq: &Sequence| {
            let mut at = offset;
            for w in &seq.windows {
                if w.start <= at && at < w.end() {
                    at = w.end();
                }
            }
            at >= end
        };
        if !covered(&seq) {
            // Start over from this read.
            seq.windows.clear();
            if !self.push_window(file, &mut seq, offset, None) || !covered(&seq) {
                seq.windows.clear();
                return Vec::new();
            }
        }
        // Windows ahead up to the per-file count: storaged reads them at
        // once, so the devices see several requests per stream.
        while let Some(last) = seq.windows.back()
            && last.end() < file.size
            && seq.windows.len() < WINDOWS_PER_FILE_MAX
        {
            let at = last.end();
            if !self.push_window(file, &mut seq, at, None) {
                break;
            }
        }
        let covering = seq
            .windows
            .iter()
            .filter(|w| w.start < end && w.end() > offset)
            .map(|w| (w.start, w.data.clone()))
            .collect();
        // A window read to its end has served its run: its bytes go back
        // to the budget once this read is answered.
        seq.windows.retain(|w| w.end() > end);
        covering
    }

    /// Starts reading the window at `start` (the next size of the run,
    /// or `len` when given); false without budget.
    fn push_window(
        &self,
        file: &OpenFile,
        seq: &mut Sequence,
        start: u64,
        len: Option<u64>,
    ) -> bool {
        let bytes = if seq.window_bytes == 0 {
            WINDOW_MIN_BYTES
        } else {
            (seq.window_bytes * 2).min(self.options.window_bytes_max)
        }
        .max(WINDOW_MIN_BYTES.min(self.options.window_bytes_max));
        let len = len.unwrap_or(bytes).min(file.size - start);
        let Some(charge) = self.budget.charge(len, self.options.budget_bytes) else {
            return false;
        };
        seq.window_bytes = bytes;
        let fetch = self.fetch(file, start, len);
        let task = self.runtime.spawn(async move {
            let bytes = fetch.await?;
            Ok(Arc::new(WindowData {
                bytes,
                _charge: charge,
            }))
        });
        let data = async move {
            task.await
                .unwrap_or_else(|e| Err(ReadFailure::Failed(format!("read-ahead task: {e}"))))
        }
        .boxed()
        .shared();
        seq.windows.push_back(Window { start, len, data });
        true
    }

    /// `len` bytes at `offset` of `file`, retried within the budget; a
    /// storaged that stops answering (hung, not gone) fails it once the
    /// budget has passed.
    fn fetch(
        &self,
        file: &OpenFile,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = Result<Bytes, ReadFailure>> + Send + 'static {
        let fetches = Arc::clone(&self.fetches);
        let batched = match &file.source {
            Source::Node { dataset, id } if len <= BATCH_ITEM_BYTES_MAX => {
                Some((Arc::clone(&self.batcher), Arc::clone(dataset), *id))
            }
            _ => None,
        };
        let source = file.source.clone();
        let (path, size, budget) = (Arc::clone(&file.path), file.size, self.options.retry_budget);
        let fetch = async move {
            if let Some((batcher, dataset, dataset_id)) = batched {
                let range = SizedRange {
                    path: path.to_string(),
                    object_size: size,
                    offset,
                    length: len,
                };
                match batcher.read(&dataset, dataset_id, range).await {
                    Ok(bytes) if bytes.len() as u64 == len => return Ok(bytes),
                    Ok(bytes) => {
                        return Err(ReadFailure::Failed(format!(
                            "{} bytes where {len} were expected",
                            bytes.len()
                        )));
                    }
                    Err(BatchFailure::Final(failure)) => return Err(failure),
                    // Again on its own, within the retry budget.
                    Err(BatchFailure::Transient(e)) => {
                        tracing::debug!(error = %e, "batched read failed; trying alone");
                    }
                }
            }
            let _permit = fetches
                .acquire_owned()
                .await
                .map_err(|_| ReadFailure::Failed("the mount is closing".into()))?;
            fetch_retrying(source, path, size, offset, len, budget).await
        };
        async move {
            // Dropping a read in flight is safe: its region is retired.
            tokio::time::timeout(budget, fetch)
                .await
                .unwrap_or_else(|_| {
                    Err(ReadFailure::Failed(format!(
                        "storaged did not answer within the retry budget ({budget:?})"
                    )))
                })
        }
    }
}

/// A read's outcome: at hand, or to wait for.
pub enum Pending {
    /// The read was answered on the caller's thread.
    Answered,
    /// Its bytes come when this is done.
    Wait(BoxFuture<'static, Result<Bytes, ReadFailure>>),
}

/// Bytes `[offset, end)` out of windows (start, data) that cover them:
/// a view of the one window that usually does, or the pieces joined.
fn assemble(
    offset: u64,
    end: u64,
    windows: Vec<(u64, Result<Arc<WindowData>, ReadFailure>)>,
) -> Result<Bytes, ReadFailure> {
    let mut parts = Vec::with_capacity(windows.len());
    for (start, data) in windows {
        let bytes = &data?.bytes;
        let from = offset.max(start) - start;
        let to = (end.min(start + bytes.len() as u64) - start).max(from);
        parts.push(bytes.slice(from as usize..to as usize));
    }
    if let [one] = &parts[..] {
        return Ok(one.clone());
    }
    let mut joined = Vec::with_capacity((end - offset) as usize);
    for p in parts {
        joined.extend_from_slice(&p);
    }
    Ok(joined.into())
}

/// `len` bytes at `offset` of the object, tried again while storaged is
/// away and `budget` allows.
async fn fetch_retrying(
    source: Source,
    path: Arc<str>,
    size: u64,
    offset: u64,
    len: u64,
    budget: Duration,
) -> Result<Bytes, ReadFailure> {
    let policy = match &source {
        Source::Node { dataset, .. } => dataset.client().retry_policy(),
        Source::Cluster(_) => RetryPolicy::default(),
    };
    let mut retrying = Retrying::new(policy.with_budget_only(budget));
    loop {
        let started = std::time::Instant::now();
        let result = match &source {
            Source::Node { dataset, .. } => dataset
                .read_range_sized(&path, size, offset, len)
                .await
                .map(|(bytes, _)| bytes),
            Source::Cluster(cluster) => cluster.read_range(&path, offset, len).await,
        };
        // Where a mount's time goes: RUST_LOG=storagectl=debug.
        tracing::debug!(
            %path,
            offset,
            len,
            us = started.elapsed().as_micros() as u64,
            "fetched"
        );
        match result {
            Ok(bytes) if bytes.len() as u64 == len => return Ok(bytes),
            Ok(bytes) => {
                return Err(ReadFailure::Failed(format!(
                    "{path}: {} bytes at offset {offset} where {len} were expected",
                    bytes.len()
                )));
            }
            Err(e) => {
                if let Err(e) = retrying.again(e).await {
                    return Err(ReadFailure::from_client(e));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_jump_starts_a_new_run_that_can_grow_again() {
        // Guards against a run that never restarts after a jump back: the
        // end of the last run must not stay the reference.
        let mut seq = Sequence::default();
        let k128 = 128 << 10;
        for i in 0..4 {
            seq.note_read(i * k128, (i + 1) * k128);
        }
        assert_eq!(seq.run, 4);
        seq.note_read(100 << 20, (100 << 20) + k128);
        assert_eq!(seq.run, 1, "a jump forward starts over");
        seq.note_read(0, k128);
        assert_eq!(seq.run, 1, "a jump back starts over");
        seq.note_read(k128, 2 * k128);
        seq.note_read(2 * k128, 3 * k128);
        assert_eq!(seq.run, 3, "and the new run grows");
        // Slightly out of order still counts.
        seq.note_read(4 * k128, 5 * k128);
        seq.note_read(3 * k128, 4 * k128);
        assert_eq!(seq.run, 5);
    }

    #[test]
    fn budget_charges_until_full_and_gives_back_on_drop() {
        let budget = Arc::new(Budget::default());
        let a = budget.charge(6, 10).expect("room");
        assert!(budget.charge(5, 10).is_none(), "over the budget");
        let b = budget.charge(4, 10).expect("exactly full");
        assert_eq!(budget.used(), 10);
        drop(a);
        assert_eq!(budget.used(), 4);
        drop(b);
        assert_eq!(budget.used(), 0);
    }
}
