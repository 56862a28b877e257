//! The io_uring engine: one thread owns one ring for all devices.
//!
//! Operations beyond a device's queue depth wait in a per-device backlog
//! served in C-SCAN order (`elevator`), so the device always gets the
//! nearest next piece of all the work in flight, not the oldest.
//!
//! On a 2-core machine a single ring thread keeps every device busy; more
//! threads would only compete with the tonic runtime. The thread registers the
//! pool's buffers (fixed buffers, `READ_FIXED`/`WRITE_FIXED`) and the device
//! files once, then loops: take new operations from the channel, push as many
//! as the per-device queue depth allows, submit them in one `io_uring_enter`,
//! and hand completions back to their buffers' slots.
//!
//! When idle the thread sleeps in `io_uring_enter` with an `eventfd` read
//! armed. A submitter writes the eventfd only if the thread said it is
//! sleeping, so a busy ring costs no extra syscall per operation.
//!
//! Reads into foreign memory (client regions) come on a second channel and
//! share the per-device queue depth; their user data is
//! `FOREIGN_TOKEN_BASE + slot`. The buffer table is registered sparse, with
//! `REGION_FIXED_SLOTS` spare entries after the pool's: a region is
//! registered into one when it is registered with storaged
//! (`fix_foreign`, an `IORING_REGISTER_BUFFERS_UPDATE` on the ring's fd,
//! safe beside `io_uring_enter` on the ring thread since the kernel
//! serialises both), and its reads are then `READ_FIXED`, which skips
//! pinning the client's pages for every I/O (15% of the server's CPU on
//! this path when they were plain `READ`s). A region that does not fit
//! (over 1 GiB, no free entry, the memlock limit) is read with plain
//! `READ`s.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use io_uring::{IoUring, opcode, squeue, types};

use super::elevator::Elevator;
use super::{
    EngineLimits, FOREIGN_READS_IN_FLIGHT_MAX, ForeignRead, ForeignReadFuture, IoBackend, IoOp,
    OpKind,
};
use crate::buf::{BufLease, BufferPool, IoFuture};

const WAKE_TOKEN: u64 = u64::MAX;
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

struct Submission {
    op: IoOp,
    index: u32,
}

struct ForeignSubmission {
    read: ForeignRead,
    done: futures::channel::oneshot::Sender<io::Result<usize>>,
}

/// A foreign read in the ring: it owns its target until completion.
struct ForeignInFlight {
    f: InFlight,
    read: ForeignRead,
    done: futures::channel::oneshot::Sender<io::Result<usize>>,
}

struct Wake {
    eventfd: OwnedFd,
    sleeping: AtomicBool,
    shutdown: AtomicBool,
}

