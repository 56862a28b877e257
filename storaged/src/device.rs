//! Devices and their superblocks; assembling them into a pool.
//!
//! Every device starts with a 4 KiB superblock (layout in docs/FORMAT.md):
//! magic, format version, pool id, this device's index, the pool geometry and
//! a CRC-32 over the rest. At start storaged reads all superblocks and either
//! recognizes one consistent pool, formats blank devices into a new one, or
//! refuses with an error naming the device and the problem. It never writes
//! to a device holding bytes it does not recognize unless `--force` is given.
//!
//! Superblocks are read and written synchronously with pread/pwrite at start:
//! this happens once, before the engine exists, and is not on any data path.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use memmap2::MmapMut;

use crate::layout::StripeLayout;

pub const SUPERBLOCK_MAGIC: [u8; 8] = *b"STORAGED";
/// Version 2: pool roots and manifests on the devices (docs/FORMAT.md).
pub const FORMAT_VERSION: u32 = 2;
/// Version 1 pools are upgraded in place at start: manifests and a root
/// are written first, then each superblock says 2.
pub const FORMAT_VERSION_UPGRADABLE: u32 = 1;
pub const SUPERBLOCK_BYTES: usize = 4096;
/// The data area starts 1 MiB into each device, leaving room after the
/// superblock for future metadata (a second superblock copy, EC tables).
pub const DATA_OFFSET_BYTES: u64 = 1 << 20;
/// Granularity of data checksums (CRC-32 IEEE, crc32fast), from the wire
/// contract. A 4 KiB read that straddles two blocks reads at most
/// 2 × 32 KiB = 64 KiB.
pub const CHECKSUM_BLOCK_BYTES: u32 = storaged_proto::model::CHECKSUM_BLOCK_BYTES;

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("device {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("device {path}: the file system does not support O_DIRECT ({source})")]
    NoDirectIo { path: PathBuf, source: io::Error },
    #[error("device {path} does not exist and no --device-size was given to create it")]
    Missing { path: PathBuf },
    #[error("device {path} is neither a regular file nor a block device")]
    NotADevice { path: PathBuf },
    #[error(
        "device {path} holds data storaged does not recognize; refusing to overwrite it (pass --force to erase it)"
    )]
    Foreign { path: PathBuf },
    #[error(
        "device {path} has a storaged superblock with a bad checksum (stored {stored:#010x}, computed {computed:#010x})"
    )]
    BadChecksum {
        path: PathBuf,
        stored: u32,
        computed: u32,
    },
    #[error(
        "device {path} has on-disk format version {version}; this storaged reads versions {FORMAT_VERSION_UPGRADABLE} (upgraded in place) and {FORMAT_VERSION}"
    )]
    UnknownVersion { path: PathBuf, version: u32 },
    #[error(
        "device {path} belongs to pool {found}, but the other devices belong to pool {expected}; leave it out, or pass --force to erase every device given"
    )]
    WrongPool {
        path: PathBuf,
        expected: String,
        found: String,
    },
    #[error(
        "{first} and {second} both hold device {index} of pool {pool} (the same device given twice, or a copy of it); give one of them"
    )]
    DuplicateIndex {
        index: u32,
        pool: String,
        first: PathBuf,
        second: PathBuf,
    },

    #[error("device {path} has a different pool geometry than device 0 ({detail})")]
    GeometryMismatch { path: PathBuf, detail: String },
    #[error("device {path} is {size} bytes; at least {min} are needed")]
    TooSmall { path: PathBuf, size: u64, min: u64 },
    #[error("{0}")]
    Config(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> DeviceError + '_ {
    move |source| DeviceError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Decoded superblock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub format_version: u32,
    pub pool_id: [u8; 16],
    pub device_index: u32,
    pub device_count: u32,
    pub stripe_unit_bytes: u64,
    pub data_offset_bytes: u64,
    pub device_data_bytes: u64,
    pub device_size_bytes: u64,
    pub created_unix_ms: u64,
    pub checksum_block_bytes: u32,
    pub block_bytes: u32,
}

/// What the first 4 KiB of a device hold.
#[derive(Debug)]
pub enum Probe {
    Blank,
    Ours(Superblock),
    Foreign,
}

