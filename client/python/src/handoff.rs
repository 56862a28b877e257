//! Handing packed batches from a DataLoader worker to the process that
//! consumes them, through shared memory instead of a pickle.
//!
//! A worker (any process that produces batches) keeps an *outbox*: a few
//! segments, each a `memfd` mapped shared, with a 4 KiB header page and a
//! data area. A batch is copied once into a free segment (the only copy
//! between storaged's verified bytes and the consumer), the header is
//! marked *lent* under a new generation, and a [`Lent`] is handed out: a
//! writable buffer over the batch's bytes.
//!
//! Pickling a `Lent` (what a DataLoader does to cross its result queue)
//! sends only `(pid, fd, inode, generation, length)`. The receiving
//! process opens `/proc/<pid>/fd/<fd>`, checks the inode (a reused fd
//! number is refused) and the header (magic, still lent under that
//! generation), and maps the same pages: nothing is copied. It keeps the
//! mapping for the sender's next batches in that segment (a few per
//! sender, dropped when the sender has exited), since mapping 28 MiB
//! afresh costs ~3 ms of page-table work per batch. When the
//! receiver's `Lent` is dropped (its last view gone: buffer exports hold a
//! reference), it marks the header free; the worker reuses the segment
//! only then. The sender's own `Lent` gave up that duty when it was
//! pickled. The memfd outlives the worker while anyone maps it, so a batch
//! stays valid after its worker exits.
//!
//! Bounds: a segment is sized for the batch that created it plus a quarter
//! (whole MiB), reused by any batch that fits; at most
//! `FREE_SEGMENTS_MAX` free segments stay mapped in a worker. Segments
//! still lent are memory the consumer holds, as a DataLoader's own shared
//! tensors would be.

use std::ffi::{CString, c_int};
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;

/// The header page before each segment's data.
const HEADER_BYTES: usize = 4096;
/// First word of every header.
const MAGIC: u64 = u64::from_le_bytes(*b"sdhandof");
/// Free segments a worker keeps mapped for reuse.
const FREE_SEGMENTS_MAX: usize = 4;
/// Segment data areas are whole MiB.
const SEGMENT_ROUND_BYTES: usize = 1 << 20;
/// Largest batch handed off in one segment.
pub const BATCH_BYTES_MAX: usize = 16 << 30;

/// The shared header; `state` is `generation << 1 | lent`.
#[repr(C)]
struct Header {
    magic: AtomicU64,
    state: AtomicU64,
}

/// A shared mapping of a segment (in the worker or a receiver).
struct Mapping {
    map: memmap2::MmapRaw,
}

impl Mapping {
    fn header(&self) -> &Header {
        // SAFETY: every mapping is at least HEADER_BYTES long, page-aligned
        // (so aligned for u64), and the header's fields are atomics, which
        // may be shared across processes.
        unsafe { &*(self.map.as_mut_ptr() as *const Header) }
    }

    fn data_ptr(&self) -> *mut u8 {
        // SAFETY: HEADER_BYTES is within the mapping (checked at creation).
        unsafe { self.map.as_mut_ptr().add(HEADER_BYTES) }
    }

    fn data_capacity(&self) -> usize {
        self.map.len() - HEADER_BYTES
    }
}

struct Segment {
    file: File,
    inode: u64,
    mapping: Arc<Mapping>,
    generation: u64,
}

impl Segment {
    fn create(data_bytes: usize) -> PyResult<Self> {
        let name = CString::new("storaged-handoff").expect("no NUL");
        // SAFETY: `name` is a valid C string; memfd_create has no other
        // memory arguments.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(os_error("memfd_create for a batch handoff segment"));
        }
        // SAFETY: `fd` was just returned by memfd_create and is owned by
        // nothing else.
        let file = unsafe { File::from_raw_fd(fd) };
        let len = HEADER_BYTES + data_bytes;
        file.set_len(len as u64)
            .map_err(|e| PyOSError::new_err(format!("sizing a handoff segment: {e}")))?;
        let inode = file
            .metadata()
            .map_err(|e| PyOSError::new_err(format!("stat of a handoff segment: {e}")))?
            .ino();
        // Populated: the first batch writes every page anyway, and one
        // call allocates them faster than faults one page at a time.
        let map = memmap2::MmapOptions::new()
            .len(len)
            .populate()
            .map_raw(&file)
            .map_err(|e| PyOSError::new_err(format!("mapping a handoff segment: {e}")))?;
        let mapping = Arc::new(Mapping { map });
        mapping.header().magic.store(MAGIC, Ordering::Relaxed);
        mapping.header().state.store(0, Ordering::Release);
        Ok(Self {
            file,
            inode,
            mapping,
            generation: 0,
        })
    }

    fn is_free(&self) -> bool {
        self.mapping.header().state.load(Ordering::Acquire) & 1 == 0
    }
}

