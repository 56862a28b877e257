//! Aligned I/O buffers, allocated once at start, leased per operation.
//!
//! The pool is one anonymous memory mapping (page aligned, so every buffer is
//! 4 KiB aligned as O_DIRECT needs) carved into size classes of fixed-size
//! buffers. The io_uring engine registers every buffer with its ring once, so
//! reads and writes use `READ_FIXED`/`WRITE_FIXED` and the kernel pins the
//! pages a single time instead of per operation.
//!
//! A [`BufLease`] is exclusive ownership of one buffer; dropping it returns
//! the buffer to its class. Acquiring waits on a semaphore, which is what
//! bounds the bytes in flight in the whole daemon.
//!
//! Each buffer also owns a completion slot. While an operation is in flight
//! the lease is "lent to the kernel": the submitter holds only an [`IoFuture`]
//! naming the buffer index. Whoever finishes last between the kernel's
//! completion and the future's drop returns the buffer, so a cancelled request
//! can never free or reuse memory the kernel still writes into (the model is
//! tokio-uring's `Op` drop). Nothing here allocates after start.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures::task::AtomicWaker;
use memmap2::MmapMut;
use tokio::sync::Semaphore;

use crate::budget::{Budget, Charge, ClassOfPool};

/// O_DIRECT alignment for offsets, lengths and buffer addresses.
pub const ALIGN_BYTES: usize = storaged_proto::model::DIRECT_IO_ALIGN_BYTES;

/// One size class of the pool: `count` buffers of `buf_bytes` each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClassSpec {
    pub buf_bytes: usize,
    pub count: usize,
}

struct SizeClass {
    buf_bytes: usize,
    first_index: u32,
    count: u32,
    region_offset: usize,
    free: Mutex<Vec<u32>>,
    permits: Semaphore,
}

const SLOT_IDLE: u8 = 0;
const SLOT_IN_FLIGHT: u8 = 1;
const SLOT_DONE: u8 = 2;
const SLOT_ABANDONED: u8 = 3;

/// Completion cell of one buffer. `result` is bytes transferred, or a
/// negated errno.
struct Slot {
    state: AtomicU8,
    result: AtomicI64,
    waker: AtomicWaker,
}

/// The daemon's I/O buffers. Shared by `Arc`; see the module docs.
pub struct BufferPool {
    region: MmapMut,
    classes: Vec<SizeClass>,
    slots: Vec<Slot>,
    /// What each leased buffer holds of a connection's or tenant's budget
    /// (see `budget`), given back with the buffer.
    charges: Vec<Mutex<Option<Charge>>>,
}

impl std::fmt::Debug for BufferPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BufferPool")
            .field("classes", &self.class_specs())
            .finish()
    }
}

