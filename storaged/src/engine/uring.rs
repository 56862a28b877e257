//! The io_uring engine: one ring for all devices, with no thread of its
//! own.
//!
//! Operations beyond a device's queue depth wait in a per-device backlog
//! served in C-SCAN order (`elevator`), so the device always gets the
//! nearest next piece of all the work in flight, not the oldest.
//!
//! The thread that submits an operation pushes it into the ring itself,
//! under one lock that guards the ring's queues and the bookkeeping, and
//! makes the `io_uring_enter` that starts it. Completions are reaped by a
//! task on the runtime that opened the engine: the ring signals a
//! registered eventfd, which the runtime's poller watches. So a read
//! costs one thread wakeup (the runtime worker that polls) where a ring
//! thread cost three (its bell, the completion, the waiting task), about
//! 50 us of a small read on this VM (BENCHMARKS.md, "The mount, third
//! pass"), and nothing spins. The kernel finishes a read in the context of
//! the thread that submitted it (task work), which is a runtime worker
//! too. An engine opened outside any runtime (a tool) reaps on a thread
//! of its own.
//!
//! Reads into foreign memory (client regions) have a slot table of their
//! own and share the per-device queue depth; their user data is
//! `FOREIGN_TOKEN_BASE + slot`. The buffer table is registered sparse, with
//! `REGION_FIXED_SLOTS` spare entries after the pool's: a region is
//! registered into one when it is registered with storaged
//! (`fix_foreign`, an `IORING_REGISTER_BUFFERS_UPDATE` on the ring's fd,
//! safe beside `io_uring_enter` since the kernel serialises both), and its reads are then `READ_FIXED`, which skips
//! pinning the client's pages for every I/O (15% of the server's CPU on
//! this path when they were plain `READ`s). A region that does not fit
//! (over 1 GiB, no free entry, the memlock limit) is read with plain
//! `READ`s.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use io_uring::{IoUring, opcode, squeue, types};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use super::elevator::Elevator;
use super::{
    EngineLimits, FOREIGN_READS_IN_FLIGHT_MAX, ForeignRead, ForeignReadFuture, IoBackend, IoOp,
    OpKind,
};
use crate::buf::{BufLease, BufferPool, IoFuture};

/// Tokens at or above this are foreign reads; below, pool buffer indexes.
const FOREIGN_TOKEN_BASE: u64 = 1 << 32;

/// Spare fixed-buffer entries for client regions.
const REGION_FIXED_SLOTS: usize = 256;
/// The kernel's limit on one fixed buffer.
const FIXED_BUFFER_BYTES_MAX: usize = 1 << 30;
/// `IORING_REGISTER_BUFFERS_UPDATE` (linux/io_uring.h).
const IORING_REGISTER_BUFFERS_UPDATE: libc::c_uint = 16;

/// `struct io_uring_rsrc_update2` (linux/io_uring.h).
#[repr(C)]
struct RsrcUpdate2 {
    offset: u32,
    resv: u32,
    data: u64,
    tags: u64,
    nr: u32,
    resv2: u32,
}

/// The spare fixed-buffer entries and a descriptor of the ring to update
/// them through (a duplicate, so a region that outlives the engine can
/// still be unregistered).
struct FixedTable {
    ring_fd: OwnedFd,
    free: std::sync::Mutex<Vec<u16>>,
}

