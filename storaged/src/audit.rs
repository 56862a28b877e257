//! The audit log: one JSON line per write (ingest, delete), admin
//! operation (scrub, device replacement) and denied request, with time,
//! request id, principal, tenant, operation, dataset, result and bytes.
//! Secrets never reach it: a principal is named by tenant and how it
//! authenticated, never by its token.
//!
//! With `audit_required` (the default when a log is configured), an
//! operation whose line cannot be written fails, and while the log is
//! failing, writes and admin operations are refused before they start; the
//! first one that finds the log writable again records `audit_resumed`.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::Serialize;

/// One audit record.
#[derive(Debug, Serialize)]
pub struct AuditEvent<'a> {
    pub time_unix_ms: u64,
    pub request_id: &'a str,
    /// The tenant, or "operator" (no tenants), or "unauthenticated".
    pub principal: &'a str,
    /// "token", "uid:<n>", "open" or "none".
    pub via: &'a str,
    /// The peer's address, or "unix".
    pub peer: &'a str,
    pub operation: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dataset: Option<&'a str>,
    /// "ok", or the gRPC code's name.
    pub result: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<&'a str>,
    pub bytes: u64,
}

/// Why an audit line could not be written.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot open the audit log {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write the audit log {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the audit log {path} is failing; writes and admin operations wait until it works")]
    Failing { path: PathBuf },
}

/// Where audit lines go (or nowhere).
#[derive(Debug)]
pub struct AuditLog {
    sink: Option<(PathBuf, Mutex<std::fs::File>)>,
    /// Fail operations whose line cannot be written.
    required: bool,
    /// The last write failed.
    failing: AtomicBool,
}

impl AuditLog {
    /// No audit log.
    pub fn disabled() -> Self {
        Self {
            sink: None,
            required: false,
            failing: AtomicBool::new(false),
        }
    }

    /// Appends to `path` (created 0600).
    pub fn open(path: &Path, required: bool) -> Result<Self, AuditError> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|source| AuditError::Open {
                path: path.to_owned(),
                source,
            })?;
        Ok(Self {
            sink: Some((path.to_owned(), Mutex::new(file))),
            required,
            failing: AtomicBool::new(false),
        })
    }

    pub fn enabled(&self) -> bool {
        self.sink.is_some()
    }

    /// Writes `event` as one line. An error matters only when the log is
    /// required (the caller fails the operation); otherwise it is logged.
    pub fn record(&self, event: &AuditEvent<'_>) -> Result<(), AuditError> {
        let Some((path, file)) = &self.sink else {
            return Ok(());
        };
        let mut line = serde_json::to_vec(event).expect("audit events serialize");
        line.push(b'\n');
        let written = {
            let mut f = file.lock().expect("audit log poisoned");
            f.write_all(&line).and_then(|()| f.flush())
        };
        match written {
            Ok(()) => {
                self.failing.store(false, Ordering::SeqCst);
                Ok(())
            }
            Err(source) => {
                if !self.failing.swap(true, Ordering::SeqCst) {
                    tracing::error!(path = %path.display(), error = %source, "audit log write failed");
                }
                let e = AuditError::Write {
                    path: path.clone(),
                    source,
                };
                if self.required { Err(e) } else { Ok(()) }
            }
        }
    }

    /// Before a write or admin operation: `Ok` unless the log is required
    /// and failing. A failing log is tried again with an `audit_resumed`
    /// line, so it recovers by itself once it can be written.
    pub fn ready(&self, request_id: impl FnOnce() -> String) -> Result<(), AuditError> {
        let Some((path, _)) = &self.sink else {
            return Ok(());
        };
        if !self.required || !self.failing.load(Ordering::SeqCst) {
            return Ok(());
        }
        self.record(&AuditEvent {
            time_unix_ms: now_unix_ms(),
            request_id: &request_id(),
            principal: "storaged",
            via: "none",
            peer: "",
            operation: "audit_resumed",
            dataset: None,
            result: "ok",
            message: None,
            bytes: 0,
        })
        .map_err(|_| AuditError::Failing { path: path.clone() })
    }
}

pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event<'a>(op: &'a str) -> AuditEvent<'a> {
        AuditEvent {
            time_unix_ms: 1,
            request_id: "r1",
            principal: "vision",
            via: "token",
            peer: "127.0.0.1:5",
            operation: op,
            dataset: Some("vision-a"),
            result: "ok",
            message: None,
            bytes: 7,
        }
    }

    #[test]
    fn one_json_line_per_event() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(&path, true).unwrap();
        log.record(&event("ingest")).unwrap();
        log.record(&event("delete")).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1]["operation"], "delete");
        assert_eq!(lines[0]["bytes"], 7);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_full_disk_fails_required_records_and_recovers() {
        // Guards against unaudited writes: /dev/full refuses every write.
        let log = AuditLog::open(Path::new("/dev/full"), true).unwrap();
        assert!(log.ready(|| "r".into()).is_ok());
        assert!(matches!(
            log.record(&event("ingest")),
            Err(AuditError::Write { .. })
        ));
        assert!(matches!(
            log.ready(|| "r".into()),
            Err(AuditError::Failing { .. })
        ));
        let optional = AuditLog::open(Path::new("/dev/full"), false).unwrap();
        assert!(optional.record(&event("ingest")).is_ok());
        assert!(optional.ready(|| "r".into()).is_ok());
    }
}