impl BufferPool {
    /// Allocates every buffer up front. Classes must have sizes that are
    /// non-zero multiples of [`ALIGN_BYTES`]; they are sorted by size.
    pub fn new(mut specs: Vec<ClassSpec>) -> io::Result<Arc<Self>> {
        specs.sort_by_key(|s| s.buf_bytes);
        let mut total_bytes = 0usize;
        let mut total_count = 0usize;
        let mut classes = Vec::with_capacity(specs.len());
        for spec in &specs {
            if spec.buf_bytes == 0 || spec.buf_bytes % ALIGN_BYTES != 0 || spec.count == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("bad buffer class {spec:?}: sizes must be non-zero multiples of 4 KiB"),
                ));
            }
            classes.push(SizeClass {
                buf_bytes: spec.buf_bytes,
                first_index: u32::try_from(total_count).expect("buffer count fits u32"),
                count: u32::try_from(spec.count).expect("buffer count fits u32"),
                region_offset: total_bytes,
                free: Mutex::new((0..spec.count as u32).rev().collect()),
                permits: Semaphore::new(spec.count),
            });
            total_bytes += spec.buf_bytes * spec.count;
            total_count += spec.count;
        }
        let region = MmapMut::map_anon(total_bytes.max(ALIGN_BYTES))?;
        // Huge pages where the kernel grants them (THP `madvise` or
        // `always`): a device read into physically contiguous memory is one
        // segment instead of one per 4 KiB page, which this VM's virtio
        // disk serves markedly faster (BENCHMARKS.md, "Huge pages"). The
        // pages are faulted in when the engine registers (pins) them.
        let _ = region.advise(memmap2::Advice::HugePage);
        let slots = (0..total_count)
            .map(|_| Slot {
                state: AtomicU8::new(SLOT_IDLE),
                result: AtomicI64::new(0),
                waker: AtomicWaker::new(),
            })
            .collect();
        let charges = (0..total_count).map(|_| Mutex::new(None)).collect();
        Ok(Arc::new(Self {
            region,
            classes,
            slots,
            charges,
        }))
    }

    pub fn class_specs(&self) -> Vec<ClassSpec> {
        self.classes
            .iter()
            .map(|c| ClassSpec {
                buf_bytes: c.buf_bytes,
                count: c.count as usize,
            })
            .collect()
    }

    /// (bytes in all buffers, bytes in buffers leased now).
    pub fn bytes_in_use(&self) -> (u64, u64) {
        let mut total = 0u64;
        let mut leased = 0u64;
        for c in &self.classes {
            let bytes = c.buf_bytes as u64;
            total += u64::from(c.count) * bytes;
            leased +=
                (c.count as usize).saturating_sub(c.permits.available_permits()) as u64 * bytes;
        }
        (total, leased)
    }

    /// Total number of buffers, which is also the most operations that can
    /// ever be in flight at once.
    pub fn buffer_count(&self) -> usize {
        self.slots.len()
    }

    /// Largest buffer the pool hands out.
    pub fn buf_bytes_max(&self) -> usize {
        self.classes.last().map_or(0, |c| c.buf_bytes)
    }

    /// `(address, length)` of every buffer, in index order, for registering
    /// with io_uring.
    pub fn iovecs(&self) -> Vec<libc::iovec> {
        let mut out = Vec::with_capacity(self.slots.len());
        for class in &self.classes {
            for i in 0..class.count {
                out.push(libc::iovec {
                    iov_base: self.buf_ptr_in(class, class.first_index + i).cast(),
                    iov_len: class.buf_bytes,
                });
            }
        }
        out
    }

    fn class_of_index(&self, index: u32) -> &SizeClass {
        self.classes
            .iter()
            .find(|c| index >= c.first_index && index < c.first_index + c.count)
            .expect("buffer index belongs to a class")
    }

    fn buf_ptr_in(&self, class: &SizeClass, index: u32) -> *mut u8 {
        let offset = class.region_offset + (index - class.first_index) as usize * class.buf_bytes;
        assert!(offset + class.buf_bytes <= self.region.len());
        // SAFETY: `offset + buf_bytes` lies inside the mapping (asserted
        // above), so the resulting pointer stays within the same allocation.
        unsafe { self.region.as_ptr().cast_mut().add(offset) }
    }

    /// Address and capacity of buffer `index`.
    pub fn buf_raw(&self, index: u32) -> (*mut u8, usize) {
        let class = self.class_of_index(index);
        (self.buf_ptr_in(class, index), class.buf_bytes)
    }

    fn class_for(&self, len: usize) -> io::Result<&SizeClass> {
        self.classes
            .iter()
            .find(|c| c.buf_bytes >= len)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "I/O of {len} bytes exceeds the largest buffer ({} bytes)",
                        self.buf_bytes_max()
                    ),
                )
            })
    }

    /// Waits for `n` buffers that each hold at least `len` bytes, taken all
    /// at once so that two requests each holding part of what they need
    /// cannot deadlock. Inside a [`Budget`](crate::budget::Budget) scope
    /// the buffers are charged to it first, so a connection or tenant over
    /// its budget waits without taking pool buffers from anyone.
    pub async fn acquire_many(self: &Arc<Self>, len: usize, n: usize) -> io::Result<Vec<BufLease>> {
        let class = self.class_for(len)?;
        if n > class.count as usize {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "request needs {n} buffers of {} bytes; the pool has {}",
                    class.buf_bytes, class.count
                ),
            ));
        }
        let mut charges = Budget::charge_current(
            ClassOfPool {
                buf_bytes: class.buf_bytes,
                count: class.count as usize,
                pool_bytes: self.region.len(),
            },
            n,
        )
        .await;
        let permits = class
            .permits
            .acquire_many(n as u32)
            .await
            .map_err(|_| io::Error::other("buffer pool closed"))?;
        permits.forget();
        let mut free = class.free.lock().expect("buffer free list poisoned");
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let local = free.pop().expect("a permit guarantees a free buffer");
            if let Some(charges) = &mut charges {
                *self.charges[(class.first_index + local) as usize]
                    .lock()
                    .expect("buffer charge poisoned") = charges.pop();
            }
            out.push(BufLease {
                pool: Arc::clone(self),
                index: class.first_index + local,
                len: 0,
            });
        }
        Ok(out)
    }

    /// One buffer of at least `len` bytes if one is free right now; never
    /// waits (opportunistic work such as read-ahead must not queue behind,
    /// or hold buffers while waiting for, the reads it is meant to help).
    pub fn try_acquire(self: &Arc<Self>, len: usize) -> Option<BufLease> {
        let class = self.class_for(len).ok()?;
        let permit = class.permits.try_acquire().ok()?;
        permit.forget();
        let local = class
            .free
            .lock()
            .expect("buffer free list poisoned")
            .pop()
            .expect("a permit guarantees a free buffer");
        Some(BufLease {
            pool: Arc::clone(self),
            index: class.first_index + local,
            len: 0,
        })
    }

    /// [`try_acquire`](Self::try_acquire), but only while more than half
    /// of the buffers of `len`'s class are free: opportunistic work that
    /// holds its buffers for a while (read-ahead entries wait to be read)
    /// must leave foreground reads of the same size buffers to take, or
    /// they would wait on work that waits on them. Concurrent callers may
    /// take a buffer or two past the half; never the whole class.
    pub fn try_acquire_spare(self: &Arc<Self>, len: usize) -> Option<BufLease> {
        let class = self.class_for(len).ok()?;
        if class.permits.available_permits() <= class.count as usize / 2 {
            return None;
        }
        self.try_acquire(len)
    }

    /// Waits for one buffer of at least `len` bytes.
    pub async fn acquire(self: &Arc<Self>, len: usize) -> io::Result<BufLease> {
        let mut v = self.acquire_many(len, 1).await?;
        Ok(v.pop().expect("one lease"))
    }

    fn release(&self, index: u32) {
        // The budget first, so a holder waiting on it finds the buffer too.
        drop(
            self.charges[index as usize]
                .lock()
                .expect("buffer charge poisoned")
                .take(),
        );
        let class = self.class_of_index(index);
        let slot = &self.slots[index as usize];
        debug_assert_eq!(slot.state.load(Ordering::Acquire), SLOT_IDLE);
        class
            .free
            .lock()
            .expect("buffer free list poisoned")
            .push(index - class.first_index);
        class.permits.add_permits(1);
    }

    /// Records the kernel's (or worker's) completion of the operation on
    /// buffer `index`. Called exactly once per submitted operation.
    pub fn complete(self: &Arc<Self>, index: u32, result: io::Result<usize>) {
        let slot = &self.slots[index as usize];
        let raw = match result {
            Ok(n) => n as i64,
            Err(e) => -(e.raw_os_error().unwrap_or(libc::EIO) as i64),
        };
        slot.result.store(raw, Ordering::Release);
        match slot.state.compare_exchange(
            SLOT_IN_FLIGHT,
            SLOT_DONE,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => slot.waker.wake(),
            Err(SLOT_ABANDONED) => {
                // The future was dropped while the kernel owned the buffer;
                // only now is it safe to hand the buffer out again.
                slot.state.store(SLOT_IDLE, Ordering::Release);
                self.release(index);
            }
            Err(other) => panic!("completion of buffer {index} in state {other}"),
        }
    }
}