impl Superblock {
    pub fn encode(&self, out: &mut [u8]) {
        assert_eq!(out.len(), SUPERBLOCK_BYTES);
        out.fill(0);
        out[0..8].copy_from_slice(&SUPERBLOCK_MAGIC);
        out[8..12].copy_from_slice(&self.format_version.to_le_bytes());
        out[12..16].copy_from_slice(&(SUPERBLOCK_BYTES as u32).to_le_bytes());
        out[16..32].copy_from_slice(&self.pool_id);
        out[32..36].copy_from_slice(&self.device_index.to_le_bytes());
        out[36..40].copy_from_slice(&self.device_count.to_le_bytes());
        out[40..48].copy_from_slice(&self.stripe_unit_bytes.to_le_bytes());
        out[48..56].copy_from_slice(&self.data_offset_bytes.to_le_bytes());
        out[56..64].copy_from_slice(&self.device_data_bytes.to_le_bytes());
        out[64..72].copy_from_slice(&self.device_size_bytes.to_le_bytes());
        out[72..80].copy_from_slice(&self.created_unix_ms.to_le_bytes());
        out[80..84].copy_from_slice(&self.checksum_block_bytes.to_le_bytes());
        out[84..88].copy_from_slice(&self.block_bytes.to_le_bytes());
        let crc = crc32fast::hash(&out[..SUPERBLOCK_BYTES - 4]);
        out[SUPERBLOCK_BYTES - 4..].copy_from_slice(&crc.to_le_bytes());
    }

    /// Classifies a device's first 4 KiB.
    pub fn probe(block: &[u8], path: &Path) -> Result<Probe, DeviceError> {
        if block.len() != SUPERBLOCK_BYTES {
            // Not a whole superblock: nothing of ours.
            return Ok(Probe::Foreign);
        }
        if block.iter().all(|b| *b == 0) {
            return Ok(Probe::Blank);
        }
        if block[0..8] != SUPERBLOCK_MAGIC {
            return Ok(Probe::Foreign);
        }
        let u32_at = |o: usize| u32::from_le_bytes(block[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(block[o..o + 8].try_into().expect("8 bytes"));
        let stored = u32_at(SUPERBLOCK_BYTES - 4);
        let computed = crc32fast::hash(&block[..SUPERBLOCK_BYTES - 4]);
        if stored != computed {
            return Err(DeviceError::BadChecksum {
                path: path.to_owned(),
                stored,
                computed,
            });
        }
        let version = u32_at(8);
        if version != FORMAT_VERSION && version != FORMAT_VERSION_UPGRADABLE {
            return Err(DeviceError::UnknownVersion {
                path: path.to_owned(),
                version,
            });
        }
        Ok(Probe::Ours(Superblock {
            format_version: version,
            pool_id: block[16..32].try_into().expect("16 bytes"),
            device_index: u32_at(32),
            device_count: u32_at(36),
            stripe_unit_bytes: u64_at(40),
            data_offset_bytes: u64_at(48),
            device_data_bytes: u64_at(56),
            device_size_bytes: u64_at(64),
            created_unix_ms: u64_at(72),
            checksum_block_bytes: u32_at(80),
            block_bytes: u32_at(84),
        }))
    }

    pub fn layout(&self) -> StripeLayout {
        StripeLayout {
            device_count: self.device_count,
            stripe_unit_bytes: self.stripe_unit_bytes,
            data_offset_bytes: self.data_offset_bytes,
            device_data_bytes: self.device_data_bytes,
        }
    }
}

/// Pool id as 32 hex digits.
pub fn pool_id_hex(id: &[u8; 16]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// What to open and how.
#[derive(Debug, Clone)]
pub struct PoolSpec {
    pub devices: Vec<PathBuf>,
    /// Size of device files created because they were missing.
    pub create_size_bytes: Option<u64>,
    /// Stripe unit for a newly formatted pool.
    pub stripe_unit_bytes: u64,
    /// Erase devices that hold unrecognized data or another pool.
    pub force: bool,
    /// Where `device replace` put device `index` (from the catalog): used
    /// as well as `devices`, and preferred over any other device claiming
    /// that index (the replaced one, if it is still there).
    pub replacements: Vec<(u32, PathBuf)>,
}

/// An assembled pool: open O_DIRECT files in device-index order.
#[derive(Debug)]
pub struct OpenedPool {
    pub files: Vec<File>,
    pub paths: Vec<PathBuf>,
    pub superblocks: Vec<Superblock>,
    pub layout: StripeLayout,
    pub pool_id: [u8; 16],
    /// True when this start formatted the devices.
    pub formatted: bool,
    /// Devices of an existing pool that are absent or blank: the pool runs
    /// degraded without them (their `files` entry is a placeholder that is
    /// never read or written).
    pub missing: Vec<bool>,
    /// Devices whose superblock copies disagreed and were rewritten.
    pub superblocks_repaired: u32,
}

fn open_device(path: &Path, create_size: Option<u64>) -> Result<(File, u64), DeviceError> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => Some(m),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(io_err(path)(e)),
    };
    if let Some(m) = &meta {
        let ft = m.file_type();
        if !ft.is_file() && !ft.is_block_device() {
            return Err(DeviceError::NotADevice {
                path: path.to_owned(),
            });
        }
    }
    let create = meta.is_none();
    if create && create_size.is_none() {
        return Err(DeviceError::Missing {
            path: path.to_owned(),
        });
    }
    if create && let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io_err(path))?;
    }
    // Created readable by storaged only: a device file holds every
    // tenant's raw bytes.
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .map_err(|source| {
            if source.raw_os_error() == Some(libc::EINVAL) {
                DeviceError::NoDirectIo {
                    path: path.to_owned(),
                    source,
                }
            } else {
                io_err(path)(source)
            }
        })?;
    if create {
        // A sparse file: only blocks actually written take space.
        file.set_len(create_size.expect("checked above"))
            .map_err(io_err(path))?;
    }
    let size = file.seek(SeekFrom::End(0)).map_err(io_err(path))?;
    Ok((file, size))
}

