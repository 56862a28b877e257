//! TLS on the TCP listener (rustls through tonic): the server's
//! certificate and key, and optionally a client CA, which makes a valid
//! client certificate from that CA a condition of the handshake (mTLS).
//! The names a client certificate proves (its subject's common names and
//! its URI subject alternative names) map to tenants (`cert_names`).
//!
//! The Unix socket stays plain: its peers are identified by uid, and
//! nothing on it crosses a network.

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, Identity, ServerTlsConfig};

/// Where the PEM files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The server's certificate chain.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// CAs whose client certificates are accepted; `None`: clients need
    /// no certificate.
    pub client_ca: Option<PathBuf>,
}

/// A TLS file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} {path} holds no PEM {expected} block")]
    NotPem {
        what: &'static str,
        path: PathBuf,
        expected: &'static str,
    },
}

fn read_pem(what: &'static str, path: &Path, expected: &'static str) -> Result<Vec<u8>, TlsError> {
    let pem = std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })?;
    let text = String::from_utf8_lossy(&pem);
    if !text.contains("-----BEGIN ") || !text.contains(expected) {
        return Err(TlsError::NotPem {
            what,
            path: path.to_owned(),
            expected,
        });
    }
    Ok(pem)
}

impl TlsFiles {
    /// Reads and checks the files, naming any that cannot be used. (rustls
    /// checks that the key matches the certificate when the first
    /// connection arrives; a mismatch fails every handshake and is logged.)
    pub fn server_config(&self) -> Result<ServerTlsConfig, TlsError> {
        let cert = read_pem("tls_cert", &self.cert, "CERTIFICATE")?;
        let key = read_pem("tls_key", &self.key, "PRIVATE KEY")?;
        let mut config = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
        if let Some(ca) = &self.client_ca {
            let ca = read_pem("tls_client_ca", ca, "CERTIFICATE")?;
            config = config.client_ca_root(Certificate::from_pem(ca));
        }
        Ok(config)
    }
}

/// The names a client certificate (DER) proves: each common name of its
/// subject, and each URI subject alternative name. Empty if it does not
/// parse (the handshake has already verified it against the client CA).
pub fn cert_names(der: &[u8]) -> Vec<String> {
    use x509_parser::prelude::*;
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return Vec::new();
    };
    let mut names: Vec<String> = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_owned))
        .collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name {
                names.push((*uri).to_owned());
            }
        }
    }
    names
}
