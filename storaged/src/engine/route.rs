//! Device slots: which engine serves each device index, and which devices
//! are missing.
//!
//! The pool's engine is built once, at start, for the devices present then.
//! A device that was missing at start has a placeholder there, and this
//! layer fails every operation on it with `ENODEV` before the engine sees
//! it, so nothing can read zeros from or write into a placeholder. When
//! `device replace` brings in a new device while running, the slot is
//! pointed at an engine of its own for that one device (until the next
//! start, when the new device is part of the pool like any other).

use std::io;
use std::sync::{Arc, RwLock};

use super::{FixedForeign, ForeignMemory, ForeignRead, ForeignReadFuture, IoBackend, IoOp};
use crate::buf::{BufLease, IoFuture};

/// Who serves a device index.
#[derive(Clone)]
pub enum Slot {
    /// The pool's engine, at the same index.
    Primary,
    /// No device: every operation fails with `ENODEV`.
    Missing,
    /// A one-device engine (device 0 of it).
    Replaced(Arc<dyn IoBackend>),
}

/// The router; see the module docs.
pub struct DeviceSlots {
    primary: Arc<dyn IoBackend>,
    slots: RwLock<Vec<Slot>>,
    /// Whether any slot is `Missing`: read on every read of an `ec`
    /// dataset, so it must not take the lock or allocate.
    any_missing: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for DeviceSlots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceSlots")
            .field("missing", &self.missing())
            .finish()
    }
}

/// The error of an operation on a missing device: ENODEV, as the kernel
/// reports a device that went away (callers add which device and where).
fn missing() -> io::Error {
    io::Error::from_raw_os_error(libc::ENODEV)
}

/// Whether an engine error means "the device is not there" (by its errno,
/// never by its text).
pub fn is_missing(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENODEV)
}

/// A copy of an engine error for each of several waiters: the errno where
/// there is one (so [`is_missing`] and ENOSPC still tell), else the kind
/// and text.
pub fn copy_error(e: &io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(code) => io::Error::from_raw_os_error(code),
        None => io::Error::new(e.kind(), e.to_string()),
    }
}

/// Foreign memory without its fixed-buffer index: the index belongs to the
/// primary engine's ring, not to a replacement engine's.
struct Unfixed(Arc<dyn ForeignMemory>);

// SAFETY: forwards base/len of memory the inner value already promises to
// keep mapped while referenced.
unsafe impl ForeignMemory for Unfixed {
    fn base(&self) -> *mut u8 {
        self.0.base()
    }
    fn len(&self) -> usize {
        self.0.len()
    }
}

impl DeviceSlots {
    /// Every device served by `primary`, except those flagged missing.
    pub fn new(primary: Arc<dyn IoBackend>, missing: &[bool]) -> Self {
        let slots = missing
            .iter()
            .map(|m| if *m { Slot::Missing } else { Slot::Primary })
            .collect();
        Self {
            primary,
            slots: RwLock::new(slots),
            any_missing: missing.iter().any(|m| *m).into(),
        }
    }

    fn slot(&self, device: u32) -> Option<Slot> {
        self.slots
            .read()
            .expect("device slots poisoned")
            .get(device as usize)
            .cloned()
    }

