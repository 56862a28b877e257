//! Fault injection through the engine trait, for tests.
//!
//! LD_PRELOAD cannot see io_uring I/O and there is no device-mapper here, so
//! faults are injected one level up: [`FaultyBackend`] wraps a real engine and
//! consults a [`FaultPlan`] on every operation. The fault model is small and
//! explicit: an operation matching a rule fails with an errno, or (for reads)
//! returns with one byte inverted; `fdatasync` of a device can fail.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::{ForeignRead, ForeignReadFuture, IoBackend, IoOp, OpKind};
use crate::buf::{BufLease, IoFuture};

/// What a matching operation suffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Fails without touching the device.
    Errno(i32),
    /// Reads succeed but byte `n` of the buffer is inverted.
    FlipByte(usize),
    /// Reads succeed but the byte at this device offset, if they cover it,
    /// is inverted: rot at one place, whichever read (merged or not) finds
    /// it.
    FlipAt(u64),
}

impl Fault {
    /// `FlipAt` as the buffer index it hits in `op`, if any.
    fn resolve(self, op: &IoOp) -> Option<Fault> {
        match self {
            Fault::FlipAt(at) => {
                let end = op.offset + u64::from(op.len);
                (op.offset <= at && at < end).then(|| Fault::FlipByte((at - op.offset) as usize))
            }
            other => Some(other),
        }
    }
}

/// One rule: which operations, what fault, how many times.
#[derive(Debug, Clone)]
pub struct FaultRule {
    pub device: Option<u32>,
    pub kind: Option<OpKind>,
    /// Operations whose byte range intersects `[start, end)` of the device.
    pub device_range: Option<(u64, u64)>,
    pub fault: Fault,
    /// `None` means forever.
    pub remaining: Option<u32>,
}

/// Shared, mutable fault configuration.
#[derive(Debug, Default)]
pub struct FaultPlan {
    rules: Mutex<Vec<FaultRule>>,
    fail_sync: AtomicBool,
}

impl FaultPlan {
    pub fn add(&self, rule: FaultRule) {
        self.rules.lock().expect("fault plan poisoned").push(rule);
    }

    pub fn clear(&self) {
        self.rules.lock().expect("fault plan poisoned").clear();
        self.fail_sync.store(false, Ordering::SeqCst);
    }

    pub fn set_fail_sync(&self, fail: bool) {
        self.fail_sync.store(fail, Ordering::SeqCst);
    }

    fn take(&self, op: &IoOp) -> Option<Fault> {
        let mut rules = self.rules.lock().expect("fault plan poisoned");
        let end = op.offset + u64::from(op.len);
        for rule in rules.iter_mut() {
            let hit = rule.device.is_none_or(|d| d == op.device)
                && rule.kind.is_none_or(|k| k == op.kind)
                && rule
                    .device_range
                    .is_none_or(|(s, e)| op.offset < e && s < end)
                && rule.remaining != Some(0);
            if hit {
                if let Some(n) = rule.remaining.as_mut() {
                    *n -= 1;
                }
                return Some(rule.fault);
            }
        }
        None
    }
}

/// A real engine with faults injected per [`FaultPlan`].
pub struct FaultyBackend {
    inner: Arc<dyn IoBackend>,
    plan: Arc<FaultPlan>,
}

impl FaultyBackend {
    pub fn new(inner: Arc<dyn IoBackend>, plan: Arc<FaultPlan>) -> Self {
        Self { inner, plan }
    }
}

impl IoBackend for FaultyBackend {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    fn submit(&self, op: IoOp, buf: BufLease) -> IoFuture {
        match self.plan.take(&op).and_then(|f| f.resolve(&op)) {
            None => self.inner.submit(op, buf),
            Some(Fault::Errno(errno)) => {
                IoFuture::ready(Err(io::Error::from_raw_os_error(errno)), buf)
            }
            Some(Fault::FlipByte(n)) if op.kind == OpKind::Read => {
                IoFuture::corrupted(self.inner.submit(op, buf), n)
            }
            Some(Fault::FlipByte(_) | Fault::FlipAt(_)) => self.inner.submit(op, buf),
        }
    }

    unsafe fn fix_foreign(&self, base: *mut u8, len: usize) -> Option<super::FixedForeign> {
        // SAFETY: the caller's promise, passed on unchanged.
        unsafe { self.inner.fix_foreign(base, len) }
    }

    fn read_foreign(&self, read: ForeignRead) -> ForeignReadFuture {
        let op = IoOp {
            kind: OpKind::Read,
            device: read.device,
            offset: read.device_offset,
            len: read.len,
        };
        if let Err(e) = read.check(self.device_count()) {
            return ForeignReadFuture::ready(Err(e));
        }
        match self.plan.take(&op).and_then(|f| f.resolve(&op)) {
            None | Some(Fault::FlipAt(_)) => self.inner.read_foreign(read),
            Some(Fault::Errno(errno)) => {
                ForeignReadFuture::ready(Err(io::Error::from_raw_os_error(errno)))
            }
            Some(Fault::FlipByte(n)) => {
                let inner = self.inner.read_foreign(read.clone());
                ForeignReadFuture::boxed(async move {
                    let done = inner.await?;
                    if n < done {
                        let target = read.target(n as u32);
                        // SAFETY: `check` passed, n < done <= len, and the
                        // read has completed, so the kernel no longer
                        // writes there; `read.memory` keeps it mapped.
                        unsafe { *target = !*target };
                    }
                    Ok(done)
                })
            }
        }
    }

    fn sync(&self, device: u32) -> io::Result<()> {
        if self.plan.fail_sync.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        self.inner.sync(device)
    }

    fn device_count(&self) -> u32 {
        self.inner.device_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::tests::{test_files, test_pool};
    use crate::engine::{EngineKind, EngineLimits, build, read_exact};

    #[tokio::test]
    async fn rules_fire_and_expire() {
        let dir = tempfile::tempdir().unwrap();
        let pool = test_pool();
        let inner = build(
            EngineKind::Psync,
            test_files(dir.path(), 1, 1 << 20),
            Arc::clone(&pool),
            EngineLimits {
                queue_depth_per_device_max: 4,
                psync_threads: 1,
            },
        )
        .unwrap();
        let plan = Arc::new(FaultPlan::default());
        let faulty = FaultyBackend::new(inner, Arc::clone(&plan));
        plan.add(FaultRule {
            device: Some(0),
            kind: Some(OpKind::Read),
            device_range: Some((4096, 8192)),
            fault: Fault::Errno(libc::EIO),
            remaining: Some(1),
        });
        plan.add(FaultRule {
            device: None,
            kind: None,
            device_range: Some((65536, 65537)),
            fault: Fault::FlipByte(3),
            remaining: None,
        });
        let b = pool.acquire(4096).await.unwrap();
        let e = read_exact(&faulty, 0, 4096, 4096, b).await.unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
        let b = pool.acquire(4096).await.unwrap();
        assert!(
            read_exact(&faulty, 0, 4096, 4096, b).await.is_ok(),
            "rule expired"
        );
        let b = pool.acquire(4096).await.unwrap();
        let b = read_exact(&faulty, 0, 65536, 4096, b).await.unwrap();
        assert_eq!(b.as_slice()[3], 0xff, "zeroed file byte 3 inverted");
        assert_eq!(b.as_slice()[2], 0);
        plan.set_fail_sync(true);
        assert!(faulty.sync(0).is_err());
    }
}