fn os_error(what: &str) -> PyErr {
    PyOSError::new_err(format!("{what}: {}", std::io::Error::last_os_error()))
}

/// This process's segments (remade after a fork: the parent's belong to
/// the parent).
struct Outbox {
    pid: u32,
    segments: Vec<Segment>,
}

static OUTBOX: Mutex<Option<Outbox>> = Mutex::new(None);

/// A free segment of this process with room for `len` bytes (made if
/// none), marked lent under a new generation after `fill` wrote the bytes.
/// `fill` runs with the GIL released.
pub fn lend(py: Python<'_>, len: usize, fill: impl FnOnce(&mut [u8]) + Send) -> PyResult<Lent> {
    if len > BATCH_BYTES_MAX {
        return Err(PyValueError::new_err(format!(
            "a batch of {len} bytes is over the {BATCH_BYTES_MAX}-byte handoff limit"
        )));
    }
    let pid = std::process::id();
    let mut guard = OUTBOX.lock().expect("outbox lock");
    if guard.as_ref().is_some_and(|o| o.pid != pid) {
        // The parent's segments: their memory is shared with the parent,
        // which may lend them; forget them here (closing the fds is fine,
        // the mappings are the parent's business).
        *guard = None;
    }
    let outbox = guard.get_or_insert_with(|| Outbox {
        pid,
        segments: Vec::new(),
    });
    // Keep a few free segments for the next batches (the largest); unmap
    // the rest.
    let mut free: Vec<usize> = (0..outbox.segments.len())
        .filter(|&i| outbox.segments[i].is_free())
        .collect();
    if free.len() > FREE_SEGMENTS_MAX {
        free.sort_by_key(|&i| std::cmp::Reverse(outbox.segments[i].mapping.data_capacity()));
        let mut extra = free.split_off(FREE_SEGMENTS_MAX);
        extra.sort_unstable_by(|a, b| b.cmp(a));
        for i in extra {
            outbox.segments.swap_remove(i);
        }
    }
    let fitting = outbox
        .segments
        .iter()
        .enumerate()
        .filter(|(_, s)| s.is_free() && s.mapping.data_capacity() >= len)
        .min_by_key(|(_, s)| s.mapping.data_capacity())
        .map(|(i, _)| i);
    let at = match fitting {
        Some(i) => i,
        None => {
            let data_bytes = (len + len / 4).max(1).next_multiple_of(SEGMENT_ROUND_BYTES);
            outbox.segments.push(Segment::create(data_bytes)?);
            outbox.segments.len() - 1
        }
    };
    // Lent from here on, so no other lending takes it; the bytes are
    // written below, before anyone can see the `Lent`.
    let segment = &mut outbox.segments[at];
    segment.generation += 1;
    let generation = segment.generation;
    segment
        .mapping
        .header()
        .state
        .store(generation << 1 | 1, Ordering::Release);
    let lent = Lent {
        mapping: Arc::clone(&segment.mapping),
        len,
        generation,
        origin: (pid, segment.file.as_raw_fd(), segment.inode),
        owns_lending: AtomicBool::new(true),
    };
    // The copy runs without the GIL, so not under the outbox lock either:
    // a thread waiting for the lock while holding the GIL would deadlock
    // with this one waiting for the GIL to return.
    drop(guard);
    let data = SendPtr(lent.mapping.data_ptr());
    py.detach(move || {
        let data = data;
        // SAFETY: the segment was free (no process mapped it as lent: the
        // receiver of its last lending marked it free after its last view
        // was gone) and is now marked lent to `lent`, which nobody has seen
        // yet, so nothing else reads or writes these `len` bytes, which
        // are within its data area (capacity checked above); `lent` holds
        // the mapping.
        let dst = unsafe { std::slice::from_raw_parts_mut(data.0, len) };
        fill(dst);
    });
    Ok(lent)
}

