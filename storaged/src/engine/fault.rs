//! Fault injection through the engine trait, for tests and campaigns.
//!
//! LD_PRELOAD cannot see io_uring I/O and there is no device-mapper here, so
//! faults are injected one level up, by wrapping a real engine:
//!
//! - [`FaultyBackend`] consults a [`FaultPlan`] of explicit rules (unit
//!   tests): an operation matching a rule fails with an errno, or (for
//!   reads) returns with one byte inverted; `fdatasync` of a device can fail.
//! - [`SeededBackend`] draws faults at random from a [`FaultSpec`] (the
//!   hidden `storaged serve --fault-inject SPEC`): EIO on reads or writes,
//!   bit flips in returned data, added latency, torn writes (only the first
//!   half reaches the device, success is reported), a device that
//!   disappears after N operations, and fdatasync failures. Every decision
//!   is a pure function of the seed and the operation's sequence number, so
//!   a run with the same seed and the same operation order injects the same
//!   faults; the seed is logged at start.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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

    fn discard(&self, device: u32, offset: u64, len: u64) -> io::Result<()> {
        self.inner.discard(device, offset, len)
    }

    fn device_count(&self) -> u32 {
        self.inner.device_count()
    }
}

/// Seeded random faults; parsed from `key=value` pairs separated by commas:
///
/// `seed=42,read_eio=0.001,write_eio=0,flip=0.01,latency_ms=5,latency=0.01,torn=0.001,vanish=2@5000,fsync_fail=0.5`
///
/// Probabilities are per operation (0 to 1). `vanish=D@N`: device D fails
/// every operation with ENODEV from its N-th operation on. Any key may be
/// left out (probability 0, no vanishing).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FaultSpec {
    pub seed: u64,
    pub read_eio: f64,
    pub write_eio: f64,
    pub flip: f64,
    pub latency_ms: u64,
    pub latency: f64,
    pub torn: f64,
    pub vanish: Option<(u32, u64)>,
    pub fsync_fail: f64,
}

impl std::str::FromStr for FaultSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut spec = FaultSpec::default();
        for part in s.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?} is not key=value"))?;
            let p = || -> Result<f64, String> {
                v.parse::<f64>()
                    .ok()
                    .filter(|p| (0.0..=1.0).contains(p))
                    .ok_or_else(|| format!("{k}={v}: a probability from 0 to 1 is needed"))
            };
            let n = || -> Result<u64, String> {
                v.parse::<u64>()
                    .map_err(|_| format!("{k}={v}: a whole number is needed"))
            };
            match k {
                "seed" => spec.seed = n()?,
                "read_eio" => spec.read_eio = p()?,
                "write_eio" => spec.write_eio = p()?,
                "flip" => spec.flip = p()?,
                "latency_ms" => spec.latency_ms = n()?.min(10_000),
                "latency" => spec.latency = p()?,
                "torn" => spec.torn = p()?,
                "fsync_fail" => spec.fsync_fail = p()?,
                "vanish" => {
                    let (d, at) = v
                        .split_once('@')
                        .ok_or_else(|| format!("vanish={v}: use DEVICE@OPERATIONS"))?;
                    let d = d.parse().map_err(|_| format!("vanish={v}: bad device"))?;
                    let at = at.parse().map_err(|_| format!("vanish={v}: bad count"))?;
                    spec.vanish = Some((d, at));
                }
                other => {
                    return Err(format!(
                        "unknown key {other:?} (seed, read_eio, write_eio, flip, latency_ms, latency, torn, vanish, fsync_fail)"
                    ));
                }
            }
        }
        Ok(spec)
    }
}

/// Counts of what a [`SeededBackend`] injected.
#[derive(Debug, Default)]
pub struct InjectedCounts {
    pub read_eio: AtomicU64,
    pub write_eio: AtomicU64,
    pub flips: AtomicU64,
    pub delays: AtomicU64,
    pub torn: AtomicU64,
    pub vanished_ops: AtomicU64,
    pub fsync_failures: AtomicU64,
}

impl InjectedCounts {
    /// Faults injected in all (delays are not faults).
    pub fn total(&self) -> u64 {
        [
            &self.read_eio,
            &self.write_eio,
            &self.flips,
            &self.torn,
            &self.vanished_ops,
            &self.fsync_failures,
        ]
        .into_iter()
        .map(|c| c.load(Ordering::Relaxed))
        .sum()
    }
}