impl FixedTable {
    /// Points entry `index` at `iov` (an empty iovec clears it).
    fn update(&self, index: u16, iov: libc::iovec) -> io::Result<()> {
        let up = RsrcUpdate2 {
            offset: u32::from(index),
            resv: 0,
            data: (&iov as *const libc::iovec) as u64,
            tags: 0,
            nr: 1,
            resv2: 0,
        };
        // SAFETY: io_uring_register(2) with a valid ring fd and a pointer to
        // a live, correctly laid out io_uring_rsrc_update2 whose `data`
        // points to one live iovec; the kernel copies both before returning.
        let r = unsafe {
            libc::syscall(
                libc::SYS_io_uring_register,
                self.ring_fd.as_raw_fd(),
                IORING_REGISTER_BUFFERS_UPDATE,
                (&up as *const RsrcUpdate2).cast::<libc::c_void>(),
                std::mem::size_of::<RsrcUpdate2>() as libc::c_uint,
            )
        };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
}

/// A foreign read in the ring: it owns its target until completion.
struct ForeignInFlight {
    f: InFlight,
    read: ForeignRead,
    done: futures::channel::oneshot::Sender<io::Result<usize>>,
}

/// io_uring engine; see the module docs.
pub struct UringEngine {
    shared: Arc<Shared>,
    files: Vec<File>,
    fixed_buffers: bool,
    fixed_regions: Option<Arc<FixedTable>>,
    /// The reaper's own thread, where no runtime was running at start.
    reaper_thread: Option<JoinHandle<()>>,
}

impl UringEngine {
    pub fn new(files: Vec<File>, pool: Arc<BufferPool>, limits: EngineLimits) -> io::Result<Self> {
        let buffers = pool.buffer_count();
        let entries = u32::try_from(
            (buffers + FOREIGN_READS_IN_FLIGHT_MAX + 1)
                .next_power_of_two()
                .clamp(8, 32768),
        )
        .expect("ring size fits u32");
        let ring: IoUring = IoUring::builder().build(entries)?;
        // SAFETY: eventfd(2) with valid flags; the result is checked below.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `efd` is a freshly created descriptor nobody else owns.
        let completions_fd = unsafe { OwnedFd::from_raw_fd(efd) };
        ring.submitter().register_eventfd(efd)?;

        let fds: Vec<RawFd> = files.iter().map(AsRawFd::as_raw_fd).collect();
        let fixed_files = ring.submitter().register_files(&fds).is_ok();
        let iovecs = pool.iovecs();
        // A sparse table with room for regions, else the pool alone, else
        // plain READ/WRITE.
        let mut fixed_regions = None;
        let fixed_buffers = buffers + REGION_FIXED_SLOTS <= u16::MAX as usize
            && ring
                .submitter()
                .register_buffers_sparse((buffers + REGION_FIXED_SLOTS) as u32)
                .is_ok()
            // SAFETY: every iovec points into the pool's mapping, which
            // `Shared` keeps alive (it holds an `Arc<BufferPool>`) until
            // after the ring is dropped and the registration released.
            && match unsafe { ring.submitter().register_buffers_update(0, &iovecs, None) } {
                Ok(()) => {
                    // SAFETY: dup(2) of the ring's open descriptor; the
                    // result is checked and owned below.
                    let fd = unsafe { libc::dup(ring.as_raw_fd()) };
                    if fd >= 0 {
                        fixed_regions = Some(Arc::new(FixedTable {
                            // SAFETY: `fd` is a fresh descriptor we own.
                            ring_fd: unsafe { OwnedFd::from_raw_fd(fd) },
                            free: std::sync::Mutex::new(
                                (buffers..buffers + REGION_FIXED_SLOTS)
                                    .rev()
                                    .map(|i| i as u16)
                                    .collect(),
                            ),
                        }));
                    }
                    true
                }
                Err(_) => {
                    let _ = ring.submitter().unregister_buffers();
                    false
                }
            };
        let fixed_buffers = fixed_buffers
            || buffers <= u16::MAX as usize
                // SAFETY: as above.
                && match unsafe { ring.submitter().register_buffers(&iovecs) } {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::warn!(error = %e, "io_uring: cannot register fixed buffers; using plain READ/WRITE");
                        false
                    }
                };
        let runtime = tokio::runtime::Handle::try_current().ok();
        tracing::info!(
            ring_entries = entries,
            fixed_buffers,
            fixed_regions = fixed_regions.is_some(),
            fixed_files,
            devices = files.len(),
            reaper = if runtime.is_some() {
                "runtime task"
            } else {
                "own thread"
            },
            "io_uring engine started"
        );

        let shared = Arc::new(Shared {
            core: Mutex::new(RingState::new(fds.len(), buffers)),
            ring,
            completions_fd,
            shutdown: AtomicBool::new(false),
            pool,
            fds,
            fixed_files,
            fixed_buffers,
            queue_depth_per_device_max: limits.queue_depth_per_device_max.max(1),
        });
        let reaper_thread = match runtime {
            Some(runtime) => {
                let reaper = Reaper::new(Arc::clone(&shared), &runtime)?;
                runtime.spawn(reaper.run());
                None
            }
            None => {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_io()
                    .build()?;
                let reaper = Reaper::new(Arc::clone(&shared), rt.handle())?;
                Some(
                    std::thread::Builder::new()
                        .name("storaged-reaper".into())
                        .spawn(move || rt.block_on(reaper.run()))?,
                )
            }
        };
        Ok(Self {
            shared,
            files,
            fixed_buffers,
            fixed_regions,
            reaper_thread,
        })
    }