/// A raw pointer that may cross into `py.detach` (see the SAFETY above).
struct SendPtr(*mut u8);
// SAFETY: the pointed-to bytes are used by one thread at a time: `lend`
// waits for the closure that uses it.
unsafe impl Send for SendPtr {}

/// One lent batch's bytes: a writable buffer (buffer protocol). Dropping
/// the last reference gives the segment back to its worker; pickling it
/// hands that duty to the process that unpickles it.
#[pyclass(frozen, module = "storaged")]
pub struct Lent {
    mapping: Arc<Mapping>,
    len: usize,
    generation: u64,
    /// (worker pid, fd of the memfd there, its inode).
    origin: (u32, c_int, u64),
    /// Cleared when pickled: the receiver gives the segment back.
    owns_lending: AtomicBool,
}

impl Drop for Lent {
    fn drop(&mut self) {
        if self.owns_lending.load(Ordering::Acquire) {
            let lent = self.generation << 1 | 1;
            // Only this lending's mark: a stale or doubled release of an
            // older generation changes nothing.
            let _ = self.mapping.header().state.compare_exchange(
                lent,
                self.generation << 1,
                Ordering::Release,
                Ordering::Relaxed,
            );
        }
    }
}

#[pymethods]
impl Lent {
    /// # Safety
    ///
    /// Called by CPython with a valid `view` to fill.
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        let this = slf.get();
        // SAFETY: `view` comes from CPython.
        // The bytes stay mapped while `slf` lives (it holds the mapping),
        // and the view keeps `slf` alive (PyBuffer_FillInfo stores a new
        // reference in view.obj); the worker does not touch a lent segment
        // until the last `Lent` of this lending is dropped.
        unsafe {
            crate::export_buffer(
                slf.as_any(),
                view,
                this.mapping.data_ptr(),
                this.len,
                false,
                flags,
            )
        }
    }

    /// # Safety
    ///
    /// Called by CPython; nothing to release.
    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {}

    fn __len__(&self) -> usize {
        self.len
    }

    fn __repr__(&self) -> String {
        format!(
            "<storaged.Lent of {} bytes from pid {}>",
            self.len, self.origin.0
        )
    }

    /// Pickles as the segment's address; the unpickler maps the same pages
    /// and gives the segment back when done with it.
    fn __reduce__<'py>(&self, py: Python<'py>) -> PyResult<(Bound<'py, PyAny>, LentAddress)> {
        let attach = py.import("storaged._native")?.getattr("_attach_lent")?;
        self.owns_lending.store(false, Ordering::Release);
        let (pid, fd, inode) = self.origin;
        Ok((attach, (pid, fd, inode, self.generation, self.len)))
    }
}

/// What a pickled [`Lent`] carries: (worker pid, fd there, inode,
/// generation, length).
type LentAddress = (u32, c_int, u64, u64, usize);

/// A sending process's segment mapped here, kept for its next batches.
struct Attached {
    pid: u32,
    fd: c_int,
    inode: u64,
    mapping: Arc<Mapping>,
    last_used: u64,
}

/// Segments of other processes mapped in this one, for reuse: a worker
/// cycles through a few segments, and mapping one again costs page-table
/// entries for every page (about 3 ms per 28 MiB batch, in the training
/// process, the one that must keep up with every worker), while a kept
/// mapping costs nothing. At most `ATTACHED_PER_SENDER_MAX` per sending
/// process (least recently used go first); those of processes that have
/// exited go at the next attach, or within [`REAP_INTERVAL`] (a reaper
/// thread watches while any are kept), so a finished worker's memory is
/// freed once its batches are, even when no batch follows.
static ATTACHED: Mutex<(Vec<Attached>, u64)> = Mutex::new((Vec::new(), 0));

/// How often the reaper looks for senders that have exited.
const REAP_INTERVAL: std::time::Duration = std::time::Duration::from_millis(200);

/// The process whose reaper thread runs (0: none). A pid, not a flag: a
/// forked child inherits the value but not the thread.
static REAPER_PID: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Drops the kept mappings of senders that have exited; whether any are
/// left.
fn reap_exited() -> bool {
    let mut guard = ATTACHED.lock().expect("attached lock");
    let mut alive: Vec<u32> = Vec::new();
    guard.0.retain(|a| {
        if alive.contains(&a.pid) {
            return true;
        }
        let exists = process_exists(a.pid);
        if exists {
            alive.push(a.pid);
        }
        exists
    });
    !guard.0.is_empty()
}