impl Wake {
    fn ring_bell(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live local to an eventfd we own; the
        // fd stays open for the life of `self`.
        let _ = unsafe {
            libc::write(
                self.eventfd.as_raw_fd(),
                (&one as *const u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
    }
}

/// io_uring engine; see the module docs.
pub struct UringEngine {
    tx: crossbeam_channel::Sender<Submission>,
    foreign_tx: crossbeam_channel::Sender<ForeignSubmission>,
    wake: Arc<Wake>,
    files: Vec<File>,
    pool: Arc<BufferPool>,
    thread: Option<JoinHandle<()>>,
    fixed_buffers: bool,
    fixed_regions: Option<Arc<FixedTable>>,
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
        let eventfd = unsafe { OwnedFd::from_raw_fd(efd) };

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
            // SAFETY: every iovec points into the pool's mapping, which the
            // ring thread keeps alive (it holds an `Arc<BufferPool>`) until
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
        tracing::info!(
            ring_entries = entries,
            fixed_buffers,
            fixed_regions = fixed_regions.is_some(),
            fixed_files,
            devices = files.len(),
            "io_uring engine started"
        );

        let (tx, rx) = crossbeam_channel::bounded(buffers);
        let (foreign_tx, foreign_rx) = crossbeam_channel::bounded(FOREIGN_READS_IN_FLIGHT_MAX);
        let wake = Arc::new(Wake {
            eventfd,
            sleeping: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
        });
        let ring_thread = RingThread {
            ring,
            rx,
            foreign_rx,
            wake: Arc::clone(&wake),
            pool: Arc::clone(&pool),
            fds,
            fixed_files,
            fixed_buffers,
            queue_depth_per_device_max: limits.queue_depth_per_device_max.max(1),
        };
        let thread = std::thread::Builder::new()
            .name("storaged-uring".into())
            .spawn(move || ring_thread.run())?;
        Ok(Self {
            tx,
            foreign_tx,
            wake,
            files,
            pool,
            thread: Some(thread),
            fixed_buffers,
            fixed_regions,
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
        if self.tx.try_send(Submission { op, index }).is_err() {
            // Only reachable if the ring thread died; the slot must still be
            // completed exactly once.
            self.pool
                .complete(index, Err(io::Error::other("io_uring thread is gone")));
            return fut;
        }
        if self.wake.sleeping.swap(false, Ordering::SeqCst) {
            self.wake.ring_bell();
        }
        fut
    }

    fn read_foreign(&self, read: ForeignRead) -> ForeignReadFuture {
        if let Err(e) = read.check(self.files.len() as u32) {
            return ForeignReadFuture::ready(Err(e));
        }
        let (done, fut) = ForeignReadFuture::channel();
        if self
            .foreign_tx
            .try_send(ForeignSubmission { read, done })
            .is_err()
        {
            return ForeignReadFuture::ready(Err(io::Error::other(
                "io_uring foreign-read queue is full or its thread is gone",
            )));
        }
        if self.wake.sleeping.swap(false, Ordering::SeqCst) {
            self.wake.ring_bell();
        }
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
    fn drop(&mut self) {
        self.wake.shutdown.store(true, Ordering::SeqCst);
        self.wake.ring_bell();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[derive(Clone, Copy)]
struct InFlight {
    op: IoOp,
    done: u32,
}

struct RingThread {
    ring: IoUring,
    rx: crossbeam_channel::Receiver<Submission>,
    foreign_rx: crossbeam_channel::Receiver<ForeignSubmission>,
    wake: Arc<Wake>,
    pool: Arc<BufferPool>,
    fds: Vec<RawFd>,
    fixed_files: bool,
    fixed_buffers: bool,
    queue_depth_per_device_max: u32,
}

impl RingThread {
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

    fn run(mut self) {
        let mut st = RingState::new(self.fds.len(), self.pool.buffer_count());
        loop {
            let shutting_down = self.wake.shutdown.load(Ordering::SeqCst);
            if !st.bell_armed && !shutting_down {
                self.arm_bell(&mut st);
            }
            self.take_submissions(&mut st);
            self.submit_deferred(&mut st);
            debug_assert_eq!(
                st.deferred_total,
                st.deferred.iter().map(Elevator::len).sum::<usize>(),
                "every waiting operation is in exactly one backlog"
            );
            if shutting_down && st.total_in_flight == 0 && st.deferred_total == 0 && !st.bell_armed
            {
                break;
            }
            self.wait();
            self.reap(&mut st);
        }
    }

    /// Arms the read of the wake eventfd, so a submission from another
    /// thread ends the wait.
    fn arm_bell(&mut self, st: &mut RingState) {
        let sqe = opcode::Read::new(
            types::Fd(self.wake.eventfd.as_raw_fd()),
            (&mut *st.bell_buf as *mut u64).cast(),
            8,
        )
        .build()
        .user_data(WAKE_TOKEN);
        // SAFETY: `bell_buf` outlives the ring's use of it: `run` only
        // returns once this read has completed (`bell_armed` is false),
        // and `st` lives until then.
        if unsafe { self.ring.submission().push(&sqe) }.is_ok() {
            st.bell_armed = true;
        }
    }

    /// Moves new operations from the channels into their devices'
    /// backlogs (foreign reads only while a slot is free for them).
    fn take_submissions(&self, st: &mut RingState) {
        while let Ok(s) = self.rx.try_recv() {
            st.in_flight[s.index as usize] = Some(InFlight { op: s.op, done: 0 });
            st.deferred[s.op.device as usize].push(s.op.offset, u64::from(s.index));
            st.deferred_total += 1;
        }
        while let Some(&slot) = st.foreign_free.last() {
            let Ok(s) = self.foreign_rx.try_recv() else {
                break;
            };
            st.foreign_free.pop();
            let op = IoOp {
                kind: OpKind::Read,
                device: s.read.device,
                offset: s.read.device_offset,
                len: s.read.len,
            };
            st.foreign[slot] = Some(ForeignInFlight {
                f: InFlight { op, done: 0 },
                read: s.read,
                done: s.done,
            });
            st.deferred[op.device as usize].push(op.offset, FOREIGN_TOKEN_BASE + slot as u64);
            st.deferred_total += 1;
        }
    }

    /// Pushes what the queue depth allows, in sweep order per device.
    fn submit_deferred(&mut self, st: &mut RingState) {
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
                if unsafe { self.ring.submission().push(&sqe) }.is_err() {
                    break 'devices;
                }
                queue.pop();
                st.deferred_total -= 1;
                st.device_in_flight[dev] += 1;
                st.total_in_flight += 1;
            }
        }
    }

    /// Submits, and sleeps until a completion or a wake when nothing new
    /// waits in the channels.
    fn wait(&mut self) {
        self.wake.sleeping.store(true, Ordering::SeqCst);
        let wait_for = if self.rx.is_empty() && self.foreign_rx.is_empty() {
            1
        } else {
            0
        };
        let res = self.ring.submit_and_wait(wait_for);
        self.wake.sleeping.store(false, Ordering::SeqCst);
        if let Err(e) = res {
            match e.raw_os_error() {
                Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY) => {}
                _ => {
                    tracing::error!(error = %e, "io_uring_enter failed");
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
        }
    }

    /// Handles every completion: a short transfer goes on from where it
    /// stopped; anything else completes its operation and frees its slot.
    fn reap(&mut self, st: &mut RingState) {
        st.completions.clear();
        st.completions
            .extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        for k in 0..st.completions.len() {
            let (token, result) = st.completions[k];
            if token == WAKE_TOKEN {
                st.bell_armed = false;
                continue;
            }
            let mut f = recorded(&st.in_flight, &st.foreign, token);
            let dev = f.op.device as usize;
            let outcome = if result > 0 && f.done + (result as u32) < f.op.len {
                // Short transfer: go on from where it stopped.
                f.done += result as u32;
                record(&mut st.in_flight, &mut st.foreign, token, f);
                let sqe = self.build_sqe(token, &f, &st.foreign);
                // SAFETY: as in `submit_deferred`; the memory is still lent
                // to this op.
                if unsafe { self.ring.submission().push(&sqe) }.is_ok() {
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
    }
}

/// What the ring thread tracks between turns of its loop.
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
    /// Target of the armed eventfd read; boxed so its address is stable
    /// while the kernel may write it.
    bell_buf: Box<u64>,
    bell_armed: bool,
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
            completions: Vec::with_capacity(buffer_count + FOREIGN_READS_IN_FLIGHT_MAX + 1),
            bell_buf: Box::new(0u64),
            bell_armed: false,
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
}