    pub fn uses_fixed_buffers(&self) -> bool {
        self.fixed_buffers
    }
}

impl IoBackend for UringEngine {
    fn kind(&self) -> &'static str {
        "io_uring"
    }

    fn submit(&self, op: IoOp, buf: BufLease) -> IoFuture {
        if op.device as usize >= self.files.len() || op.len as usize > buf.capacity() {
            let err = io::Error::new(io::ErrorKind::InvalidInput, format!("bad I/O {op:?}"));
            return IoFuture::ready(Err(err), buf);
        }
        let index = buf.index();
        let fut = buf.lend_to_kernel();
        {
            let mut st = self.shared.lock();
            st.in_flight[index as usize] = Some(InFlight { op, done: 0 });
            st.deferred[op.device as usize].push(op.offset, u64::from(index));
            st.deferred_total += 1;
            self.shared.push_deferred(&mut st);
        }
        self.shared.enter();
        fut
    }

    fn read_foreign(&self, read: ForeignRead) -> ForeignReadFuture {
        if let Err(e) = read.check(self.files.len() as u32) {
            return ForeignReadFuture::ready(Err(e));
        }
        let (done, fut) = ForeignReadFuture::channel();
        {
            let mut st = self.shared.lock();
            // Callers bound themselves to the table's size (see
            // `FOREIGN_READS_IN_FLIGHT_MAX`), so this holds unless one
            // does not.
            let Some(slot) = st.foreign_free.pop() else {
                return ForeignReadFuture::ready(Err(io::Error::other(
                    "io_uring foreign-read table is full",
                )));
            };
            let op = IoOp {
                kind: OpKind::Read,
                device: read.device,
                offset: read.device_offset,
                len: read.len,
            };
            st.foreign[slot] = Some(ForeignInFlight {
                f: InFlight { op, done: 0 },
                read,
                done,
            });
            st.deferred[op.device as usize].push(op.offset, FOREIGN_TOKEN_BASE + slot as u64);
            st.deferred_total += 1;
            self.shared.push_deferred(&mut st);
        }
        self.shared.enter();
        fut
    }

    fn sync(&self, device: u32) -> io::Result<()> {
        self.files[device as usize].sync_data()
    }

    fn discard(&self, device: u32, offset: u64, len: u64) -> io::Result<()> {
        let file = self.files.get(device as usize).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("no device {device}"))
        })?;
        super::discard_file(file, offset, len)
    }

    unsafe fn fix_foreign(&self, base: *mut u8, len: usize) -> Option<super::FixedForeign> {
        let table = self.fixed_regions.as_ref()?;
        if len == 0 || len > FIXED_BUFFER_BYTES_MAX {
            return None;
        }
        let index = table.free.lock().expect("fixed table poisoned").pop()?;
        let iov = libc::iovec {
            iov_base: base.cast(),
            iov_len: len,
        };
        if let Err(e) = table.update(index, iov) {
            // Typically RLIMIT_MEMLOCK for an unprivileged storaged.
            tracing::debug!(error = %e, len, "region not registered as a fixed buffer; plain reads");
            table.free.lock().expect("fixed table poisoned").push(index);
            return None;
        }
        let table = Arc::clone(table);
        Some(super::FixedForeign::new(
            index,
            Box::new(move || {
                let empty = libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                };
                match table.update(index, empty) {
                    Ok(()) => table.free.lock().expect("fixed table poisoned").push(index),
                    // The entry stays pinned and unused rather than reused.
                    Err(e) => {
                        tracing::warn!(error = %e, index, "cannot unregister a region's fixed buffer")
                    }
                }
            }),
        ))
    }

    fn device_count(&self) -> u32 {
        self.files.len() as u32
    }
}