/// Exclusive ownership of one pool buffer. `len` is how many leading bytes
/// hold meaningful data.
pub struct BufLease {
    pool: Arc<BufferPool>,
    index: u32,
    len: usize,
}

impl std::fmt::Debug for BufLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BufLease")
            .field("index", &self.index)
            .field("len", &self.len)
            .finish()
    }
}

impl BufLease {
    pub fn index(&self) -> u32 {
        self.index
    }

    pub fn capacity(&self) -> usize {
        self.pool.buf_raw(self.index).1
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.capacity(), "len {len} over capacity");
        self.len = len;
    }

    /// The whole buffer, for filling.
    pub fn as_mut_full(&mut self) -> &mut [u8] {
        let (ptr, cap) = self.pool.buf_raw(self.index);
        // SAFETY: this lease is the only owner of buffer `index` (the free
        // list hands each index to one lease at a time), so no other
        // reference to these bytes exists while `&mut self` is held.
        unsafe { std::slice::from_raw_parts_mut(ptr, cap) }
    }

    /// The meaningful bytes.
    pub fn as_slice(&self) -> &[u8] {
        let (ptr, _) = self.pool.buf_raw(self.index);
        // SAFETY: exclusive ownership as in `as_mut_full`; `len` never
        // exceeds the capacity (checked in `set_len`).
        unsafe { std::slice::from_raw_parts(ptr, self.len) }
    }

    /// Turns the lease into the shared `Bytes` type without copying; the
    /// buffer returns to the pool when the last `Bytes` clone is dropped.
    pub fn into_bytes(self) -> bytes::Bytes {
        bytes::Bytes::from_owner(self)
    }

    /// Hands the buffer to an engine for one operation: the returned future
    /// owns it until the engine calls [`BufferPool::complete`].
    pub fn lend_to_kernel(self) -> IoFuture {
        let slot = &self.pool.slots[self.index as usize];
        let prev = slot.state.swap(SLOT_IN_FLIGHT, Ordering::AcqRel);
        assert_eq!(prev, SLOT_IDLE, "buffer {} lent twice", self.index);
        let me = std::mem::ManuallyDrop::new(self);
        IoFuture {
            inner: IoFutureInner::Pending {
                // SAFETY: `me` is never dropped, so reading the Arc out of it
                // moves ownership of the reference count instead of
                // duplicating it.
                pool: unsafe { std::ptr::read(&me.pool) },
                index: me.index,
                len: me.len,
            },
        }
    }
}