/// splitmix64: a well-mixed 64-bit value from a counter.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A real engine with seeded random faults; see the module docs.
pub struct SeededBackend {
    inner: Arc<dyn IoBackend>,
    spec: FaultSpec,
    ops: AtomicU64,
    device_ops: Vec<AtomicU64>,
    pub injected: Arc<InjectedCounts>,
}

impl SeededBackend {
    pub fn new(inner: Arc<dyn IoBackend>, spec: FaultSpec) -> Self {
        tracing::warn!(?spec, "FAULT INJECTION is on (seed {})", spec.seed);
        let device_ops = (0..inner.device_count())
            .map(|_| AtomicU64::new(0))
            .collect();
        Self {
            inner,
            spec,
            ops: AtomicU64::new(0),
            device_ops,
            injected: Arc::default(),
        }
    }

    /// A uniform draw in [0, 1) for operation `op`, stream `k`.
    fn draw(&self, op: u64, k: u64) -> f64 {
        (mix(self.spec.seed ^ mix(op.wrapping_mul(8).wrapping_add(k))) >> 11) as f64
            / (1u64 << 53) as f64
    }

    /// The next operation's sequence number, and whether its device has
    /// vanished.
    fn next(&self, device: u32) -> (u64, bool) {
        let op = self.ops.fetch_add(1, Ordering::Relaxed);
        let n = self
            .device_ops
            .get(device as usize)
            .map(|c| c.fetch_add(1, Ordering::Relaxed))
            .unwrap_or(0);
        let gone = self
            .spec
            .vanish
            .is_some_and(|(d, at)| d == device && n >= at);
        if gone {
            self.injected.vanished_ops.fetch_add(1, Ordering::Relaxed);
        }
        (op, gone)
    }

    fn delay(&self, op: u64) -> Option<std::time::Duration> {
        (self.spec.latency_ms > 0 && self.draw(op, 3) < self.spec.latency).then(|| {
            self.injected.delays.fetch_add(1, Ordering::Relaxed);
            std::time::Duration::from_millis(self.spec.latency_ms)
        })
    }
}

impl IoBackend for SeededBackend {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    fn submit(&self, op: IoOp, mut buf: BufLease) -> IoFuture {
        let (n, gone) = self.next(op.device);
        if gone {
            return IoFuture::ready(Err(io::Error::from_raw_os_error(libc::ENODEV)), buf);
        }
        let c = &self.injected;
        let (eio_p, eio_counter) = match op.kind {
            OpKind::Read => (self.spec.read_eio, &c.read_eio),
            OpKind::Write => (self.spec.write_eio, &c.write_eio),
        };
        if self.draw(n, 0) < eio_p {
            eio_counter.fetch_add(1, Ordering::Relaxed);
            return IoFuture::ready(Err(io::Error::from_raw_os_error(libc::EIO)), buf);
        }
        let delay = self.delay(n);
        let torn =
            op.kind == OpKind::Write && buf.len() >= 8192 && self.draw(n, 1) < self.spec.torn;
        let flip = (op.kind == OpKind::Read && self.draw(n, 2) < self.spec.flip)
            .then(|| (mix(self.spec.seed ^ n) % u64::from(op.len.max(1))) as usize);
        let full = buf.len();
        let mut op = op;
        if torn {
            c.torn.fetch_add(1, Ordering::Relaxed);
            let half = (full / 2).next_multiple_of(4096).min(full - 4096);
            buf.set_len(half);
            op.len = half as u32;
        }
        let inner = Arc::clone(&self.inner);
        let injected = Arc::clone(&self.injected);
        if delay.is_none() && !torn && flip.is_none() {
            return inner.submit(op, buf);
        }
        IoFuture::boxed(async move {
            if let Some(d) = delay {
                tokio::time::sleep(d).await;
            }
            let mut fut = inner.submit(op, buf);
            if let Some(at) = flip {
                injected.flips.fetch_add(1, Ordering::Relaxed);
                fut = IoFuture::corrupted(fut, at);
            }
            let (r, mut buf) = fut.await;
            if torn {
                // The caller is told the whole write landed.
                buf.set_len(full);
                return (r.map(|_| full), buf);
            }
            (r, buf)
        })
    }

    unsafe fn fix_foreign(&self, base: *mut u8, len: usize) -> Option<super::FixedForeign> {
        // SAFETY: the caller's promise, passed on unchanged.
        unsafe { self.inner.fix_foreign(base, len) }
    }