impl Drop for UringEngine {
    /// Waits for every operation in the ring to complete, so no buffer
    /// or region is released while the kernel may still write it, then
    /// stops the reaper (a runtime task ends by itself; a runtime that is
    /// gone already took it).
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        self.shared.drain();
        self.shared.ring_completions_bell();
        if let Some(t) = self.reaper_thread.take() {
            let _ = t.join();
        }
    }
}

#[derive(Clone, Copy)]
struct InFlight {
    op: IoOp,
    done: u32,
}

/// The ring and everything about its operations. Only the holder of
/// `core` touches the ring's submission and completion queues, so any
/// thread may submit and the reaper may reap; the `io_uring_enter` that
/// hands new entries to the kernel runs outside the lock (the kernel
/// serialises it).
struct Shared {
    core: Mutex<RingState>,
    ring: IoUring,
    /// Registered with the ring: the kernel adds to it for every
    /// completion, and the reaper waits on it.
    completions_fd: OwnedFd,
    shutdown: AtomicBool,
    /// The pool's mapping outlives the ring's registration of it.
    pool: Arc<BufferPool>,
    fds: Vec<RawFd>,
    fixed_files: bool,
    fixed_buffers: bool,
    queue_depth_per_device_max: u32,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, RingState> {
        // Nothing under the lock panics but broken invariants (asserts),
        // after which the state must not be trusted.
        self.core.lock().expect("io_uring state poisoned")
    }

    /// The SQE that moves the rest of `f` (from `f.done` on) for `token`.
    fn build_sqe(
        &self,
        token: u64,
        f: &InFlight,
        foreign: &[Option<ForeignInFlight>],
    ) -> squeue::Entry {
        assert!(f.done < f.op.len);
        let (ptr, fixed_index) = if token >= FOREIGN_TOKEN_BASE {
            let slot = foreign[(token - FOREIGN_TOKEN_BASE) as usize]
                .as_ref()
                .expect("foreign op is recorded");
            (slot.read.target(f.done), slot.read.memory.fixed_buffer())
        } else {
            let index = token as u32;
            let (base, cap) = self.pool.buf_raw(index);
            assert!(f.op.len as usize <= cap);
            // SAFETY: `done < len <= cap`, so the pointer stays inside buffer
            // `index`, which is lent to this operation until its completion.
            let ptr = unsafe { base.add(f.done as usize) };
            (ptr, self.fixed_buffers.then_some(index as u16))
        };
        let len = f.op.len - f.done;
        let offset = f.op.offset + u64::from(f.done);
        let dev = f.op.device;
        macro_rules! with_fd {
            ($fd:expr) => {
                match (f.op.kind, fixed_index) {
                    (OpKind::Read, Some(i)) => opcode::ReadFixed::new($fd, ptr, len, i)
                        .offset(offset)
                        .build(),
                    (OpKind::Read, None) => opcode::Read::new($fd, ptr, len).offset(offset).build(),
                    (OpKind::Write, Some(i)) => {
                        opcode::WriteFixed::new($fd, ptr.cast_const(), len, i)
                            .offset(offset)
                            .build()
                    }
                    (OpKind::Write, None) => opcode::Write::new($fd, ptr.cast_const(), len)
                        .offset(offset)
                        .build(),
                }
            };
        }
        let sqe = if self.fixed_files {
            with_fd!(types::Fixed(dev))
        } else {
            with_fd!(types::Fd(self.fds[dev as usize]))
        };
        sqe.user_data(token)
    }