impl AsRef<[u8]> for BufLease {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl Drop for BufLease {
    fn drop(&mut self) {
        self.pool.release(self.index);
    }
}

/// Result of one engine operation: bytes transferred, and the buffer back.
pub type BufResult = (io::Result<usize>, BufLease);

enum IoFutureInner {
    Pending {
        pool: Arc<BufferPool>,
        index: u32,
        len: usize,
    },
    Ready(Option<BufResult>),
    /// Fault injection: flips one byte of the buffer once the read is done.
    Corrupt {
        inner: Box<IoFuture>,
        flip_at: usize,
    },
    /// Any future over a lease (fault injection: delays, torn writes).
    Boxed(Pin<Box<dyn Future<Output = BufResult> + Send>>),
    Taken,
}

/// The pending result of an operation lent to an engine. Dropping it before
/// completion is safe: the buffer returns to the pool only after the engine
/// completes the operation.
pub struct IoFuture {
    inner: IoFutureInner,
}

impl std::fmt::Debug for IoFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IoFuture")
    }
}

impl IoFuture {
    /// An operation that finished without reaching an engine.
    pub fn ready(result: io::Result<usize>, buf: BufLease) -> Self {
        Self {
            inner: IoFutureInner::Ready(Some((result, buf))),
        }
    }

