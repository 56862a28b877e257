//! Power-loss simulation, for crash tests.
//!
//! A [`CrashDisk`] stands between the store and every file it writes: the
//! devices (through the engine and through the metadata files) and the
//! catalog (as redb's storage backend), all through the store's
//! [`IoHooks`]. It does the I/O itself, with plain `pread`/`pwrite` on its
//! own descriptors, and remembers, per file, the bytes each write since
//! that file's last completed sync replaced (its undo log). Mutating
//! operations (write, discard, set_len, sync) are numbered across all
//! files; the one numbered `crash_at` fails, and so does every operation
//! after it: the power is off. [`CrashDisk::power_off`] then decides, for
//! each write no sync covered, newest first and from a seed, whether it
//! reached the medium (kept), did not (its old bytes restored) or was torn
//! (some of its 4 KiB blocks kept, the others restored), as redb's own crash
//! tests do with its storage backend. Whatever a completed sync covered is
//! never touched. A store opened on the files afterwards sees what a
//! machine sees after losing power at that point.
//!
//! 4 KiB is the unit a device writes atomically here (a logical block of
//! the NVMe drives storaged targets, and its O_DIRECT alignment); every
//! device write storaged makes is aligned to it.
//!
//! What it does not cover: superblocks, which are written with their own
//! descriptors while a pool is assembled (`device`), before any operation a
//! crash test exercises, and which are synced before anything refers to
//! them; and renames of the catalog file.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::buf::{BufLease, IoFuture};
use crate::catalog::BackendFactory;
use crate::engine::{ForeignRead, ForeignReadFuture, IoBackend, IoOp, OpKind};
use crate::store::hooks::IoHooks;

/// The unit a device writes atomically: a torn write keeps or loses whole
/// blocks of this size.
pub const ATOMIC_WRITE_BYTES: u64 = 4096;

/// Power-loss simulation over a set of files; see the module docs.
#[derive(Debug)]
pub struct CrashDisk {
    files: Mutex<HashMap<PathBuf, Arc<CrashFile>>>,
    /// Mutating operations so far.
    ops: AtomicU64,
    /// The operation that fails first (`u64::MAX`: none).
    crash_at: AtomicU64,
    crashed: AtomicBool,
}

/// What one unsynced change replaced.
#[derive(Debug)]
enum Undo {
    /// `old` was at `offset` (`old.len()` bytes) before a write or discard.
    Bytes { offset: u64, old: Vec<u8> },
    /// The file was `len` bytes long; `tail` held what a shrink cut off.
    Len { len: u64, tail: Vec<u8> },
}

/// What [`CrashDisk::power_off`] did to unsynced writes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PowerOffReport {
    pub writes_kept: u64,
    pub writes_dropped: u64,
    pub writes_torn: u64,
}

