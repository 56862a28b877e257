//! Which devices are which: a pool is assembled from the superblocks of
//! the devices given (any order, absent ones missing, other pools' and
//! duplicates refused), and a device is shown with a name that survives
//! reboots.

use super::*;

/// A name of block device `path` that survives reboots: its
/// `/dev/disk/by-id` link (the first in name order, `wwn-` links last)
/// and its serial from sysfs, where the system has them. `None` for files.
pub fn stable_name(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    if !meta.file_type().is_block_device() {
        return None;
    }
    let mut ids: Vec<String> = std::fs::read_dir("/dev/disk/by-id")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            std::fs::metadata(e.path())
                .is_ok_and(|m| m.file_type().is_block_device() && m.rdev() == meta.rdev())
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    ids.sort_by_key(|n| (n.starts_with("wwn-"), n.clone()));
    let dev_name = std::fs::canonicalize(path)
        .ok()?
        .file_name()?
        .to_string_lossy()
        .into_owned();
    let serial = std::fs::read_to_string(format!("/sys/class/block/{dev_name}/device/serial"))
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty());
    let parts: Vec<String> = ids
        .into_iter()
        .take(1)
        .map(|id| format!("/dev/disk/by-id/{id}"))
        .chain(serial.map(|s| format!("serial {s}")))
        .collect();
    (!parts.is_empty()).then(|| parts.join(", "))
}

/// Whether `a` and `b` name the same file or block device (through
/// symlinks such as /dev/disk/by-id, or different spellings).
pub(super) fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => {
            (x.dev(), x.ino()) == (y.dev(), y.ino())
                || (x.file_type().is_block_device() && x.rdev() == y.rdev())
        }
        _ => a == b,
    }
}

pub(super) type Opened = (PathBuf, File, u64, Probe);

/// Orders the devices of an existing pool by the index in their
/// superblocks, whatever order they were given in. Devices of another
/// pool and two devices claiming one index are refused by name; blank or
/// absent devices are left alone (logged). Indices no device
/// claims are missing (placeholders; the pool starts degraded); a blank
/// or absent device given at such an index's position is shown there.
#[allow(clippy::type_complexity)]
pub(super) fn assemble(
    opened: Vec<Opened>,
    was_absent: &[bool],
    stale_copy: &[bool],
    replacements: &[(u32, PathBuf)],
) -> Result<((Vec<Opened>, Vec<bool>), Vec<bool>), DeviceError> {
    let replaces = |index: u32, path: &Path| {
        replacements
            .iter()
            .any(|(i, p)| *i == index && same_file(p, path))
    };
    let reference = majority_pool(&opened);
    let pool_id = reference.pool_id;
    let count = reference.device_count as usize;
    let pool = pool_id_hex(&pool_id);
    let mut slots: Vec<Option<(Opened, bool)>> = (0..count).map(|_| None).collect();
    let mut unassigned: Vec<(usize, Opened)> = Vec::new();
    for (given_at, (entry, stale)) in opened.into_iter().zip(stale_copy).enumerate() {
        let sb = match &entry.3 {
            Probe::Ours(sb) => sb.clone(),
            _ => {
                unassigned.push((given_at, entry));
                continue;
            }
        };
        check_member(&entry.0, &sb, &reference)?;
        let slot = &mut slots[sb.device_index as usize];
        if let Some((first, _)) = slot {
            // A replaced device still there: its replacement wins.
            if replaces(sb.device_index, &entry.0) {
                tracing::info!(device = sb.device_index, old = %first.0.display(), new = %entry.0.display(), "device was replaced");
                *slot = Some((entry, *stale));
                continue;
            }
            if replaces(sb.device_index, &first.0) {
                tracing::info!(device = sb.device_index, old = %entry.0.display(), "device was replaced; the old one is not used");
                continue;
            }
            return Err(DeviceError::DuplicateIndex {
                index: sb.device_index,
                pool,
                first: first.0.clone(),
                second: entry.0,
            });
        }
        *slot = Some((entry, *stale));
    }
    let mut files = Vec::with_capacity(count);
    let mut stale = Vec::with_capacity(count);
    let mut missing = Vec::with_capacity(count);
    for (i, slot) in slots.into_iter().enumerate() {
        match slot {
            Some((entry, s)) => {
                files.push(entry);
                stale.push(s);
                missing.push(false);
            }
            None => {
                // Shown under the path given at its position, if that one
                // is blank or absent.
                let path = unassigned
                    .iter()
                    .position(|(at, _)| *at == i)
                    .map(|k| unassigned.swap_remove(k).1.0)
                    .unwrap_or_else(|| PathBuf::from(format!("(device {i} not given)")));
                tracing::warn!(device = i, path = %path.display(), "device of the pool is absent, blank or not given: starting without it");
                files.push((path, placeholder()?, 0, Probe::Blank));
                stale.push(false);
                missing.push(true);
            }
        }
    }
    for (at, (path, ..)) in unassigned {
        // Not an error: an old, replaced device may stay in the list. It
        // is left untouched; storaged does not grow pools.
        tracing::warn!(
            path = %path.display(),
            state = if was_absent[at] { "absent" } else { "blank" },
            "device given next to pool {pool} is not one of its devices; not used (storagectl device replace puts a device in)"
        );
    }
    Ok(((files, stale), missing))
}

/// A superblock of the pool most of the given devices belong to (on a
/// tie, the pool of the first device given). At least one device holds a
/// superblock of ours.
fn majority_pool(opened: &[Opened]) -> Superblock {
    let mut counts: Vec<([u8; 16], usize)> = Vec::new();
    for (_, _, _, p) in opened {
        if let Probe::Ours(sb) = p {
            match counts.iter_mut().find(|(id, _)| *id == sb.pool_id) {
                Some((_, n)) => *n += 1,
                None => counts.push((sb.pool_id, 1)),
            }
        }
    }
    let pool_id = counts
        .iter()
        .fold(None::<([u8; 16], usize)>, |best, &(id, n)| match best {
            Some((_, m)) if m >= n => best,
            _ => Some((id, n)),
        })
        .map(|(id, _)| id)
        .expect("an existing pool");
    opened
        .iter()
        .find_map(|(_, _, _, p)| match p {
            Probe::Ours(sb) if sb.pool_id == pool_id => Some(sb.clone()),
            _ => None,
        })
        .expect("a device of the pool")
}

/// Refuses the device at `path` (superblock `sb`) unless it belongs to the
/// pool of `reference`, with the same geometry.
fn check_member(path: &Path, sb: &Superblock, reference: &Superblock) -> Result<(), DeviceError> {
    if sb.pool_id != reference.pool_id {
        return Err(DeviceError::WrongPool {
            path: path.to_path_buf(),
            expected: pool_id_hex(&reference.pool_id),
            found: pool_id_hex(&sb.pool_id),
        });
    }
    let count = reference.device_count;
    if sb.device_count != count
        || sb.device_index >= count
        || sb.layout() != reference.layout()
        || sb.checksum_block_bytes != reference.checksum_block_bytes
    {
        return Err(DeviceError::GeometryMismatch {
            path: path.to_path_buf(),
            detail: format!(
                "device {} of {} with {:?}, against device {} of {} with {:?}",
                sb.device_index,
                sb.device_count,
                sb.layout(),
                reference.device_index,
                reference.device_count,
                reference.layout()
            ),
        });
    }
    Ok(())
}

/// Stands in for a missing device in the engine's file table; the device
/// router never lets an operation reach it.
pub(super) fn placeholder() -> Result<File, DeviceError> {
    File::open("/dev/null").map_err(io_err(Path::new("/dev/null")))
}