    /// A future that resolves with a lease and a result of its own making.
    /// The lease it holds is returned to the pool when it is dropped, so
    /// it must own any engine operation on that lease as an [`IoFuture`].
    pub fn boxed(f: impl Future<Output = BufResult> + Send + 'static) -> Self {
        Self {
            inner: IoFutureInner::Boxed(Box::pin(f)),
        }
    }

    /// Wraps a read so that byte `flip_at` of its buffer is inverted.
    pub fn corrupted(inner: IoFuture, flip_at: usize) -> Self {
        Self {
            inner: IoFutureInner::Corrupt {
                inner: Box::new(inner),
                flip_at,
            },
        }
    }
}

impl Future for IoFuture {
    type Output = BufResult;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<BufResult> {
        match &mut self.inner {
            IoFutureInner::Pending { pool, index, len } => {
                let slot = &pool.slots[*index as usize];
                slot.waker.register(cx.waker());
                if slot.state.load(Ordering::Acquire) != SLOT_DONE {
                    return Poll::Pending;
                }
                slot.state.store(SLOT_IDLE, Ordering::Release);
                let raw = slot.result.load(Ordering::Acquire);
                let lease = BufLease {
                    pool: Arc::clone(pool),
                    index: *index,
                    len: *len,
                };
                self.inner = IoFutureInner::Taken;
                let result = if raw < 0 {
                    Err(io::Error::from_raw_os_error((-raw) as i32))
                } else {
                    Ok(raw as usize)
                };
                Poll::Ready((result, lease))
            }
            IoFutureInner::Ready(r) => {
                let r = r.take().expect("IoFuture polled after completion");
                Poll::Ready(r)
            }
            IoFutureInner::Boxed(f) => f.as_mut().poll(cx),
            IoFutureInner::Corrupt { inner, flip_at } => {
                let (res, mut buf) = std::task::ready!(Pin::new(inner.as_mut()).poll(cx));
                if res.is_ok() && *flip_at < buf.len() {
                    let at = *flip_at;
                    buf.as_mut_full()[at] ^= 0xff;
                }
                Poll::Ready((res, buf))
            }
            IoFutureInner::Taken => panic!("IoFuture polled after completion"),
        }
    }
}