    /// Pushes what the queue depth allows, in sweep order per device.
    /// Needs the lock (`st` is its guard's content).
    fn push_deferred(&self, st: &mut RingState) {
        // SAFETY: the caller holds `core`, the only way to reach either
        // queue, so no other handle to the submission queue exists.
        let mut sq = unsafe { self.ring.submission_shared() };
        'devices: for (dev, queue) in st.deferred.iter_mut().enumerate() {
            while st.device_in_flight[dev] < self.queue_depth_per_device_max {
                let Some(token) = queue.peek() else {
                    break;
                };
                let f = recorded(&st.in_flight, &st.foreign, token);
                let sqe = self.build_sqe(token, &f, &st.foreign);
                // SAFETY: the memory behind the SQE is lent to this
                // operation (a pool buffer whose lease the slot machinery
                // holds, or foreign memory whose `Arc` its slot holds)
                // until `reap` completes it.
                if unsafe { sq.push(&sqe) }.is_err() {
                    break 'devices;
                }
                queue.pop();
                st.deferred_total -= 1;
                st.device_in_flight[dev] += 1;
                st.total_in_flight += 1;
            }
        }
        debug_assert_eq!(
            st.deferred_total,
            st.deferred.iter().map(Elevator::len).sum::<usize>(),
            "every waiting operation is in exactly one backlog"
        );
    }

    /// Hands the pushed entries to the kernel. The ring holds fewer
    /// operations than it has entries, so the kernel takes them all; a
    /// transient refusal (no memory for requests) is tried again a few
    /// times, and past that the entries stay queued for the next enter
    /// (every submission and every reaper turn makes one).
    fn enter(&self) {
        const BUSY_TRIES_MAX: u32 = 64;
        let mut busy_tries = 0;
        loop {
            match self.ring.submitter().submit() {
                Ok(_) => return,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e)
                    if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EBUSY))
                        && busy_tries < BUSY_TRIES_MAX =>
                {
                    busy_tries += 1;
                    std::thread::yield_now();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "io_uring_enter failed; entries stay queued");
                    return;
                }
            }
        }
    }

    /// Handles every completion: a short transfer goes on from where it
    /// stopped; anything else completes its operation and frees its
    /// slot. Then refills the devices from their backlogs.
    fn reap(&self, st: &mut RingState) {
        st.completions.clear();
        {
            // SAFETY: the caller holds `core` (see `push_deferred`).
            let cq = unsafe { self.ring.completion_shared() };
            st.completions
                .extend(cq.map(|c| (c.user_data(), c.result())));
        }
        for k in 0..st.completions.len() {
            let (token, result) = st.completions[k];
            let mut f = recorded(&st.in_flight, &st.foreign, token);
            let dev = f.op.device as usize;
            let outcome = if result > 0 && f.done + (result as u32) < f.op.len {
                // Short transfer: go on from where it stopped.
                f.done += result as u32;
                record(&mut st.in_flight, &mut st.foreign, token, f);
                let sqe = self.build_sqe(token, &f, &st.foreign);
                // SAFETY: as in `push_deferred`; the memory is still lent
                // to this op, and the caller holds `core`.
                if unsafe { self.ring.submission_shared().push(&sqe) }.is_ok() {
                    continue;
                }
                // Queue full: complete with what we have; the caller
                // sees a short transfer and fails the request.
                Ok(f.done as usize)
            } else if result < 0 {
                Err(io::Error::from_raw_os_error(-result))
            } else {
                Ok((f.done + result as u32) as usize)
            };
            if token >= FOREIGN_TOKEN_BASE {
                let slot = (token - FOREIGN_TOKEN_BASE) as usize;
                let done = st.foreign[slot]
                    .take()
                    .expect("completion of a recorded op");
                // The kernel is done with the target: its `Arc` may go.
                let _ = done.done.send(outcome);
                st.foreign_free.push(slot);
            } else {
                self.pool.complete(token as u32, outcome);
                st.in_flight[token as usize] = None;
            }
            st.device_in_flight[dev] -= 1;
            st.total_in_flight -= 1;
        }
        self.push_deferred(st);
    }

    /// One turn of the reaper: completions handled, backlogs refilled,
    /// new entries handed to the kernel.
    fn turn(&self) {
        {
            let mut st = self.lock();
            self.reap(&mut st);
        }
        self.enter();
    }

    /// Completes every operation, waiting for the kernel in this thread
    /// (at shutdown: the reaper may be gone with its runtime).
    fn drain(&self) {
        let wait = types::Timespec::new().nsec(10_000_000);
        loop {
            {
                let mut st = self.lock();
                self.reap(&mut st);
                if st.total_in_flight == 0 && st.deferred_total == 0 {
                    return;
                }
            }
            // Bounded: a reaper still running may take the completion
            // this wait is for.
            let args = types::SubmitArgs::new().timespec(&wait);
            match self.ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR)) => {}
                Err(e) => {
                    tracing::error!(error = %e, "io_uring_enter failed while draining");
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
        }
    }

    /// Wakes the reaper (at shutdown).
    fn ring_completions_bell(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live local to an eventfd we own;
        // the fd stays open for the life of `self`.
        let _ = unsafe {
            libc::write(
                self.completions_fd.as_raw_fd(),
                (&one as *const u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
    }
}

/// Borrows the completions eventfd for `AsyncFd` (the fd belongs to
/// `Shared`, which the reaper holds).
struct CompletionsFd(RawFd);

impl AsRawFd for CompletionsFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// The task that reaps completions: woken through the runtime's poller
/// when the kernel signals the ring's eventfd.
struct Reaper {
    /// Declared first, so it is deregistered before `shared` (which owns
    /// the descriptor) can go.
    fd: AsyncFd<CompletionsFd>,
    shared: Arc<Shared>,
}

impl Reaper {
    /// Registers the eventfd with `runtime`'s poller (hence the handle).
    fn new(shared: Arc<Shared>, runtime: &tokio::runtime::Handle) -> io::Result<Self> {
        let _entered = runtime.enter();
        // SAFETY: the descriptor belongs to `shared.completions_fd`, open
        // and the same for as long as `shared` lives; the returned
        // `AsyncFd` is dropped before this reaper's `shared` (field order).
        let fd = unsafe {
            AsyncFd::register_with_interest(
                CompletionsFd(shared.completions_fd.as_raw_fd()),
                Interest::READABLE,
            )
        }
        .map_err(|e| e.into_parts().1)?;
        Ok(Self { fd, shared })
    }

    async fn run(self) {
        loop {
            if self.shared.shutdown.load(Ordering::SeqCst) {
                return;
            }
            let mut ready = match self.fd.readable().await {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "io_uring reaper cannot poll its eventfd");
                    return;
                }
            };
            let mut counter = 0u64;
            let read = ready.try_io(|fd| {
                // SAFETY: reads 8 bytes into a live local from the
                // eventfd, which `Shared` keeps open while `self` lives.
                let r = unsafe {
                    libc::read(
                        fd.get_ref().0,
                        (&mut counter as *mut u64).cast(),
                        std::mem::size_of::<u64>(),
                    )
                };
                if r < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(())
                }
            });
            if let Ok(Err(e)) = read {
                tracing::error!(error = %e, "io_uring reaper cannot read its eventfd");
                return;
            }
            // Completions may be there even when the read found the
            // counter already taken (a drain reaped them): cheap to look.
            self.shared.turn();
        }
    }
}