impl CrashDisk {
    /// A disk where nothing crashes until [`crash_at`](Self::crash_at) or
    /// [`crash_now`](Self::crash_now).
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            files: Mutex::new(HashMap::new()),
            ops: AtomicU64::new(0),
            crash_at: AtomicU64::new(u64::MAX),
            crashed: AtomicBool::new(false),
        })
    }

    /// Mutating operations so far (the range `crash_at` picks from).
    pub fn ops(&self) -> u64 {
        self.ops.load(Ordering::SeqCst)
    }

    /// Power fails at mutating operation number `n` (counted from 0 since
    /// this disk was made), before it does anything.
    pub fn crash_at(&self, n: u64) {
        self.crash_at.store(n, Ordering::SeqCst);
    }

    /// Power fails now (if it has not already).
    pub fn crash_now(&self) {
        self.crashed.store(true, Ordering::SeqCst);
    }

    pub fn crashed(&self) -> bool {
        self.crashed.load(Ordering::SeqCst)
    }

    /// Hooks that put every write path of a store on this disk.
    pub fn hooks(self: &Arc<Self>) -> Arc<dyn IoHooks> {
        Arc::new(CrashHooks(Arc::clone(self)))
    }

    /// The file at `path`, opened once per disk.
    pub fn file(self: &Arc<Self>, path: &Path) -> io::Result<Arc<CrashFile>> {
        let key = std::fs::canonicalize(path)?;
        let mut files = self.files.lock().expect("crash disk poisoned");
        if let Some(f) = files.get(&key) {
            return Ok(Arc::clone(f));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&key)?;
        let f = Arc::new(CrashFile {
            disk: Arc::clone(self),
            path: key.clone(),
            state: Mutex::new(FileState {
                file,
                undo: Vec::new(),
            }),
        });
        files.insert(key, Arc::clone(&f));
        Ok(f)
    }

    /// Counts a mutating operation; fails it if the power is off or goes
    /// off now.
    fn tick(&self) -> io::Result<()> {
        if self.crashed() {
            return Err(power_is_off());
        }
        let n = self.ops.fetch_add(1, Ordering::SeqCst);
        if n >= self.crash_at.load(Ordering::SeqCst) {
            self.crashed.store(true, Ordering::SeqCst);
            return Err(power_is_off());
        }
        Ok(())
    }

    fn check_power(&self) -> io::Result<()> {
        if self.crashed() {
            Err(power_is_off())
        } else {
            Ok(())
        }
    }

    /// Cuts the power (if the crash point was not reached) and decides the
    /// fate of every unsynced write from `seed`: for one seed in four the
    /// device's volatile cache is lost whole (every unsynced write
    /// dropped, the case that exposes a missing sync most surely),
    /// otherwise each write is kept, dropped or torn, a third each. Files
    /// are left as the medium would hold them.
    pub fn power_off(&self, seed: u64) -> io::Result<PowerOffReport> {
        self.crash_now();
        let mut report = PowerOffReport::default();
        let mut rng = seed ^ 0x5bd1_e995_5bd1_e995;
        let lose_everything = next(&mut rng).is_multiple_of(4);
        let files = self.files.lock().expect("crash disk poisoned");
        let mut paths: Vec<&PathBuf> = files.keys().collect();
        paths.sort();
        for path in paths {
            let mut state = files[path].state.lock().expect("crash file poisoned");
            let undo = std::mem::take(&mut state.undo);
            // Newest first: each undo restores what was there before its
            // change, which is what older changes left.
            for u in undo.into_iter().rev() {
                match u {
                    Undo::Len { len, tail } => {
                        // A size change is metadata: it lands or not.
                        if !lose_everything && next(&mut rng).is_multiple_of(2) {
                            report.writes_kept += 1;
                        } else {
                            state.file.set_len(len)?;
                            state.file.write_all_at(&tail, len)?;
                            report.writes_dropped += 1;
                        }
                    }
                    Undo::Bytes { offset, old } => match next(&mut rng) % 3 {
                        _ if lose_everything => {
                            state.file.write_all_at(&old, offset)?;
                            report.writes_dropped += 1;
                        }
                        0 => report.writes_kept += 1,
                        1 => {
                            state.file.write_all_at(&old, offset)?;
                            report.writes_dropped += 1;
                        }
                        _ => {
                            for (i, block) in old.chunks(ATOMIC_WRITE_BYTES as usize).enumerate() {
                                if next(&mut rng).is_multiple_of(2) {
                                    let at = offset + i as u64 * ATOMIC_WRITE_BYTES;
                                    state.file.write_all_at(block, at)?;
                                }
                            }
                            report.writes_torn += 1;
                        }
                    },
                }
            }
            state.file.sync_all()?;
        }
        Ok(report)
    }
}

fn power_is_off() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

/// splitmix64.
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// One file of a [`CrashDisk`].
#[derive(Debug)]
pub struct CrashFile {
    disk: Arc<CrashDisk>,
    path: PathBuf,
    state: Mutex<FileState>,
}

#[derive(Debug)]
struct FileState {
    file: File,
    /// Changes since the last completed sync, oldest first.
    undo: Vec<Undo>,
}