impl Drop for IoFuture {
    fn drop(&mut self) {
        if let IoFutureInner::Pending { pool, index, .. } = &self.inner {
            let slot = &pool.slots[*index as usize];
            match slot.state.compare_exchange(
                SLOT_IN_FLIGHT,
                SLOT_ABANDONED,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                // The engine will release the buffer when the kernel is done.
                Ok(_) => {}
                Err(SLOT_DONE) => {
                    slot.state.store(SLOT_IDLE, Ordering::Release);
                    pool.release(*index);
                }
                Err(other) => panic!("dropping IoFuture of buffer {index} in state {other}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Guards against a pool whose pages can never be huge: its mapping
    /// asks for them (`hg` among the VmFlags of /proc/self/smaps).
    #[test]
    fn the_pool_asks_for_huge_pages() {
        let pool = pool();
        let header = format!("{:x}-", pool.region.as_ptr() as usize);
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let flags = smaps
            .lines()
            .skip_while(|l| !l.starts_with(&header))
            .find_map(|l| l.strip_prefix("VmFlags:"))
            .expect("the pool's mapping is in smaps");
        assert!(flags.split_whitespace().any(|f| f == "hg"), "{flags}");
    }

    fn pool() -> Arc<BufferPool> {
        BufferPool::new(vec![
            ClassSpec {
                buf_bytes: 8192,
                count: 2,
            },
            ClassSpec {
                buf_bytes: 4096,
                count: 3,
            },
        ])
        .unwrap()
    }

    #[tokio::test]
    async fn buffers_are_aligned_and_classed() {
        let p = pool();
        assert_eq!(p.buffer_count(), 5);
        for iov in p.iovecs() {
            assert_eq!(iov.iov_base as usize % ALIGN_BYTES, 0);
        }
        let small = p.acquire(100).await.unwrap();
        assert_eq!(small.capacity(), 4096);
        let big = p.acquire(5000).await.unwrap();
        assert_eq!(big.capacity(), 8192);
        assert!(p.acquire(9000).await.is_err());
        assert!(p.acquire_many(8192, 3).await.is_err());
    }

    #[tokio::test]
    async fn try_acquire_never_waits() {
        let p = pool();
        let held = p.acquire_many(8192, 2).await.unwrap();
        assert!(p.try_acquire(8192).is_none(), "class exhausted");
        assert!(p.try_acquire_spare(8192).is_none(), "nothing spare either");
        assert!(p.try_acquire(9000).is_none(), "too large");
        let small = p.try_acquire(10).unwrap();
        assert_eq!(small.capacity(), 4096);
        drop(held);
        assert_eq!(p.try_acquire(8192).unwrap().capacity(), 8192);
        // Spare: of the two 8 KiB buffers, one may go; the other stays for
        // reads that wait.
        let spare = p.try_acquire_spare(8192).unwrap();
        assert!(
            p.try_acquire_spare(8192).is_none(),
            "half the class stays free"
        );
        assert!(p.try_acquire(8192).is_some(), "for those who need it");
        drop(spare);
    }

    #[tokio::test]
    async fn completion_returns_buffer_to_future() {
        let p = pool();
        let mut lease = p.acquire(4096).await.unwrap();
        lease.set_len(4096);
        let idx = lease.index();
        let fut = lease.lend_to_kernel();
        p.complete(idx, Ok(4096));
        let (res, lease) = fut.await;
        assert_eq!(res.unwrap(), 4096);
        assert_eq!(lease.index(), idx);
    }

    // Guards against a cancelled request freeing a buffer the kernel still
    // writes into: the buffer must stay out of the pool until completion.
    #[tokio::test]
    async fn cancelled_future_keeps_buffer_until_completion() {
        let p = pool();
        let mut leases = p.acquire_many(4096, 3).await.unwrap();
        let victim = leases.pop().unwrap();
        let idx = victim.index();
        drop(victim.lend_to_kernel());
        drop(leases);
        // Two buffers are back, the in-flight one is not.
        let two = p.acquire_many(4096, 2).await.unwrap();
        let third =
            tokio::time::timeout(std::time::Duration::from_millis(50), p.acquire(4096)).await;
        assert!(third.is_err(), "in-flight buffer was handed out again");
        p.complete(idx, Err(io::Error::from_raw_os_error(libc::EIO)));
        let third = p.acquire(4096).await.unwrap();
        assert_eq!(third.index(), idx);
        drop(two);
    }

    #[tokio::test]
    async fn error_results_carry_errno() {
        let p = pool();
        let lease = p.acquire(1).await.unwrap();
        let idx = lease.index();
        let fut = lease.lend_to_kernel();
        p.complete(idx, Err(io::Error::from_raw_os_error(libc::ENOSPC)));
        let (res, _lease) = fut.await;
        assert_eq!(res.unwrap_err().raw_os_error(), Some(libc::ENOSPC));
    }

    #[tokio::test]
    async fn lease_into_bytes_returns_on_drop() {
        let p = BufferPool::new(vec![ClassSpec {
            buf_bytes: 4096,
            count: 1,
        }])
        .unwrap();
        let mut lease = p.acquire(10).await.unwrap();
        lease.as_mut_full()[..3].copy_from_slice(b"abc");
        lease.set_len(3);
        let b = lease.into_bytes();
        assert_eq!(&b[..], b"abc");
        let s = b.slice(1..);
        drop(b);
        assert_eq!(&s[..], b"bc");
        drop(s);
        let _again = p.acquire(10).await.unwrap();
    }
}
