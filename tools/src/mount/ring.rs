//! FUSE over io_uring: the kernel hands requests to this process through
//! io_uring command entries on `/dev/fuse` instead of `read`/`write` on
//! it (Linux 6.14+, `CONFIG_FUSE_IO_URING`, the `fuse` module's
//! `enable_uring` parameter).
//!
//! Why: a sample file costs the kernel four to five requests (lookup,
//! open, ioctl from Python's `isatty`, read, release), and on `/dev/fuse`
//! each one wakes a fuser thread wherever the scheduler finds one, often
//! on the other CPU (an inter-processor interrupt, expensive in a VM), then
//! costs a `read` and a `writev`. The kernel keeps one queue per CPU and
//! gives a request to the queue of the CPU its caller runs on; a thread
//! pinned to that CPU takes it, answers and fetches the next in one
//! `io_uring_enter`, and the caller wakes on the same CPU.
//!
//! Shape: `threads` threads, spread over the queues (one queue per
//! possible CPU, as the kernel counts them), each with its own small ring
//! and one entry (a header buffer and a payload buffer the size of the
//! largest request). One entry per thread keeps a thread's work
//! synchronous: a read that waits for storaged holds its thread only, and
//! the kernel gives the next request of that CPU to another free entry of
//! the same queue (or queues it until one commits). Requests the kernel
//! does not route through the ring (forget, interrupt) and those sent
//! before every queue had an entry still reach fuser's threads, which
//! keep reading `/dev/fuse`; both answer from the same [`Core`].
//!
//! The buffers are registered with the kernel, which writes requests into
//! them for as long as the connection lives: they are allocated once per
//! thread and never freed (the mount ends with its process).

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use io_uring::{IoUring, cqueue, opcode, squeue, types};

use super::fs::Core;
use super::ops;

/// `FUSE_IO_URING_CMD_REGISTER`: hand an entry's buffers to the kernel
/// and wait for a request (`include/uapi/linux/fuse.h`).
const CMD_REGISTER: u32 = 1;
/// `FUSE_IO_URING_CMD_COMMIT_AND_FETCH`: answer the entry's request and
/// wait for the next.
const CMD_COMMIT_AND_FETCH: u32 = 2;
/// `sizeof(struct fuse_uring_req_header)`: 128 bytes for the FUSE header
/// (`fuse_in_header` in, `fuse_out_header` out), 128 for the opcode's own
/// argument, 32 for `fuse_uring_ent_in_out`.
pub const HEADER_BYTES: usize = 288;
/// Offset of `fuse_uring_req_header.op_in`.
pub const OP_IN_AT: usize = 128;
/// Offset of `fuse_uring_req_header.ring_ent_in_out`.
pub const ENT_IN_OUT_AT: usize = 256;
/// How often a queue retries its registration while the kernel finishes
/// the handshake (`EAGAIN`), and how long it waits between tries.
const REGISTER_TRIES_MAX: u32 = 50;
const REGISTER_RETRY_WAIT: Duration = Duration::from_millis(20);

/// The exit status of a mount whose io_uring queue failed.
const EXIT_RING_FAILED: i32 = 70;

/// The fuse module's switch for FUSE over io_uring.
pub const ENABLE_URING: &str = "/sys/module/fuse/parameters/enable_uring";

/// Whether the kernel offers FUSE over io_uring to new mounts: it has
/// it (the parameter exists) and it is switched on.
pub fn offered() -> bool {
    std::fs::read_to_string(ENABLE_URING).is_ok_and(|v| v.trim() == "Y" || v.trim() == "1")
}

/// Why the io_uring queues could not start.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    #[error("cannot read the possible CPUs: {0}")]
    Cpus(std::io::Error),
    #[error("cannot duplicate the /dev/fuse descriptor: {0}")]
    Device(std::io::Error),
    #[error("cannot start a queue thread: {0}")]
    Thread(std::io::Error),
}

