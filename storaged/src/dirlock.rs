//! One storaged per data dir. The daemon holds an exclusive `flock` on
//! `storaged.lock` in its data dir for as long as it runs, with its pid in
//! the file, so a second daemon on the same dir (which would fight the
//! first over the catalog and the devices) stops at once and says who owns
//! the dir. The kernel drops the lock when the process exits, however it
//! exits, so a crash never leaves a stale lock behind.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// Name of the lock file inside the data dir.
pub const LOCK_FILE_NAME: &str = "storaged.lock";

/// Why the data dir could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum DirLockError {
    #[error(
        "another storaged owns {} (pid {pid}); stop it, or give this one another --data-dir",
        dir.display()
    )]
    Held { dir: PathBuf, pid: String },
    #[error("cannot lock data dir {}: {source}", dir.display())]
    Io {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The held lock; dropping it (or exiting) releases the dir.
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
}

impl DataDirLock {
    /// Creates `dir` if needed and takes its lock, or fails naming the
    /// process that holds it.
    pub fn acquire(dir: &Path) -> Result<Self, DirLockError> {
        let io = |source| DirLockError::Io {
            dir: dir.to_owned(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join(LOCK_FILE_NAME))
            .map_err(io)?;
        // SAFETY: flock on a file descriptor this function owns; no memory
        // is passed.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                let pid = pid.trim();
                return Err(DirLockError::Held {
                    dir: dir.to_owned(),
                    pid: if pid.is_empty() {
                        "unknown".into()
                    } else {
                        pid.to_owned()
                    },
                });
            }
            return Err(io(e));
        }
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        writeln!(file, "{}", std::process::id()).map_err(io)?;
        Ok(Self { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Guards against two daemons sharing a data dir: the second is refused
    // with the holder's pid, and the dir is free again once the first lets
    // go. (flock locks belong to open file descriptions, so two opens in
    // one process conflict just as two processes do.)
    #[test]
    fn a_second_owner_is_refused_by_pid() {
        let dir = tempfile::tempdir().unwrap();
        let first = DataDirLock::acquire(dir.path()).unwrap();
        let err = DataDirLock::acquire(dir.path()).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("another storaged owns"), "{text}");
        assert!(
            text.contains(&format!("pid {}", std::process::id())),
            "{text}"
        );
        drop(first);
        DataDirLock::acquire(dir.path()).unwrap();
    }
}