impl CrashFile {
    fn lock(&self) -> std::sync::MutexGuard<'_, FileState> {
        self.state.lock().expect("crash file poisoned")
    }

    /// Reads what is there now (short at the end of the file).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.disk.check_power()?;
        let state = self.lock();
        let mut done = 0;
        while done < buf.len() {
            match state.file.read_at(&mut buf[done..], offset + done as u64)? {
                0 => break,
                n => done += n,
            }
        }
        Ok(done)
    }

    /// The bytes `[offset, offset + len)` hold now, zeros past the end.
    fn current(state: &FileState, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut old = vec![0u8; len];
        let mut done = 0;
        while done < len {
            match state.file.read_at(&mut old[done..], offset + done as u64)? {
                0 => break,
                n => done += n,
            }
        }
        Ok(old)
    }

    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.disk.tick()?;
        let mut state = self.lock();
        let len = state.file.metadata()?.len();
        let end = offset + data.len() as u64;
        if end > len {
            // Growing the file is a change of its own.
            state.undo.push(Undo::Len {
                len,
                tail: Vec::new(),
            });
        }
        let old = Self::current(&state, offset, data.len())?;
        state.undo.push(Undo::Bytes { offset, old });
        state.file.write_all_at(data, offset)
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.disk.tick()?;
        let mut state = self.lock();
        let old = Self::current(&state, offset, len as usize)?;
        state.undo.push(Undo::Bytes { offset, old });
        crate::engine::discard_file(&state.file, offset, len)
    }

    fn set_len(&self, new_len: u64) -> io::Result<()> {
        self.disk.tick()?;
        let mut state = self.lock();
        let len = state.file.metadata()?.len();
        let tail = if new_len < len {
            Self::current(&state, new_len, (len - new_len) as usize)?
        } else {
            Vec::new()
        };
        state.undo.push(Undo::Len { len, tail });
        state.file.set_len(new_len)
    }

    /// A completed sync: everything written so far is on the medium. (The
    /// files themselves are only made durable at power-off: what this
    /// simulates is the device, not the test machine's disk.)
    fn sync(&self) -> io::Result<()> {
        self.disk.tick()?;
        self.lock().undo.clear();
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl crate::engine::DeviceFile for CrashFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match self.read_at(buf, offset)? {
            n if n == buf.len() => Ok(()),
            _ => Err(io::ErrorKind::UnexpectedEof.into()),
        }
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.write_at(buf, offset)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.sync()
    }
}

/// A [`CrashFile`] as the catalog's redb storage.
#[derive(Debug)]
struct CatalogStorage(Arc<CrashFile>);

impl redb::StorageBackend for CatalogStorage {
    fn len(&self) -> io::Result<u64> {
        self.0.disk.check_power()?;
        Ok(self.0.lock().file.metadata()?.len())
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        crate::engine::DeviceFile::read_exact_at(&*self.0, out, offset)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.0.sync()
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.0.write_at(data, offset)
    }
}

/// An engine over [`CrashFile`]s: every operation done at once, in the
/// calling thread (the simulation needs each write's old bytes taken and
/// the write made under one lock, and nothing in flight at power-off).
#[derive(Debug)]
pub struct CrashEngine {
    /// `None`: a missing device.
    files: Vec<Option<Arc<CrashFile>>>,
}

impl CrashEngine {
    fn file(&self, device: u32) -> io::Result<&CrashFile> {
        self.files
            .get(device as usize)
            .and_then(|f| f.as_deref())
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENODEV))
    }
}

impl IoBackend for CrashEngine {
    fn kind(&self) -> &'static str {
        "crash-sim"
    }

    fn submit(&self, op: IoOp, mut buf: BufLease) -> IoFuture {
        let len = op.len as usize;
        let result = self.file(op.device).and_then(|f| match op.kind {
            OpKind::Read => f.read_at(&mut buf.as_mut_full()[..len], op.offset),
            OpKind::Write => f.write_at(&buf.as_slice()[..len], op.offset).map(|()| len),
        });
        IoFuture::ready(result, buf)
    }

    fn read_foreign(&self, read: ForeignRead) -> ForeignReadFuture {
        read.complete_in_place(self.device_count(), |target| {
            self.file(read.device)
                .and_then(|f| f.read_at(target, read.device_offset))
        })
    }

    fn sync(&self, device: u32) -> io::Result<()> {
        self.file(device)?.sync()
    }

    fn discard(&self, device: u32, offset: u64, len: u64) -> io::Result<()> {
        self.file(device)?.discard(offset, len)
    }

    fn device_count(&self) -> u32 {
        self.files.len() as u32
    }
}