    pub fn set(&self, device: u32, slot: Slot) {
        let mut s = self.slots.write().expect("device slots poisoned");
        if let Some(x) = s.get_mut(device as usize) {
            *x = slot;
        }
        let any = s.iter().any(|x| matches!(x, Slot::Missing));
        self.any_missing
            .store(any, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether any device is missing now (no lock, no allocation).
    pub fn any_missing(&self) -> bool {
        self.any_missing.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Flags of the devices that are missing now.
    pub fn missing(&self) -> Vec<bool> {
        self.slots
            .read()
            .expect("device slots poisoned")
            .iter()
            .map(|s| matches!(s, Slot::Missing))
            .collect()
    }
}

impl IoBackend for DeviceSlots {
    fn kind(&self) -> &'static str {
        self.primary.kind()
    }

    fn submit(&self, op: IoOp, buf: BufLease) -> IoFuture {
        match self.slot(op.device) {
            Some(Slot::Primary) | None => self.primary.submit(op, buf),
            Some(Slot::Missing) => {
                IoFuture::ready(Err(io::Error::from_raw_os_error(libc::ENODEV)), buf)
            }
            Some(Slot::Replaced(e)) => e.submit(IoOp { device: 0, ..op }, buf),
        }
    }

    fn read_foreign(&self, read: ForeignRead) -> ForeignReadFuture {
        match self.slot(read.device) {
            Some(Slot::Primary) | None => self.primary.read_foreign(read),
            Some(Slot::Missing) => ForeignReadFuture::ready(Err(missing())),
            Some(Slot::Replaced(e)) => e.read_foreign(ForeignRead {
                device: 0,
                memory: Arc::new(Unfixed(read.memory)),
                ..read
            }),
        }
    }

    fn sync(&self, device: u32) -> io::Result<()> {
        match self.slot(device) {
            Some(Slot::Primary) | None => self.primary.sync(device),
            // Nothing was written there.
            Some(Slot::Missing) => Ok(()),
            Some(Slot::Replaced(e)) => e.sync(0),
        }
    }

    fn discard(&self, device: u32, offset: u64, len: u64) -> io::Result<()> {
        match self.slot(device) {
            Some(Slot::Primary) | None => self.primary.discard(device, offset, len),
            // Nothing to give back on a device that is not there.
            Some(Slot::Missing) => Ok(()),
            Some(Slot::Replaced(e)) => e.discard(0, offset, len),
        }
    }

    fn device_count(&self) -> u32 {
        self.primary.device_count()
    }

    unsafe fn fix_foreign(&self, base: *mut u8, len: usize) -> Option<FixedForeign> {
        // SAFETY: the caller's promise, passed on unchanged.
        unsafe { self.primary.fix_foreign(base, len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Guards against telling a missing device by an error's text: only
    /// the errno says so, and copies for several waiters keep it (and
    /// ENOSPC) while a message that merely mentions ENODEV does not count.
    #[test]
    fn missing_is_told_by_errno_and_survives_copies() {
        assert!(is_missing(&missing()));
        assert!(is_missing(&copy_error(&missing())));
        assert!(!is_missing(&io::Error::other(
            "device 3 is missing (No such device, ENODEV) (os error 19)"
        )));
        let full = copy_error(&io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(full.raw_os_error(), Some(libc::ENOSPC));
        let other = copy_error(&io::Error::new(io::ErrorKind::UnexpectedEof, "short"));
        assert_eq!(other.kind(), io::ErrorKind::UnexpectedEof);
    }
    use crate::engine::tests::{test_files, test_pool};
    use crate::engine::{EngineKind, EngineLimits, OpKind, build};

    #[tokio::test]
    async fn missing_fails_and_replaced_routes() {
        let dir = tempfile::tempdir().unwrap();
        let pool = test_pool();
        let limits = EngineLimits {
            queue_depth_per_device_max: 4,
            psync_threads: 2,
        };
        let files = test_files(dir.path(), 2, 1 << 20);
        let engine = build(EngineKind::Psync, files, Arc::clone(&pool), limits).unwrap();
        let slots = DeviceSlots::new(engine, &[false, true]);
        assert_eq!(slots.missing(), vec![false, true]);
        let read = |device| IoOp {
            kind: OpKind::Read,
            device,
            offset: 0,
            len: 4096,
        };
        let lease = pool.acquire(4096).await.unwrap();
        let (r, _) = slots.submit(read(1), lease).await;
        assert!(is_missing(&r.unwrap_err()));
        let lease = pool.acquire(4096).await.unwrap();
        let (r, _) = slots.submit(read(0), lease).await;
        assert_eq!(r.unwrap(), 4096);

        // A replacement: writes to index 1 land on the new file.
        let new_dir = tempfile::tempdir().unwrap();
        let new = test_files(new_dir.path(), 1, 1 << 20);
        let one = build(EngineKind::Psync, new, Arc::clone(&pool), limits).unwrap();
        slots.set(1, Slot::Replaced(one));
        let mut lease = pool.acquire(4096).await.unwrap();
        lease.as_mut_full()[..4096].fill(0x5A);
        lease.set_len(4096);
        let w = IoOp {
            kind: OpKind::Write,
            ..read(1)
        };
        let (r, _) = slots.submit(w, lease).await;
        assert_eq!(r.unwrap(), 4096);
        slots.sync(1).unwrap();
        let b = std::fs::read(new_dir.path().join("dev0")).unwrap();
        assert!(b[..4096].iter().all(|x| *x == 0x5A));
    }
}
