//! `storaged recover`: the catalog rebuilt from the devices alone, opening
//! them read-only. `storaged serve` does the same by itself when its
//! catalog is missing or behind; this is the explicit, inspectable form
//! (and `--dry-run` only reports).
//!
//! Devices are recognized by their superblocks, whatever order they come
//! in; absent ones are allowed (any present device holds the root and
//! every manifest).

use std::path::{Path, PathBuf};

use crate::catalog::{Catalog, CatalogError, DatasetRecord};
use crate::device::{DeviceError, Probe, pool_id_hex, probe_read_only};
use crate::poolmeta::{MetaDevices, PoolMetaError};

#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    #[error("no --device given")]
    NoDevices,
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("device {0} holds no storaged superblock (blank or another program's data)")]
    NotOurs(PathBuf),
    #[error("the devices belong to different pools: {0}")]
    MixedPools(String),
    #[error(
        "{first} and {second} are both device {index} of the pool (the same device given twice?)"
    )]
    DuplicateIndex {
        index: u32,
        first: PathBuf,
        second: PathBuf,
    },
    #[error(
        "no pool root on these devices: the pool predates roots (a catalog is then the only record) or its roots are damaged"
    )]
    NoRoot,
    #[error(transparent)]
    PoolMeta(#[from] PoolMetaError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error("moving the existing catalog {path} aside: {source}")]
    MoveAside {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What the devices hold, and what was written.
#[derive(Debug)]
pub struct RecoverReport {
    pub pool_id: String,
    /// `(index, path)` of each device found, in index order.
    pub devices: Vec<(u32, PathBuf)>,
    /// Indices of the pool's devices that were not given.
    pub missing: Vec<u32>,
    pub generation: u64,
    pub datasets: Vec<(String, DatasetRecord)>,
    /// The catalog written (None with `dry_run`).
    pub catalog: Option<PathBuf>,
    /// Where an existing catalog was moved.
    pub moved_aside: Option<PathBuf>,
}

/// Reads the pool on `devices` and (unless `dry_run`) writes
/// `data_dir/catalog.redb` from it, moving an existing one aside.
pub fn recover(
    data_dir: &Path,
    devices: &[PathBuf],
    dry_run: bool,
) -> Result<RecoverReport, RecoverError> {
    if devices.is_empty() {
        return Err(RecoverError::NoDevices);
    }
    let mut found: Vec<(crate::device::Superblock, PathBuf, std::fs::File)> = Vec::new();
    for path in devices {
        let (file, probe) = probe_read_only(path)?;
        match probe {
            Probe::Ours(sb) => found.push((sb, path.clone(), file)),
            Probe::Blank | Probe::Foreign => return Err(RecoverError::NotOurs(path.clone())),
        }
    }
    let pool_id = found[0].0.pool_id;
    if found.iter().any(|(sb, ..)| sb.pool_id != pool_id) {
        let list: Vec<String> = found
            .iter()
            .map(|(sb, p, _)| format!("{} is in pool {}", p.display(), pool_id_hex(&sb.pool_id)))
            .collect();
        return Err(RecoverError::MixedPools(list.join(", ")));
    }
    let first = &found[0].0;
    let layout = first.layout();
    let mut files: Vec<Option<std::fs::File>> = (0..layout.device_count).map(|_| None).collect();
    let mut paths: Vec<Option<PathBuf>> = vec![None; layout.device_count as usize];
    for (sb, path, file) in found {
        let i = sb.device_index as usize;
        if i >= files.len() || sb.layout() != layout {
            return Err(DeviceError::GeometryMismatch {
                path,
                detail: "its superblock disagrees with the first device's".into(),
            }
            .into());
        }
        if let Some(first) = &paths[i] {
            return Err(RecoverError::DuplicateIndex {
                index: sb.device_index,
                first: first.clone(),
                second: path,
            });
        }
        paths[i] = Some(path);
        files[i] = Some(file);
    }
    let meta = MetaDevices::from_files(files, layout);
    let root = meta.read_newest_root(pool_id).ok_or(RecoverError::NoRoot)?;
    let mut manifests = Vec::with_capacity(root.entries.len());
    for entry in &root.entries {
        manifests.push(meta.read_manifest(entry)?);
    }
    let mut report = RecoverReport {
        pool_id: pool_id_hex(&pool_id),
        devices: paths
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.clone().map(|p| (i as u32, p)))
            .collect(),
        missing: paths
            .iter()
            .enumerate()
            .filter(|(_, p)| p.is_none())
            .map(|(i, _)| i as u32)
            .collect(),
        generation: root.generation,
        datasets: manifests
            .iter()
            .map(|m| (m.name.clone(), m.record.clone()))
            .collect(),
        catalog: None,
        moved_aside: None,
    };
    if dry_run {
        return Ok(report);
    }
    std::fs::create_dir_all(data_dir).map_err(|source| RecoverError::MoveAside {
        path: data_dir.to_owned(),
        source,
    })?;
    let path = data_dir.join("catalog.redb");
    if path.exists() {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let aside = data_dir.join(format!("catalog.redb.before-recover-{stamp}"));
        std::fs::rename(&path, &aside).map_err(|source| RecoverError::MoveAside {
            path: path.clone(),
            source,
        })?;
        report.moved_aside = Some(aside);
    }
    let catalog = Catalog::open(&path, pool_id, false)?;
    for m in manifests {
        catalog.commit_dataset(&m.name, m.record, &m.objects, &m.unit_crcs)?;
    }
    let next = catalog.next_dataset_id()?.max(root.next_dataset_id);
    catalog.set_meta(&[
        ("next_dataset_id", Some(&next.to_le_bytes()[..])),
        ("root_generation", Some(&root.generation.to_le_bytes()[..])),
    ])?;
    report.catalog = Some(path);
    Ok(report)
}