fn aligned_block() -> io::Result<MmapMut> {
    MmapMut::map_anon(SUPERBLOCK_BYTES)
}

/// Bytes a primary superblock may differ from its good copy in and still
/// count as a damaged superblock of ours rather than foreign data.
const SUPERBLOCK_ROT_BYTES_MAX: usize = 16;

/// Where the second copy of the superblock lives.
pub const SUPERBLOCK_COPY_OFFSET: u64 = SUPERBLOCK_BYTES as u64;

fn read_block(file: &File, path: &Path, offset: u64) -> Result<MmapMut, DeviceError> {
    let mut block = aligned_block().map_err(io_err(path))?;
    let n = file.read_at(&mut block[..], offset).map_err(io_err(path))?;
    if n < SUPERBLOCK_BYTES {
        return Err(DeviceError::TooSmall {
            path: path.to_owned(),
            size: offset + n as u64,
            min: DATA_OFFSET_BYTES,
        });
    }
    Ok(block)
}

fn read_superblock(file: &File, path: &Path) -> Result<Probe, DeviceError> {
    read_superblock_copies(file, path).map(|(p, _)| p)
}

/// Probes both superblock copies. A damaged or zeroed primary next to a
/// good copy is answered from the copy; the flag says the copies disagree
/// and should be rewritten.
fn read_superblock_copies(file: &File, path: &Path) -> Result<(Probe, bool), DeviceError> {
    let primary_block = read_block(file, path, 0)?;
    let primary = Superblock::probe(&primary_block[..], path);
    let copy_block = read_block(file, path, SUPERBLOCK_COPY_OFFSET).ok();
    let copy = match &copy_block {
        Some(b) => Superblock::probe(&b[..], path),
        None => Ok(Probe::Blank),
    };
    // A primary that looks foreign only because a few of its bytes rotted
    // (its magic, say) next to a good copy is ours, damaged; one that
    // differs from the copy in more than a few bytes was overwritten by
    // something else, and stays foreign.
    let copy_is_ours = matches!(copy, Ok(Probe::Ours(_)));
    let rotted = copy_is_ours
        && copy_block.as_ref().is_some_and(|c| {
            primary_block
                .iter()
                .zip(c.iter())
                .filter(|(a, b)| a != b)
                .count()
                <= SUPERBLOCK_ROT_BYTES_MAX
        });
    let primary = match primary {
        Ok(Probe::Foreign) if rotted => Err(DeviceError::BadChecksum {
            path: path.to_owned(),
            stored: 0,
            computed: 0,
        }),
        other => other,
    };
    match (primary, copy) {
        (Ok(Probe::Ours(a)), Ok(Probe::Ours(b))) => {
            let same = a == b;
            Ok((Probe::Ours(a), !same))
        }
        // A pool formatted before the copy existed, or a damaged copy.
        (Ok(Probe::Ours(a)), _) => Ok((Probe::Ours(a), true)),
        (Err(DeviceError::BadChecksum { .. }) | Ok(Probe::Blank), Ok(Probe::Ours(b))) => {
            tracing::warn!(path = %path.display(), "primary superblock is damaged; using its copy");
            Ok((Probe::Ours(b), true))
        }
        (primary, _) => primary.map(|p| (p, false)),
    }
}

