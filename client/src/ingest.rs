//! Uploading a directory tree as a dataset.
//!
//! A producer task walks the tree (sorted, so the dataset's object order is
//! deterministic), and streams `begin`, then per file an `object` header and
//! its bytes in 1 MiB `data` messages, then `commit`, through a small
//! bounded channel into one client-streaming Ingest call. Files up to
//! 8 MiB are read whole first so their CRC-32 can travel in the header and
//! the server checks the bytes end to end; larger files are streamed and
//! checked by the server's own per-block CRCs. If anything fails locally the
//! stream ends without `commit`, and the server discards the ingest.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use storaged_proto::pb::{self, ingest_request::Msg};
use storaged_proto::{DatasetName, ObjectPath};
use tokio::io::AsyncReadExt;

use crate::ClientError;

const DATA_MESSAGE_BYTES: usize = 1 << 20;
const WHOLE_FILE_CRC_BYTES_MAX: u64 = 8 << 20;

/// Progress of an ingest, reported as bytes go out.
#[derive(Debug, Clone, Copy, Default)]
pub struct IngestProgress {
    pub total_bytes: u64,
    pub sent_bytes: u64,
    pub total_objects: u64,
    pub sent_objects: u64,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ClientError + '_ {
    move |source| ClientError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// How to ingest a tree.
#[derive(Debug, Clone, Copy, Default)]
pub struct IngestOptions {
    /// Storage class; `None`: the server's default (the reply names it).
    pub class: Option<storaged_proto::model::StorageClass>,
    /// Leave out files and directories this process may not read (each is
    /// named in [`Ingested::skipped`]) instead of failing the ingest.
    pub skip_unreadable: bool,
}

/// What an ingest made.
#[derive(Debug, Clone)]
pub struct Ingested {
    pub info: pb::DatasetInfo,
    /// Local paths left out as unreadable (with `skip_unreadable`), with
    /// why.
    pub skipped: Vec<String>,
}

/// The files of a tree to upload, and what was left out.
pub(crate) struct Walked {
    pub files: Vec<(ObjectPath, PathBuf, u64)>,
    pub skipped: Vec<String>,
}

/// Regular files under `root` with their object paths, sorted by path.
#[cfg(test)]
pub(crate) fn walk(root: &Path) -> Result<Vec<(ObjectPath, PathBuf, u64)>, ClientError> {
    walk_with(root, false).map(|w| w.files)
}

/// Whether `e` is a permission problem that `skip_unreadable` may skip.
fn unreadable(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::PermissionDenied
}

/// Regular files under `root`, sorted by object path; with
/// `skip_unreadable`, files and directories that cannot be read are left
/// out and listed instead of failing the walk.
pub(crate) fn walk_with(root: &Path, skip_unreadable: bool) -> Result<Walked, ClientError> {
    let meta = std::fs::metadata(root).map_err(io_err(root))?;
    if !meta.is_dir() {
        return Err(ClientError::Io {
            path: root.display().to_string(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a directory"),
        });
    }
    let mut out = Vec::new();
    let mut skipped = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if skip_unreadable && unreadable(&e) && dir != root => {
                skipped.push(format!("{}/: {e}", dir.display()));
                continue;
            }
            Err(e) => return Err(io_err(&dir)(e)),
        };
        for entry in entries {
            let entry = entry.map_err(io_err(&dir))?;
            let path = entry.path();
            let ft = entry.file_type().map_err(io_err(&path))?;
            if ft.is_dir() {
                stack.push(path);
                continue;
            }
            // Symlinks are followed to files only, which keeps the walk free
            // of cycles.
            let meta = if ft.is_symlink() {
                match std::fs::metadata(&path) {
                    Ok(m) if m.is_file() => m,
                    _ => {
                        tracing::warn!(path = %path.display(), "skipping symlink that is not to a regular file");
                        continue;
                    }
                }
            } else if ft.is_file() {
                entry.metadata().map_err(io_err(&path))?
            } else {
                tracing::warn!(path = %path.display(), "skipping special file");
                continue;
            };
            let rel = path.strip_prefix(root).expect("under root");
            let rel_str = rel.to_str().ok_or_else(|| ClientError::Io {
                path: path.display().to_string(),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "file name is not valid UTF-8",
                ),
            })?;
            let object = ObjectPath::new(rel_str)?;
            if skip_unreadable && let Err(e) = std::fs::File::open(&path) {
                if unreadable(&e) {
                    skipped.push(format!("{}: {e}", path.display()));
                    continue;
                }
                return Err(io_err(&path)(e));
            }
            out.push((object, path, meta.len()));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    skipped.sort();
    Ok(Walked {
        files: out,
        skipped,
    })
}

/// The sending side of an ingest stream.
struct IngestSender(tokio::sync::mpsc::Sender<pb::IngestRequest>);

impl IngestSender {
    async fn send(&self, m: Msg) -> Result<(), ClientError> {
        self.0
            .send(pb::IngestRequest { msg: Some(m) })
            .await
            .map_err(|_| ClientError::Protocol("the server closed the ingest stream".into()))
    }

