//! Writing a dataset out as a file tree without trusting what is already
//! there or what the server sends, and printing names safely.
//!
//! Every file is created relative to a directory descriptor, one path
//! component at a time, with `O_NOFOLLOW`: a symlink planted in the target
//! (say `out/train -> /etc`) makes the export fail on that path instead of
//! writing through it. Files are created `O_EXCL`, so nothing existing is
//! overwritten. Paths that cannot coexist in a file tree (`a` and `a/b`)
//! are reported before anything is written.

use std::collections::{BTreeSet, HashSet};
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

/// An open directory under which files are created.
#[derive(Debug)]
pub struct Root {
    fd: OwnedFd,
}

fn c_name(component: &str) -> io::Result<CString> {
    CString::new(component)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a name"))
}

/// `openat(dir, name, flags)`.
fn open_at(dir: &OwnedFd, name: &str, flags: i32, mode: libc::mode_t) -> io::Result<OwnedFd> {
    let c = c_name(name)?;
    // SAFETY: `dir` is an open descriptor and `c` a NUL-terminated string
    // that outlive the call; the result is checked before use.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), c.as_ptr(), flags | libc::O_CLOEXEC, mode) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl Root {
    /// Creates `dir` (and its parents) if missing and opens it. The root
    /// itself is the user's choice and may be reached through symlinks.
    pub fn open(dir: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let file = File::open(dir)?;
        if !file.metadata()?.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotADirectory,
                "not a directory",
            ));
        }
        Ok(Self { fd: file.into() })
    }

    /// Creates the new file `rel` ('/'-separated, relative, validated as an
    /// object path), making its directories; never follows a symlink and
    /// never replaces an existing file.
    pub fn create_file(&self, rel: &str) -> io::Result<File> {
        let mut parts: Vec<&str> = rel.split('/').collect();
        let name = parts.pop().unwrap_or_default();
        let mut dir: Option<OwnedFd> = None;
        for part in parts {
            let at = dir.as_ref().unwrap_or(&self.fd);
            let c = c_name(part)?;
            // SAFETY: as in `open_at`; mkdirat only creates a directory.
            let rc = unsafe { libc::mkdirat(at.as_raw_fd(), c.as_ptr(), 0o755) };
            if rc != 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::AlreadyExists {
                    return Err(e);
                }
            }
            // A symlink here fails with ELOOP (O_NOFOLLOW), a file with
            // ENOTDIR (O_DIRECTORY).
            let next = open_at(
                at,
                part,
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                0,
            )
            .map_err(|e| io::Error::new(e.kind(), format!("directory {part:?}: {e}")))?;
            dir = Some(next);
        }
        let at = dir.as_ref().unwrap_or(&self.fd);
        let fd = open_at(
            at,
            name,
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
            0o644,
        )?;
        Ok(File::from(fd))
    }
}

/// Pairs `(object, other)` where `other` is an object that would have to
/// be a directory of `object` (or the same name twice): such a dataset
/// cannot be written as one tree.
pub fn conflicts<'a>(paths: impl IntoIterator<Item = &'a str> + Clone) -> Vec<(String, String)> {
    let all: HashSet<&str> = paths.clone().into_iter().collect();
    let mut found = BTreeSet::new();
    for p in paths {
        for (i, _) in p.match_indices('/') {
            if all.contains(&p[..i]) {
                found.insert((p[..i].to_owned(), p.to_owned()));
            }
        }
    }
    found.into_iter().collect()
}

/// `name` as it is safe to print: control characters (terminal escape
/// sequences among them) are shown escaped, `\x1b` style.
pub fn shown(name: &str) -> std::borrow::Cow<'_, str> {
    if !name.chars().any(char::is_control) {
        return name.into();
    }
    let mut out = String::with_capacity(name.len() + 8);
    for c in name.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_files_and_refuses_symlinks() {
        // Guards against export following a symlink planted in the target.
        let tmp = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let root = Root::open(&tmp.path().join("out")).unwrap();
        std::io::Write::write_all(&mut root.create_file("a/b/c.txt").unwrap(), b"x").unwrap();
        assert_eq!(
            std::fs::read(tmp.path().join("out/a/b/c.txt")).unwrap(),
            b"x"
        );
        std::os::unix::fs::symlink(outside.path(), tmp.path().join("out/evil")).unwrap();
        let err = root.create_file("evil/passwd").unwrap_err();
        assert!(err.to_string().contains("evil"), "{err}");
        std::os::unix::fs::symlink(outside.path().join("f"), tmp.path().join("out/link")).unwrap();
        assert!(root.create_file("link").is_err());
        assert!(
            std::fs::read_dir(outside.path()).unwrap().next().is_none(),
            "nothing escaped"
        );
        // Existing files are never replaced.
        assert_eq!(
            root.create_file("a/b/c.txt").unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
    }

    #[test]
    fn finds_file_directory_conflicts_and_escapes_names() {
        let paths = ["a", "a/b", "x/y", "x/y/z", "q"];
        assert_eq!(
            conflicts(paths.iter().copied()),
            vec![
                ("a".to_owned(), "a/b".to_owned()),
                ("x/y".to_owned(), "x/y/z".to_owned())
            ]
        );
        assert!(conflicts(["a/b", "a/c"].iter().copied()).is_empty());
        assert_eq!(shown("plain"), "plain");
        assert_eq!(shown("a\u{1b}[2Jb\n"), "a\\u{1b}[2Jb\\n");
    }
}