/// Starts the queues on connection `dev` (a descriptor of this mount's
/// `/dev/fuse`): `threads` threads (at least one per queue), answering
/// from `core`. `payload_bytes` is the largest request or answer the
/// kernel may put in one entry (its `max_pages` times the page size, at
/// least `max_write`). Returns once every thread runs; each registers
/// its entry on its own and ends when the connection does.
pub fn start(
    core: Arc<Core>,
    dev: &OwnedFd,
    threads: usize,
    payload_bytes: usize,
) -> Result<(), RingError> {
    let queues = possible_cpus().map_err(RingError::Cpus)?;
    let threads = threads.max(queues);
    for k in 0..threads {
        let qid = k % queues;
        let dev = dev.try_clone().map_err(RingError::Device)?;
        let core = Arc::clone(&core);
        std::thread::Builder::new()
            .name(format!("fuse-ring-{qid}"))
            .spawn(move || {
                pin_to_cpu(qid);
                if let Err(e) = serve(&core, &dev, qid as u16, payload_bytes) {
                    // Requests from this CPU could wait for ever on a
                    // queue with no entries left: fail stop, as a killed
                    // mount does (callers get ENOTCONN; the next mount
                    // here detaches it).
                    tracing::error!(qid, error = %e, "FUSE io_uring queue failed; exiting");
                    std::process::exit(EXIT_RING_FAILED);
                }
            })
            .map_err(RingError::Thread)?;
    }
    tracing::info!(queues, threads, "FUSE over io_uring");
    Ok(())
}

/// One entry of queue `qid`: registers it, then answers requests until
/// the connection ends.
fn serve(core: &Core, dev: &OwnedFd, qid: u16, payload_bytes: usize) -> std::io::Result<()> {
    // Never freed: the kernel may write into them until the connection
    // (which outlives this thread's ring only at process exit) lets go.
    // Kept as raw pointers: the kernel writes through them while a
    // command is out, so a Rust reference to them lives only between a
    // completion and the next submission.
    let header: *mut u8 = Box::leak(vec![0u8; HEADER_BYTES].into_boxed_slice()).as_mut_ptr();
    let payload: *mut u8 = Box::leak(vec![0u8; payload_bytes].into_boxed_slice()).as_mut_ptr();
    let iov: &'static [libc::iovec; 2] = Box::leak(Box::new([
        libc::iovec {
            iov_base: header.cast(),
            iov_len: HEADER_BYTES,
        },
        libc::iovec {
            iov_base: payload.cast(),
            iov_len: payload_bytes,
        },
    ]));
    let iov_addr = iov.as_ptr() as u64;
    let mut ring: IoUring<squeue::Entry128, cqueue::Entry> = IoUring::builder().build(2)?;
    let fd = types::Fd(dev.as_raw_fd());
    let mut tries = 0;
    let mut next = command(fd, CMD_REGISTER, qid, 0, Some(iov_addr));
    loop {
        // SAFETY: the entry points at `iov` and, through it, at `header`
        // and `payload`, all leaked above, so they stay valid for as long
        // as the kernel may use them.
        unsafe { ring.submission().push(&next) }.map_err(std::io::Error::other)?;
        let done = submit_and_complete(&mut ring)?;
        match done.result() {
            0 => {}
            r if r == -libc::EAGAIN && tries < REGISTER_TRIES_MAX => {
                // The handshake is not finished yet: the kernel has not
                // sized the ring's buffers.
                tries += 1;
                std::thread::sleep(REGISTER_RETRY_WAIT);
                continue;
            }
            // The connection ended (unmount) or the ring was stopped.
            r if r == -libc::ENOTCONN || r == -libc::ECANCELED || r == -libc::ECONNABORTED => {
                return Ok(());
            }
            r => return Err(std::io::Error::from_raw_os_error(-r)),
        }
        // SAFETY: the completion says the kernel has written the request
        // and holds the entry's buffers no longer until the next command
        // is submitted, after these slices are gone; both point into the
        // leaked allocations above, of these lengths.
        let (header_buf, payload_buf) = unsafe {
            (
                std::slice::from_raw_parts_mut(header, HEADER_BYTES),
                std::slice::from_raw_parts_mut(payload, payload_bytes),
            )
        };
        let unique = ops::answer(core, header_buf, payload_buf);
        next = command(fd, CMD_COMMIT_AND_FETCH, qid, unique, None);
    }
}