/// Finishes an upgrade: every present device whose superblock is of an
/// older format gets one of this format (both copies, synced). Call only
/// once what the new format promises is on the devices. Returns how many
/// were rewritten.
pub fn upgrade_superblocks(
    files: &[File],
    paths: &[PathBuf],
    superblocks: &mut [Superblock],
    missing: &[bool],
) -> Result<u32, DeviceError> {
    let mut n = 0;
    for (((file, path), sb), gone) in files
        .iter()
        .zip(paths)
        .zip(superblocks.iter_mut())
        .zip(missing)
    {
        if *gone || sb.format_version == FORMAT_VERSION {
            continue;
        }
        sb.format_version = FORMAT_VERSION;
        write_superblock(file, path, sb)?;
        n += 1;
    }
    if n > 0 {
        tracing::info!(
            devices = n,
            version = FORMAT_VERSION,
            "pool upgraded in place"
        );
    }
    Ok(n)
}

/// Opens `path` read-only (O_DIRECT) and reads its superblock, from the
/// copy when the primary is damaged; writes nothing (`storaged recover`).
pub fn probe_read_only(path: &Path) -> Result<(File, Probe), DeviceError> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => DeviceError::Missing {
                path: path.to_owned(),
            },
            _ => io_err(path)(source),
        })?;
    let (probe, _) = read_superblock_copies(&file, path)?;
    Ok((file, probe))
}