/// Starts this process's reaper unless it runs; it ends once nothing is
/// kept.
fn ensure_reaper() {
    let me = std::process::id();
    if REAPER_PID.swap(me, Ordering::AcqRel) == me {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("storaged-handoff-reaper".into())
        .spawn(move || {
            loop {
                std::thread::sleep(REAP_INTERVAL);
                if !reap_exited() {
                    REAPER_PID.store(0, Ordering::Release);
                    // An attach may have raced the store: look once more.
                    if reap_exited() && REAPER_PID.swap(me, Ordering::AcqRel) != me {
                        continue;
                    }
                    return;
                }
            }
        });
    if spawned.is_err() {
        // No thread: mappings still go at the next attach.
        REAPER_PID.store(0, Ordering::Release);
    }
}
const ATTACHED_PER_SENDER_MAX: usize = FREE_SEGMENTS_MAX + 2;

fn process_exists(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks that the process exists (and may be
    // signalled); no memory is passed.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// The mapping of `pid`'s segment `fd` (checked to be `inode`), at least
/// `len` data bytes long: a kept one, or a new one (then kept).
fn attached_mapping(pid: u32, fd: c_int, inode: u64, len: usize) -> Result<Arc<Mapping>, String> {
    let mut guard = ATTACHED.lock().expect("attached lock");
    let (attached, tick) = &mut *guard;
    *tick += 1;
    let now = *tick;
    let mut alive: Vec<u32> = Vec::new();
    attached.retain(|a| {
        if a.pid == pid || alive.contains(&a.pid) {
            return true;
        }
        let exists = process_exists(a.pid);
        if exists {
            alive.push(a.pid);
        }
        exists
    });
    if let Some(a) = attached
        .iter_mut()
        .find(|a| (a.pid, a.fd, a.inode) == (pid, fd, inode) && a.mapping.data_capacity() >= len)
    {
        a.last_used = now;
        return Ok(Arc::clone(&a.mapping));
    }
    let path = format!("/proc/{pid}/fd/{fd}");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| format!("{path}: {e}"))?;
    let meta = file.metadata().map_err(|e| format!("{path}: {e}"))?;
    let map_len = meta.len() as usize;
    if meta.ino() != inode || map_len < HEADER_BYTES + len {
        return Err(format!("{path} is not the segment it was"));
    }
    // The whole segment, so later batches in it fit. The pages exist (the
    // sender wrote them): map them all now, in one call, rather than fault
    // them in one by one as the consumer reads.
    let map = memmap2::MmapOptions::new()
        .len(map_len)
        .populate()
        .map_raw(&file)
        .map_err(|e| format!("mapping {path}: {e}"))?;
    let mapping = Arc::new(Mapping { map });
    attached.push(Attached {
        pid,
        fd,
        inode,
        mapping: Arc::clone(&mapping),
        last_used: now,
    });
    let mine = attached.iter().filter(|a| a.pid == pid).count();
    if mine > ATTACHED_PER_SENDER_MAX {
        let oldest = attached
            .iter()
            .enumerate()
            .filter(|(_, a)| a.pid == pid)
            .min_by_key(|(_, a)| a.last_used)
            .map(|(i, _)| i)
            .expect("this sender has entries");
        attached.swap_remove(oldest);
    }
    drop(guard);
    ensure_reaper();
    Ok(mapping)
}

/// The unpickler of a [`Lent`]: maps the sender's segment (or reuses its
/// mapping from an earlier batch).
#[pyfunction]
pub fn _attach_lent(
    pid: u32,
    fd: c_int,
    inode: u64,
    generation: u64,
    len: usize,
) -> PyResult<Lent> {
    let gone = |why: String| {
        PyOSError::new_err(format!(
            "cannot map the batch that process {pid} handed over ({why}); \
             a batch crosses between processes of one host, once"
        ))
    };
    let mapping = attached_mapping(pid, fd, inode, len).map_err(gone)?;
    let header = mapping.header();
    let state = header.state.load(Ordering::Acquire);
    if header.magic.load(Ordering::Relaxed) != MAGIC || state != (generation << 1 | 1) {
        return Err(gone(format!(
            "the segment is no longer lent as generation {generation}"
        )));
    }
    Ok(Lent {
        mapping,
        len,
        generation,
        origin: (pid, fd, inode),
        owns_lending: AtomicBool::new(true),
    })
}
