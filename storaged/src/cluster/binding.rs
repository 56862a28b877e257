//! `DATA_DIR/cluster.json`: which cluster, under which node id, this
//! node's pool joined. Checked at every start, so a node is not moved
//! into another cluster (or renamed) by a wrong flag.
//!
//! Losing the file loses no data and no membership: the member record in
//! etcd names the pool, so the node rejoins under its id and the file is
//! written again. Only the "another cluster" check is lost until then.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The binding's file name in the data dir.
pub const BINDING_FILE: &str = "cluster.json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Binding {
    pub format: u32,
    pub cluster_name: String,
    pub cluster_id: String,
    pub node_id: String,
    pub pool_id: String,
}

#[derive(Debug, thiserror::Error)]
pub enum BindingError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a cluster binding: {why}")]
    Corrupt { path: PathBuf, why: String },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl Binding {
    /// The binding in `data_dir`, if there is one.
    pub fn load(data_dir: &Path) -> Result<Option<Self>, BindingError> {
        let path = data_dir.join(BINDING_FILE);
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(BindingError::Read { path, source }),
        };
        let binding: Binding =
            serde_json::from_slice(&text).map_err(|e| BindingError::Corrupt {
                path: path.clone(),
                why: e.to_string(),
            })?;
        if binding.format != super::records::RECORD_FORMAT {
            return Err(BindingError::Corrupt {
                path,
                why: format!("format {}", binding.format),
            });
        }
        Ok(Some(binding))
    }

    /// Writes the binding durably: a temporary file, synced, renamed over
    /// the old one, and the directory synced.
    pub fn store(&self, data_dir: &Path) -> Result<(), BindingError> {
        let path = data_dir.join(BINDING_FILE);
        let tmp = data_dir.join(format!("{BINDING_FILE}.tmp"));
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&super::records::encode(self))?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(data_dir)?.sync_all()
        };
        write().map_err(|source| BindingError::Write { path, source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_binding_round_trips_and_a_damaged_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Binding::load(dir.path()).unwrap(), None);
        let b = Binding {
            format: 1,
            cluster_name: "c".into(),
            cluster_id: "00".repeat(16),
            node_id: "n1".into(),
            pool_id: "11".repeat(16),
        };
        b.store(dir.path()).unwrap();
        assert_eq!(Binding::load(dir.path()).unwrap(), Some(b));
        std::fs::write(dir.path().join(BINDING_FILE), b"{\"format\":").unwrap();
        assert!(matches!(
            Binding::load(dir.path()),
            Err(BindingError::Corrupt { .. })
        ));
    }
}