fn write_superblock(file: &File, path: &Path, sb: &Superblock) -> Result<(), DeviceError> {
    let mut block = aligned_block().map_err(io_err(path))?;
    sb.encode(&mut block[..]);
    file.write_all_at(&block[..], 0).map_err(io_err(path))?;
    file.write_all_at(&block[..], SUPERBLOCK_COPY_OFFSET)
        .map_err(io_err(path))?;
    file.sync_data().map_err(io_err(path))
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A device as `open_pool` found it: path, file, size, what it holds.
type Probed = (PathBuf, File, u64, Probe);

/// What `probe_devices` found, device by device in the order given.
struct Probes {
    opened: Vec<Probed>,
    /// No file at its path.
    was_absent: Vec<bool>,
    /// Its superblock copies disagree (rewritten once the pool is known).
    stale_copy: Vec<bool>,
}

/// Refuses a pool spec no pool can have.
fn check_spec(spec: &PoolSpec) -> Result<(), DeviceError> {
    if spec.devices.is_empty() {
        return Err(DeviceError::Config("no devices given".into()));
    }
    if spec.devices.len() > 256 {
        return Err(DeviceError::Config(format!(
            "{} devices given; at most 256 are supported",
            spec.devices.len()
        )));
    }
    let unit = spec.stripe_unit_bytes;
    if !(64 * 1024..=16 << 20).contains(&unit) || !unit.is_power_of_two() {
        return Err(DeviceError::Config(format!(
            "stripe unit {unit} must be a power of two from 64 KiB to 16 MiB"
        )));
    }
    Ok(())
}

/// Opens every device given that exists and reads what it holds; an
/// absent one is a blank placeholder. Returns the devices, which were
/// absent, and which had superblock copies that disagree.
fn probe_devices(given: &[PathBuf]) -> Result<Probes, DeviceError> {
    let mut opened = Vec::with_capacity(given.len());
    let mut was_absent = Vec::with_capacity(given.len());
    let mut stale_copy = Vec::with_capacity(given.len());
    for path in given {
        if opened
            .iter()
            .any(|(p, _, _, _): &Probed| same_file(p, path))
        {
            return Err(DeviceError::Config(format!(
                "device {} is given twice",
                path.display()
            )));
        }
        let absent =
            matches!(std::fs::metadata(path), Err(e) if e.kind() == io::ErrorKind::NotFound);
        if absent {
            opened.push((path.clone(), placeholder()?, 0, Probe::Blank));
            stale_copy.push(false);
        } else {
            let (file, size) = open_device(path, None)?;
            let (probe, stale) = read_superblock_copies(&file, path)?;
            opened.push((path.clone(), file, size, probe));
            stale_copy.push(stale);
        }
        was_absent.push(absent);
    }
    Ok(Probes {
        opened,
        was_absent,
        stale_copy,
    })
}

/// Opens (creating missing files) and validates or formats the devices.
pub fn open_pool(spec: &PoolSpec) -> Result<OpenedPool, DeviceError> {
    check_spec(spec)?;
    let unit = spec.stripe_unit_bytes;
    let mut given = spec.devices.clone();
    for (_, p) in &spec.replacements {
        if !given.iter().any(|g| same_file(g, p)) {
            given.push(p.clone());
        }
    }
    let Probes {
        mut opened,
        was_absent,
        mut stale_copy,
    } = probe_devices(&given)?;
    let first_ours = opened.iter().find_map(|(_, _, _, p)| match p {
        Probe::Ours(sb) => Some(sb.clone()),
        _ => None,
    });
    if let Some(path) = opened
        .iter()
        .find(|(_, _, _, p)| matches!(p, Probe::Foreign))
        .map(|(p, ..)| p.clone())
        && !spec.force
    {
        return Err(DeviceError::Foreign { path });
    }
    let mut missing = Vec::new();
    let needs_format = match (&first_ours, spec.force) {
        (_, true) => {
            if opened.iter().any(|(_, _, _, p)| !matches!(p, Probe::Blank)) {
                tracing::warn!("--force: erasing every device and creating a new pool");
            }
            true
        }
        (None, false) => true,
        (Some(_), false) => {
            let (assembled, gone) = assemble(opened, &was_absent, &stale_copy, &spec.replacements)?;
            opened = assembled.0;
            stale_copy = assembled.1;
            missing = gone;
            false
        }
    };
    if needs_format {
        // A new pool: absent files are created, in the order given.
        for (i, entry) in opened.iter_mut().enumerate() {
            if was_absent[i] {
                let (file, size) = open_device(&entry.0, spec.create_size_bytes)?;
                let probe = read_superblock(&file, &entry.0)?;
                *entry = (entry.0.clone(), file, size, probe);
            }
        }
        missing = vec![false; opened.len()];
    }

    let (superblocks, formatted) = if needs_format {
        (format_pool(&opened, unit)?, true)
    } else {
        let reference = first_ours.as_ref().expect("an existing pool");
        let sbs = opened
            .iter()
            .enumerate()
            .map(|(i, (_, _, _, p))| match p {
                Probe::Ours(sb) => sb.clone(),
                _ => Superblock {
                    device_index: i as u32,
                    device_size_bytes: 0,
                    ..reference.clone()
                },
            })
            .collect::<Vec<_>>();
        (sbs, false)
    };
    check_sizes(&opened, &superblocks, &missing)?;
    // Superblock copies that disagree (one damaged, or a pool from before
    // the copy existed) are rewritten from the good one.
    let superblocks_repaired = if formatted {
        0
    } else {
        repair_superblock_copies(&opened, &superblocks, &stale_copy)?
    };
    let layout = superblocks[0].layout();
    let pool_id = superblocks[0].pool_id;
    let (paths, files) = opened.into_iter().map(|(p, f, _, _)| (p, f)).unzip();
    Ok(OpenedPool {
        files,
        paths,
        superblocks,
        layout,
        pool_id,
        formatted,
        missing,
        superblocks_repaired,
    })
}

/// Refuses a device that shrank since it was formatted (it would lose
/// data); missing ones are not checked.
fn check_sizes(
    opened: &[Probed],
    superblocks: &[Superblock],
    missing: &[bool],
) -> Result<(), DeviceError> {
    for (((path, _, size, _), sb), gone) in opened.iter().zip(superblocks).zip(missing) {
        if !gone && *size < sb.data_offset_bytes + sb.device_data_bytes {
            return Err(DeviceError::TooSmall {
                path: path.clone(),
                size: *size,
                min: sb.data_offset_bytes + sb.device_data_bytes,
            });
        }
    }
    Ok(())
}

/// Rewrites both superblock copies of each device whose copies disagree;
/// returns how many.
fn repair_superblock_copies(
    opened: &[Probed],
    superblocks: &[Superblock],
    stale_copy: &[bool],
) -> Result<u32, DeviceError> {
    let mut repaired = 0;
    for (((path, file, _, _), sb), stale) in opened.iter().zip(superblocks).zip(stale_copy) {
        if *stale {
            write_superblock(file, path, sb)?;
            repaired += 1;
            tracing::warn!(path = %path.display(), "superblock copies rewritten");
        }
    }
    Ok(repaired)
}

/// Writes a new pool's superblock on every device (a new pool id; data
/// bytes per device from the smallest).
fn format_pool(opened: &[Probed], unit: u64) -> Result<Vec<Superblock>, DeviceError> {
    let min_size = opened
        .iter()
        .map(|(_, _, s, _)| *s)
        .min()
        .expect("non-empty");
    let need = DATA_OFFSET_BYTES + unit;
    if let Some((path, _, size, _)) = opened.iter().find(|(_, _, s, _)| *s < need) {
        return Err(DeviceError::TooSmall {
            path: path.clone(),
            size: *size,
            min: need,
        });
    }
    let device_data_bytes = (min_size - DATA_OFFSET_BYTES) / unit * unit;
    let mut pool_id = [0u8; 16];
    getrandom::fill(&mut pool_id)
        .map_err(|e| DeviceError::Config(format!("no randomness for a pool id: {e}")))?;
    let created = now_unix_ms();
    let mut sbs = Vec::with_capacity(opened.len());
    for (i, (path, file, size, _)) in opened.iter().enumerate() {
        let sb = Superblock {
            format_version: FORMAT_VERSION,
            pool_id,
            device_index: i as u32,
            device_count: opened.len() as u32,
            stripe_unit_bytes: unit,
            data_offset_bytes: DATA_OFFSET_BYTES,
            device_data_bytes,
            device_size_bytes: *size,
            created_unix_ms: created,
            checksum_block_bytes: CHECKSUM_BLOCK_BYTES,
            block_bytes: 4096,
        };
        write_superblock(file, path, &sb)?;
        sbs.push(sb);
    }
    tracing::info!(
        pool = %pool_id_hex(&pool_id),
        devices = opened.len(),
        stripe_unit_bytes = unit,
        "formatted a new pool"
    );
    Ok(sbs)
}

/// Opens (creating if absent) the device that replaces device `index` of
/// the pool described by `reference`, and writes its superblock. It must be
/// blank, or already this pool's device `index` (a replacement that was
/// interrupted); anything else is refused so that no data is overwritten
/// by mistake.
pub fn prepare_replacement(
    path: &Path,
    reference: &Superblock,
    index: u32,
    overwrite: bool,
) -> Result<File, DeviceError> {
    let need = reference.data_offset_bytes + reference.device_data_bytes;
    // Never created here: a typo must not become a file (or a directory
    // tree) made by root, and the device's size is the operator's choice.
    let (file, size) = open_device(path, None).map_err(|e| match e {
        DeviceError::Missing { path } => DeviceError::Config(format!(
            "{} does not exist; create it first (a block device, or a file: truncate -s {need} {})",
            path.display(),
            path.display()
        )),
        e => e,
    })?;
    if size < need {
        return Err(DeviceError::TooSmall {
            path: path.into(),
            size,
            min: need,
        });
    }
    match read_superblock(&file, path)? {
        Probe::Ours(sb) if sb.pool_id == reference.pool_id && sb.device_index == index => {}
        _ if overwrite => {}
        Probe::Blank => {
            if let Some(at) = first_nonzero(&file, path, REPLACEMENT_SCAN_BYTES.min(size))? {
                return Err(DeviceError::Config(format!(
                    "{} holds data (a non-zero byte at offset {at}); refusing to overwrite it (an admin may force it)",
                    path.display()
                )));
            }
        }
        Probe::Ours(sb) => {
            return Err(DeviceError::Config(format!(
                "device {} already belongs to pool {} as device {}; refusing to overwrite it",
                path.display(),
                pool_id_hex(&sb.pool_id),
                sb.device_index
            )));
        }
        Probe::Foreign => return Err(DeviceError::Foreign { path: path.into() }),
    }
    let sb = Superblock {
        device_index: index,
        device_size_bytes: size,
        ..reference.clone()
    };
    write_superblock(&file, path, &sb)?;
    Ok(file)
}

/// How much of a replacement device must read as zeros: partition tables,
/// file system and volume headers all live in its first MiB.
const REPLACEMENT_SCAN_BYTES: u64 = 1 << 20;

/// The offset of the first non-zero byte in `[0, len)` of `file`.
fn first_nonzero(file: &File, path: &Path, len: u64) -> Result<Option<u64>, DeviceError> {
    let mut block = aligned_block().map_err(io_err(path))?;
    let step = block.len() as u64;
    let mut at = 0;
    while at < len {
        let n = file.read_at(&mut block[..], at).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        if let Some(i) = block[..n].iter().position(|b| *b != 0) {
            return Ok(Some(at + i as u64));
        }
        at += step;
    }
    Ok(None)
}

mod identity;
pub use identity::stable_name;
use identity::{assemble, placeholder, same_file};

#[cfg(test)]
mod tests;