/// [`IoHooks`] that put a store on a [`CrashDisk`].
struct CrashHooks(Arc<CrashDisk>);

impl IoHooks for CrashHooks {
    fn engine(&self, _engine: Arc<dyn IoBackend>, paths: &[PathBuf]) -> Arc<dyn IoBackend> {
        // A device that is not there (or cannot be opened) is missing
        // here as it is for the real engine.
        let files = paths.iter().map(|p| self.0.file(p).ok()).collect();
        Arc::new(CrashEngine { files })
    }

    fn meta_file(&self, file: File, path: &Path) -> Arc<dyn crate::engine::DeviceFile> {
        match self.0.file(path) {
            Ok(f) => f,
            Err(_) => Arc::new(file),
        }
    }

    fn catalog(&self, path: &Path) -> Option<BackendFactory> {
        let disk = Arc::clone(&self.0);
        let path = path.to_path_buf();
        Some(Arc::new(move || {
            let f = disk.file(&path)?;
            Ok(Box::new(CatalogStorage(f)) as Box<dyn redb::StorageBackend>)
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::DeviceFile;

    fn bytes(path: &Path) -> Vec<u8> {
        std::fs::read(path).unwrap()
    }

    /// Guards against a simulation that loses synced writes or keeps every
    /// unsynced one: synced bytes survive every seed, unsynced ones are
    /// kept, dropped and torn in whole blocks across seeds.
    #[test]
    fn synced_writes_survive_and_unsynced_ones_are_kept_dropped_or_torn() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dev");
        let mut outcomes = std::collections::HashSet::new();
        for seed in 0..64 {
            std::fs::write(&path, vec![0u8; 64 << 10]).unwrap();
            let disk = CrashDisk::new();
            let f = disk.file(&path).unwrap();
            f.write_all_at(&[1u8; 8192], 0).unwrap();
            f.sync_data().unwrap();
            f.write_all_at(&[2u8; 16384], 8192).unwrap();
            f.write_all_at(&[3u8; 4096], 65536).unwrap(); // grows the file
            let report = disk.power_off(seed).unwrap();
            assert_eq!(
                report.writes_kept + report.writes_dropped + report.writes_torn,
                3
            );
            let b = bytes(&path);
            assert!(b[..8192].iter().all(|x| *x == 1), "seed {seed}: synced");
            for block in b[8192..8192 + 16384].chunks(4096) {
                assert!(
                    block.iter().all(|x| *x == 2) || block.iter().all(|x| *x == 0),
                    "seed {seed}: whole blocks, old or new"
                );
            }
            let kept: Vec<bool> = b[8192..8192 + 16384]
                .chunks(4096)
                .map(|c| c[0] == 2)
                .collect();
            outcomes.insert(kept);
            assert!(b.len() == 65536 || b.len() == 65536 + 4096, "seed {seed}");
            // Power stays off: nothing reaches the file any more.
            assert!(f.write_all_at(&[9u8; 4096], 0).is_err());
            assert_eq!(bytes(&path), b);
        }
        assert!(outcomes.contains(&vec![true; 4]), "kept");
        assert!(outcomes.contains(&vec![false; 4]), "dropped");
        assert!(outcomes.len() > 2, "torn: {outcomes:?}");
    }

    /// Guards against a crash point that lets its own operation, or any
    /// later one, through.
    #[test]
    fn the_crash_point_and_everything_after_it_fail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dev");
        std::fs::write(&path, vec![0u8; 16384]).unwrap();
        let disk = CrashDisk::new();
        disk.crash_at(2);
        let f = disk.file(&path).unwrap();
        f.write_all_at(&[1u8; 4096], 0).unwrap(); // op 0
        f.sync_data().unwrap(); // op 1
        assert!(f.write_all_at(&[2u8; 4096], 4096).is_err(), "op 2");
        assert!(f.sync_data().is_err());
        let mut b = [0u8; 4096];
        assert!(f.read_exact_at(&mut b, 0).is_err(), "no reads either");
        disk.power_off(1).unwrap();
        let b = bytes(&path);
        assert!(b[..4096].iter().all(|x| *x == 1));
        assert!(b[4096..].iter().all(|x| *x == 0));
    }
}