    fn read_foreign(&self, read: ForeignRead) -> ForeignReadFuture {
        let (n, gone) = self.next(read.device);
        if gone {
            return ForeignReadFuture::ready(Err(io::Error::from_raw_os_error(libc::ENODEV)));
        }
        if let Err(e) = read.check(self.device_count()) {
            return ForeignReadFuture::ready(Err(e));
        }
        if self.draw(n, 0) < self.spec.read_eio {
            self.injected.read_eio.fetch_add(1, Ordering::Relaxed);
            return ForeignReadFuture::ready(Err(io::Error::from_raw_os_error(libc::EIO)));
        }
        let delay = self.delay(n);
        let flip = (self.draw(n, 2) < self.spec.flip)
            .then(|| (mix(self.spec.seed ^ n) % u64::from(read.len.max(1))) as u32);
        if delay.is_none() && flip.is_none() {
            return self.inner.read_foreign(read);
        }
        let inner = Arc::clone(&self.inner);
        let injected = Arc::clone(&self.injected);
        ForeignReadFuture::boxed(async move {
            if let Some(d) = delay {
                tokio::time::sleep(d).await;
            }
            let done = inner.read_foreign(read.clone()).await?;
            if let Some(at) = flip
                && (at as usize) < done
            {
                injected.flips.fetch_add(1, Ordering::Relaxed);
                let target = read.target(at);
                // SAFETY: `check` passed, at < done <= len, and the read
                // has completed, so the kernel no longer writes there;
                // `read.memory` keeps it mapped.
                unsafe { *target = !*target };
            }
            Ok(done)
        })
    }

    fn sync(&self, device: u32) -> io::Result<()> {
        let (n, gone) = self.next(device);
        if gone {
            return Err(io::Error::from_raw_os_error(libc::ENODEV));
        }
        if self.draw(n, 4) < self.spec.fsync_fail {
            self.injected.fsync_failures.fetch_add(1, Ordering::Relaxed);
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        self.inner.sync(device)
    }

    fn discard(&self, device: u32, offset: u64, len: u64) -> io::Result<()> {
        let (_, gone) = self.next(device);
        if gone {
            return Err(io::Error::from_raw_os_error(libc::ENODEV));
        }
        self.inner.discard(device, offset, len)
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

    #[test]
    fn spec_parses_and_rejects() {
        let s: FaultSpec =
            "seed=7,read_eio=0.5,flip=1,latency_ms=3,latency=0.1,torn=0.2,vanish=2@10,fsync_fail=1"
                .parse()
                .unwrap();
        assert_eq!(s.seed, 7);
        assert_eq!(s.vanish, Some((2, 10)));
        assert_eq!(s.fsync_fail, 1.0);
        assert!("read_eio=2".parse::<FaultSpec>().is_err());
        assert!("bogus=1".parse::<FaultSpec>().is_err());
        assert!("vanish=2".parse::<FaultSpec>().is_err());
        assert!("seed".parse::<FaultSpec>().is_err());
    }

    #[tokio::test]
    async fn seeded_faults_are_deterministic() {
        // Guards against fault decisions that depend on anything but the
        // seed and the operation order (campaigns must be reproducible).
        async fn run(seed: u64) -> (Vec<bool>, u64) {
            let dir = tempfile::tempdir().unwrap();
            let pool = test_pool();
            let inner = build(
                EngineKind::Psync,
                test_files(dir.path(), 2, 1 << 20),
                Arc::clone(&pool),
                EngineLimits {
                    queue_depth_per_device_max: 4,
                    psync_threads: 1,
                },
            )
            .unwrap();
            let spec: FaultSpec = format!("seed={seed},read_eio=0.3,vanish=1@5,flip=0.2")
                .parse()
                .unwrap();
            let b = SeededBackend::new(inner, spec);
            let mut failed = Vec::new();
            for i in 0..40u64 {
                let lease = pool.acquire(4096).await.unwrap();
                let r = read_exact(&b, (i % 2) as u32, 0, 4096, lease).await;
                failed.push(r.is_err());
            }
            (failed, b.injected.flips.load(Ordering::Relaxed))
        }
        let (a, fa) = run(11).await;
        assert_eq!((a.clone(), fa), run(11).await, "same seed, same faults");
        assert_ne!(a, run(12).await.0, "another seed, other faults");
        // Device 1 vanished after 5 operations: all its later reads fail.
        assert!(
            a.iter()
                .enumerate()
                .filter(|(i, _)| i % 2 == 1 && *i >= 11)
                .all(|(_, f)| *f)
        );
        assert!(a.iter().any(|f| !f));
    }
}