/// The ring's bookkeeping, behind `Shared::core`.
struct RingState {
    /// Progress of each pool-buffer operation, by buffer index.
    in_flight: Vec<Option<InFlight>>,
    /// Foreign reads by slot, and the free slots.
    foreign: Vec<Option<ForeignInFlight>>,
    foreign_free: Vec<usize>,
    device_in_flight: Vec<u32>,
    total_in_flight: usize,
    /// Operations waiting for their device's queue depth, one backlog
    /// per device, served in C-SCAN order (see `elevator`): submitting
    /// looks only at devices with room, and refills each with the
    /// nearest next work of every request in flight.
    deferred: Vec<Elevator>,
    deferred_total: usize,
    completions: Vec<(u64, i32)>,
}

impl RingState {
    fn new(n_devices: usize, buffer_count: usize) -> Self {
        Self {
            in_flight: vec![None; buffer_count],
            foreign: (0..FOREIGN_READS_IN_FLIGHT_MAX).map(|_| None).collect(),
            foreign_free: (0..FOREIGN_READS_IN_FLIGHT_MAX).rev().collect(),
            device_in_flight: vec![0u32; n_devices],
            total_in_flight: 0,
            deferred: (0..n_devices).map(|_| Elevator::default()).collect(),
            deferred_total: 0,
            completions: Vec::with_capacity(buffer_count + FOREIGN_READS_IN_FLIGHT_MAX),
        }
    }
}

/// The progress record of `token`'s operation.
fn recorded(
    in_flight: &[Option<InFlight>],
    foreign: &[Option<ForeignInFlight>],
    token: u64,
) -> InFlight {
    if token >= FOREIGN_TOKEN_BASE {
        foreign[(token - FOREIGN_TOKEN_BASE) as usize]
            .as_ref()
            .expect("foreign op is recorded")
            .f
    } else {
        in_flight[token as usize].expect("pool op is recorded")
    }
}