/// Hands the queued entry to the kernel and waits for the ring's next
/// completion. A signal (the mount's SIGTERM lands on any thread) only
/// restarts the wait: the entry is submitted once.
fn submit_and_complete(
    ring: &mut IoUring<squeue::Entry128, cqueue::Entry>,
) -> std::io::Result<cqueue::Entry> {
    while !ring.submission().is_empty() {
        match ring.submit() {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
    loop {
        if let Some(done) = ring.completion().next() {
            return Ok(done);
        }
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
}

/// An `IORING_OP_URING_CMD` entry for `/dev/fuse`: `cmd_op` with a
/// `fuse_uring_cmd_req` (flags 0, `commit_id`, `qid`) in the command
/// area, and for a registration the address of the entry's two iovecs.
fn command(
    fd: types::Fd,
    cmd_op: u32,
    qid: u16,
    commit_id: u64,
    iov_addr: Option<u64>,
) -> squeue::Entry128 {
    let mut cmd = [0u8; 80];
    cmd[8..16].copy_from_slice(&commit_id.to_ne_bytes());
    cmd[16..18].copy_from_slice(&qid.to_ne_bytes());
    let entry = opcode::UringCmd80::new(fd, cmd_op)
        .cmd(cmd)
        .addr(iov_addr)
        .build();
    match iov_addr {
        // The kernel wants the iovec count (2) in the entry's `len`,
        // which `UringCmd80` does not set.
        Some(_) => with_len(entry, 2),
        None => entry,
    }
}

/// `entry` with its `len` field (bytes 24-27 of the SQE) set to `len`.
fn with_len(entry: squeue::Entry128, len: u32) -> squeue::Entry128 {
    const _: () = assert!(std::mem::size_of::<squeue::Entry128>() == 128);
    // SAFETY: `Entry128` is a `repr(C)` pair of the kernel's 64-byte
    // `io_uring_sqe` and 64 more bytes, 128 bytes of plain integers with
    // no padding and no invalid bit patterns, so it round-trips through a
    // byte array unchanged.
    let mut bytes: [u8; 128] = unsafe { std::mem::transmute(entry) };
    bytes[24..28].copy_from_slice(&len.to_ne_bytes());
    // SAFETY: as above.
    unsafe { std::mem::transmute::<[u8; 128], squeue::Entry128>(bytes) }
}

/// How many CPUs the kernel may ever run (one queue each): the count of
/// `/sys/devices/system/cpu/possible` ("0-1", "0-3,8-11").
fn possible_cpus() -> std::io::Result<usize> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/possible")?;
    parse_cpu_list(text.trim()).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("unexpected CPU list {text:?}"),
        )
    })
}

/// The number of CPUs in a kernel CPU list such as "0-3,8-11".
fn parse_cpu_list(list: &str) -> Option<usize> {
    let mut count = 0usize;
    for part in list.split(',') {
        let (first, last) = match part.split_once('-') {
            Some((a, b)) => (a.parse::<usize>().ok()?, b.parse::<usize>().ok()?),
            None => {
                let a = part.parse::<usize>().ok()?;
                (a, a)
            }
        };
        count += last.checked_sub(first)? + 1;
    }
    (count > 0).then_some(count)
}

/// Runs this thread on `cpu` only, where the requests of queue `cpu`
/// come from; a CPU that is not online leaves it free to run anywhere.
fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET writes inside
    // it (it ignores CPUs past its size); sched_setaffinity reads it.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        tracing::debug!(cpu, error = %std::io::Error::last_os_error(), "queue thread not pinned");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_count_every_range() {
        assert_eq!(parse_cpu_list("0"), Some(1));
        assert_eq!(parse_cpu_list("0-1"), Some(2));
        assert_eq!(parse_cpu_list("0-3,8-11"), Some(8));
        assert_eq!(parse_cpu_list("0,2,4"), Some(3));
        assert_eq!(parse_cpu_list(""), None);
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("a-b"), None);
    }

    #[test]
    fn a_command_carries_its_queue_commit_id_and_iovec_count() {
        let entry = command(types::Fd(7), CMD_REGISTER, 3, 0x1122, Some(0xdead_beef));
        // SAFETY: see `with_len`.
        let bytes: [u8; 128] = unsafe { std::mem::transmute(entry) };
        assert_eq!(bytes[0], io_uring::opcode::UringCmd80::CODE);
        assert_eq!(i32::from_ne_bytes(bytes[4..8].try_into().unwrap()), 7);
        assert_eq!(
            u32::from_ne_bytes(bytes[8..12].try_into().unwrap()),
            CMD_REGISTER
        );
        assert_eq!(
            u64::from_ne_bytes(bytes[16..24].try_into().unwrap()),
            0xdead_beef
        );
        assert_eq!(u32::from_ne_bytes(bytes[24..28].try_into().unwrap()), 2);
        // The command area starts at byte 48: flags, commit_id, qid.
        assert_eq!(
            u64::from_ne_bytes(bytes[56..64].try_into().unwrap()),
            0x1122
        );
        assert_eq!(u16::from_ne_bytes(bytes[64..66].try_into().unwrap()), 3);
        let commit = command(types::Fd(7), CMD_COMMIT_AND_FETCH, 1, 9, None);
        // SAFETY: see `with_len`.
        let bytes: [u8; 128] = unsafe { std::mem::transmute(commit) };
        assert_eq!(u32::from_ne_bytes(bytes[24..28].try_into().unwrap()), 0);
        assert_eq!(u64::from_ne_bytes(bytes[16..24].try_into().unwrap()), 0);
    }
}
