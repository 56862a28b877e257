//! An engine over memory, for tests of the store's logic rather than of
//! the kernel's I/O: each device is a byte array the process holds, every
//! operation is done when it is submitted (in the calling thread), so
//! runs are fast and their order deterministic, with no thread or ring
//! behind them.
//!
//! A [`MemoryDisk`] keeps the devices by path and outlives the stores
//! opened on it, so a store can be closed and reopened on the same bytes.
//! A device starts as a copy of its file (the superblock `open_pool`
//! wrote); from then on the engine's reads and writes go to memory only.
//! The pool's metadata (roots, manifests) and the catalog stay on files:
//! they go through their own seams (`DeviceFile`, the catalog backend).

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use super::{ForeignRead, ForeignReadFuture, IoBackend, IoOp, OpKind};
use crate::buf::{BufLease, IoFuture};

/// One device's bytes.
type Device = Arc<RwLock<Vec<u8>>>;

/// Devices in memory, by path; see the module docs.
#[derive(Debug, Default)]
pub struct MemoryDisk {
    devices: Mutex<HashMap<PathBuf, Device>>,
}

impl MemoryDisk {
    /// The device at `path`, copied from its file the first time; `None`
    /// when there is no such file (a missing device).
    fn device(&self, path: &Path) -> Option<Device> {
        let mut devices = self.devices.lock().expect("memory disk poisoned");
        if let Some(d) = devices.get(path) {
            return Some(Arc::clone(d));
        }
        let bytes = std::fs::read(path).ok()?;
        let d = Arc::new(RwLock::new(bytes));
        devices.insert(path.to_path_buf(), Arc::clone(&d));
        Some(d)
    }

    /// An engine whose device `i` is `paths[i]`.
    pub fn engine(&self, paths: &[PathBuf]) -> MemoryEngine {
        MemoryEngine {
            devices: paths.iter().map(|p| self.device(p)).collect(),
        }
    }
}

/// `[offset, offset + len)` of a device of `size` bytes, or the error a
/// device gives for an access past its end.
fn range(offset: u64, len: usize, size: usize) -> io::Result<std::ops::Range<usize>> {
    let start = usize::try_from(offset).unwrap_or(usize::MAX);
    match start.checked_add(len) {
        Some(end) if end <= size => Ok(start..end),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{len} bytes at {offset} are past the device's end ({size} bytes)"),
        )),
    }
}

/// The engine over a [`MemoryDisk`]'s devices.
#[derive(Debug)]
pub struct MemoryEngine {
    /// `None`: a missing device.
    devices: Vec<Option<Device>>,
}

impl MemoryEngine {
    fn device(&self, device: u32) -> io::Result<&Device> {
        self.devices
            .get(device as usize)
            .and_then(Option::as_ref)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENODEV))
    }

    fn read_into(&self, device: u32, offset: u64, out: &mut [u8]) -> io::Result<usize> {
        let d = self.device(device)?.read().expect("device poisoned");
        let at = range(offset, out.len(), d.len())?;
        out.copy_from_slice(&d[at]);
        Ok(out.len())
    }
}

impl IoBackend for MemoryEngine {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn submit(&self, op: IoOp, mut buf: BufLease) -> IoFuture {
        let len = op.len as usize;
        if len > buf.capacity() {
            let err = io::Error::new(io::ErrorKind::InvalidInput, format!("bad I/O {op:?}"));
            return IoFuture::ready(Err(err), buf);
        }
        let result = match op.kind {
            OpKind::Read => self.read_into(op.device, op.offset, &mut buf.as_mut_full()[..len]),
            OpKind::Write => self.device(op.device).and_then(|d| {
                let mut d = d.write().expect("device poisoned");
                let at = range(op.offset, len, d.len())?;
                d[at].copy_from_slice(&buf.as_slice()[..len]);
                Ok(len)
            }),
        };
        IoFuture::ready(result, buf)
    }

    fn read_foreign(&self, read: ForeignRead) -> ForeignReadFuture {
        read.complete_in_place(self.device_count(), |target| {
            self.read_into(read.device, read.device_offset, target)
        })
    }

    fn sync(&self, device: u32) -> io::Result<()> {
        // Memory is as durable as it gets here.
        self.device(device).map(drop)
    }

    fn discard(&self, device: u32, offset: u64, len: u64) -> io::Result<()> {
        let mut d = self.device(device)?.write().expect("device poisoned");
        let at = range(offset, len as usize, d.len())?;
        d[at].fill(0);
        Ok(())
    }

    fn device_count(&self) -> u32 {
        self.devices.len() as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_keep_their_bytes_across_engines_and_start_from_their_files() {
        let dir = tempfile::tempdir().unwrap();
        let paths: Vec<PathBuf> = (0..2).map(|i| dir.path().join(format!("d{i}"))).collect();
        std::fs::write(&paths[0], vec![7u8; 8192]).unwrap();
        std::fs::write(&paths[1], vec![0u8; 8192]).unwrap();
        let disk = MemoryDisk::default();
        let e = disk.engine(&paths);
        assert_eq!(e.device_count(), 2);
        let mut out = [0u8; 4];
        e.read_into(0, 4096, &mut out).unwrap();
        assert_eq!(out, [7; 4], "a device starts as its file");
        e.device(1).unwrap().write().unwrap()[..4].copy_from_slice(b"abcd");
        drop(e);
        let again = disk.engine(&paths);
        again.read_into(1, 0, &mut out).unwrap();
        assert_eq!(&out, b"abcd", "bytes outlive the engine");
        assert_eq!(
            std::fs::read(&paths[1]).unwrap()[..4],
            [0; 4],
            "files are untouched"
        );
        again.discard(1, 0, 4096).unwrap();
        again.read_into(1, 0, &mut out).unwrap();
        assert_eq!(out, [0; 4]);
        assert!(again.read_into(1, 8190, &mut out).is_err(), "past the end");
        let missing = disk.engine(&[dir.path().join("none")]);
        assert_eq!(
            missing.sync(0).unwrap_err().raw_os_error(),
            Some(libc::ENODEV)
        );
    }
}
