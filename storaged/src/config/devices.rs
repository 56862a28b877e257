//! `--device` lists as given: globs in the last path component and
//! directories expanded (partitions skipped), duplicates dropped or
//! refused.

use super::*;

/// Whether `name` matches `pattern`, where `*` is any run of characters
/// and `?` any one character.
pub(super) fn wildcard(pattern: &[u8], name: &[u8]) -> bool {
    match (pattern.split_first(), name.split_first()) {
        (None, _) => name.is_empty(),
        (Some((b'*', rest)), _) => {
            wildcard(rest, name) || (!name.is_empty() && wildcard(pattern, &name[1..]))
        }
        (Some((b'?', rest)), Some((_, tail))) => wildcard(rest, tail),
        (Some((p, rest)), Some((n, tail))) => p == n && wildcard(rest, tail),
        (Some(_), None) => false,
    }
}

/// Whether `name` is a partition link (`...-part3`) of /dev/disk/by-*.
fn is_partition_link(name: &str) -> bool {
    name.rsplit_once("-part")
        .is_some_and(|(_, n)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Expands the device list: a last path component with `*` or `?` is
/// matched against its directory's entries (sorted; `-partN` links
/// skipped), and a directory stands for its block devices and `*.img`
/// files. Expanded entries that name a device already listed (several
/// by-id links to one drive) are kept once. Anything else is kept as
/// given.
pub fn expand_devices(list: &[PathBuf]) -> Result<Vec<PathBuf>, String> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let mut out: Vec<PathBuf> = Vec::new();
    let mut seen: Vec<(u64, u64, u64)> = Vec::new();
    // An expanded entry that names a device already listed is dropped; one
    // given explicitly twice stays, and the pool refuses it by name.
    let mut push = |p: PathBuf, out: &mut Vec<PathBuf>, expanded: bool| {
        if let Ok(m) = std::fs::metadata(&p) {
            let id = if m.file_type().is_block_device() {
                (0, 0, m.rdev())
            } else {
                (m.dev(), m.ino(), 0)
            };
            if expanded && seen.contains(&id) {
                return;
            }
            seen.push(id);
        }
        out.push(p);
    };
    for given in list {
        let name = given.file_name().map(|n| n.to_string_lossy().into_owned());
        let pattern = name.filter(|n| n.contains(['*', '?']));
        let entries = |dir: &Path| -> Result<Vec<PathBuf>, String> {
            let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(|e| format!("device {}: reading {}: {e}", given.display(), dir.display()))?
                .flatten()
                .map(|e| e.path())
                .collect();
            v.sort();
            Ok(v)
        };
        if let Some(pattern) = pattern {
            let dir = given
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            let matched: Vec<PathBuf> = entries(dir)?
                .into_iter()
                .filter(|p| {
                    let n = p
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    wildcard(pattern.as_bytes(), n.as_bytes()) && !is_partition_link(&n)
                })
                .collect();
            if matched.is_empty() {
                return Err(format!(
                    "device pattern {} matches nothing",
                    given.display()
                ));
            }
            for p in matched {
                push(p, &mut out, true);
            }
        } else if given.is_dir() {
            let matched: Vec<PathBuf> = entries(given)?
                .into_iter()
                .filter(|p| {
                    std::fs::metadata(p).is_ok_and(|m| {
                        m.file_type().is_block_device()
                            || (m.is_file() && p.extension().is_some_and(|e| e == "img"))
                    })
                })
                .collect();
            if matched.is_empty() {
                return Err(format!(
                    "device directory {} holds no block device and no .img file",
                    given.display()
                ));
            }
            for p in matched {
                push(p, &mut out, true);
            }
        } else {
            push(given.clone(), &mut out, false);
        }
    }
    Ok(out)
}