fn record(
    in_flight: &mut [Option<InFlight>],
    foreign: &mut [Option<ForeignInFlight>],
    token: u64,
    f: InFlight,
) {
    if token >= FOREIGN_TOKEN_BASE {
        foreign[(token - FOREIGN_TOKEN_BASE) as usize]
            .as_mut()
            .expect("foreign op is recorded")
            .f = f;
    } else {
        in_flight[token as usize] = Some(f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::tests::{conformance, test_files, test_pool};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn uring_engine_conforms() {
        let dir = tempfile::tempdir().unwrap();
        let pool = test_pool();
        let engine = UringEngine::new(
            test_files(dir.path(), 2, 1 << 20),
            Arc::clone(&pool),
            EngineLimits {
                queue_depth_per_device_max: 4,
                psync_threads: 1,
            },
        )
        .expect("io_uring is available on the test machine");
        assert!(engine.uses_fixed_buffers());
        conformance(Arc::new(engine), pool).await;
    }

    fn engine_in(dir: &std::path::Path, pool: &Arc<BufferPool>) -> UringEngine {
        UringEngine::new(
            test_files(dir, 2, 1 << 20),
            Arc::clone(pool),
            EngineLimits {
                queue_depth_per_device_max: 4,
                psync_threads: 1,
            },
        )
        .expect("io_uring is available on the test machine")
    }

    /// Guards against an engine that completes nothing when its reaper
    /// shares one thread with the tasks waiting on it.
    #[tokio::test(flavor = "current_thread")]
    async fn uring_engine_conforms_on_a_current_thread_runtime() {
        let dir = tempfile::tempdir().unwrap();
        let pool = test_pool();
        let engine = engine_in(dir.path(), &pool);
        conformance(Arc::new(engine), pool).await;
    }

    /// Guards against an engine that needs a runtime to be opened in (a
    /// tool opening the pool from plain threads): it reaps on its own
    /// thread then, and serves futures awaited on any runtime.
    #[test]
    fn uring_engine_conforms_when_opened_outside_a_runtime() {
        let dir = tempfile::tempdir().unwrap();
        let pool = test_pool();
        let engine: Arc<dyn IoBackend> = Arc::new(engine_in(dir.path(), &pool));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(conformance(engine, pool));
    }

    /// Guards against memory released while the kernel may still write
    /// it: dropping the engine with reads in flight (their futures gone
    /// too) returns only once every read has completed and let its
    /// target go. The device is a pipe, so the reads wait until the test
    /// writes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropping_the_engine_waits_for_reads_in_flight() {
        let mut ends = [0 as libc::c_int; 2];
        // SAFETY: pipe2(2) fills the two-element array it is given.
        let made = unsafe { libc::pipe2(ends.as_mut_ptr(), libc::O_CLOEXEC) };
        assert_eq!(made, 0);
        // SAFETY: both descriptors are fresh and owned only here.
        let (device, mut writer) =
            unsafe { (File::from_raw_fd(ends[0]), File::from_raw_fd(ends[1])) };
        let dropped = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let memory = crate::engine::tests::TestMemory::new(1 << 20, Arc::clone(&dropped));
        let engine = UringEngine::new(
            vec![device],
            test_pool(),
            EngineLimits {
                queue_depth_per_device_max: 4,
                psync_threads: 1,
            },
        )
        .unwrap();
        for k in 0..4 {
            drop(engine.read_foreign(ForeignRead {
                device: 0,
                device_offset: 0,
                len: 4096,
                memory: memory.clone(),
                memory_offset: k * 4096,
            }));
        }
        let dropping = std::thread::spawn(move || drop(engine));
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(
            !dropping.is_finished(),
            "the engine went while its reads were waiting for data"
        );
        assert!(Arc::strong_count(&memory) > 1);
        use std::io::Write;
        writer.write_all(&[7u8; 4 * 4096]).unwrap();
        dropping.join().unwrap();
        assert_eq!(
            Arc::strong_count(&memory),
            1,
            "every read let its target go before the engine was gone"
        );
        assert_eq!(dropped.load(Ordering::SeqCst), 0);
        assert!(memory.bytes()[..4 * 4096].iter().all(|&b| b == 7));
    }
}