    /// Sends the file at `path` as object `object`, in messages of
    /// `DATA_MESSAGE_BYTES`, calling `sent` with each one's bytes. A file up
    /// to `WHOLE_FILE_CRC_BYTES_MAX` is read whole first, so its CRC goes
    /// with its header (and the server checks it); a larger one streams.
    /// Returns its size.
    async fn send_file(
        &self,
        object: &str,
        path: &Path,
        sent: &mut (impl FnMut(u64) + Send),
    ) -> Result<u64, ClientError> {
        let mut f = tokio::fs::File::open(path).await.map_err(|e| {
            let hint = if unreadable(&e) {
                " (--skip-unreadable leaves such files out)"
            } else {
                ""
            };
            ClientError::Io {
                path: format!("{}{hint}", path.display()),
                source: e,
            }
        })?;
        let size = f.metadata().await.map_err(io_err(path))?.len();
        if size <= WHOLE_FILE_CRC_BYTES_MAX {
            let mut buf = Vec::with_capacity(size as usize);
            f.read_to_end(&mut buf).await.map_err(io_err(path))?;
            if buf.len() as u64 != size {
                return Err(ClientError::Protocol(format!(
                    "{} changed size while being read",
                    path.display()
                )));
            }
            self.send(Msg::Object(pb::ObjectBegin {
                path: object.to_string(),
                size,
                crc32: Some(crc32fast::hash(&buf)),
            }))
            .await?;
            let buf = Bytes::from(buf);
            let mut at = 0;
            while at < buf.len() {
                let end = (at + DATA_MESSAGE_BYTES).min(buf.len());
                self.send(Msg::Data(buf.slice(at..end))).await?;
                sent((end - at) as u64);
                at = end;
            }
        } else {
            self.send(Msg::Object(pb::ObjectBegin {
                path: object.to_string(),
                size,
                crc32: None,
            }))
            .await?;
            let mut left = size;
            while left > 0 {
                let n = (left as usize).min(DATA_MESSAGE_BYTES);
                let mut buf = vec![0u8; n];
                f.read_exact(&mut buf).await.map_err(io_err(path))?;
                self.send(Msg::Data(Bytes::from(buf))).await?;
                left -= n as u64;
                sent(n as u64);
            }
        }
        Ok(size)
    }
}

pub(crate) async fn ingest_dir(
    mut rpc: crate::Rpc,
    name: DatasetName,
    root: &Path,
    options: IngestOptions,
    mut progress: impl FnMut(IngestProgress) + Send + 'static,
) -> Result<Ingested, ClientError> {
    let (storage_class, ec_data_units, ec_parity_units) = match options.class {
        Some(c) => c.to_wire(),
        None => (pb::StorageClass::Unspecified, 0, 0),
    };
    let Walked { files, skipped } = walk_with(root, options.skip_unreadable)?;
    let mut p = IngestProgress {
        total_bytes: files.iter().map(|f| f.2).sum(),
        total_objects: files.len() as u64,
        ..Default::default()
    };
    progress(p);
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::IngestRequest>(8);
    let producer = tokio::spawn(async move {
        let sender = IngestSender(tx);
        sender
            .send(Msg::Begin(pb::IngestBegin {
                dataset: name.to_string(),
                storage_class: storage_class as i32,
                ec_data_units,
                ec_parity_units,
                cluster_unit: false,
            }))
            .await?;
        let mut total = 0u64;
        for (object, path, _) in &files {
            let size = sender
                .send_file(object.as_str(), path, &mut |n| {
                    p.sent_bytes += n;
                    progress(p);
                })
                .await?;
            total += size;
            p.sent_objects += 1;
            progress(p);
        }
        sender
            .send(Msg::Commit(pb::IngestCommit {
                object_count: files.len() as u64,
                total_bytes: total,
            }))
            .await?;
        Ok::<(), ClientError>(())
    });
    let call = rpc
        .ingest(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await;
    let produced = producer
        .await
        .map_err(|e| ClientError::Protocol(format!("ingest producer failed: {e}")))?;
    let response = match (call, produced) {
        // A local failure explains a server-side "ended without commit".
        (Err(_), Err(local @ ClientError::Io { .. })) => return Err(local),
        // The server's reason is why our sends stopped going through.
        (Err(status), _) => return Err(status.into()),
        (Ok(_), Err(local)) => return Err(local),
        (Ok(r), Ok(())) => r,
    };
    let info = response
        .into_inner()
        .dataset
        .ok_or_else(|| ClientError::Protocol("ingest response without dataset".into()))?;
    Ok(Ingested { info, skipped })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walk_is_sorted_and_relative() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("b/c")).unwrap();
        std::fs::write(d.path().join("b/c/x"), b"1").unwrap();
        std::fs::write(d.path().join("a"), b"22").unwrap();
        std::fs::create_dir_all(d.path().join("empty-dir")).unwrap();
        let files = walk(d.path()).unwrap();
        let names: Vec<_> = files.iter().map(|f| f.0.as_str()).collect();
        assert_eq!(names, ["a", "b/c/x"]);
        assert_eq!(files[0].2, 2);
        assert!(walk(&d.path().join("a")).is_err());
    }
}
