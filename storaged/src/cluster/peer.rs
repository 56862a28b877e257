//! How a node calls the others: the same gRPC API and the same
//! credentials as any client. With TLS, `https://` verified against the
//! cluster's CA (`cluster_ca`), the node's own certificate presented as a
//! client's (so nodes that require client certificates take it); with
//! tenants, the bearer token of `cluster_token_file`, a tenant's with
//! write on the unit datasets. A cluster without either runs on a trusted
//! network, as a single node without them does.

use std::path::Path;

use storaged_proto::pb;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// A node that does not connect (TCP, TLS and HTTP/2) within this is
/// failed.
pub const NODE_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Largest message between nodes (a unit's ingest messages, drain reads).
const PEER_MESSAGE_BYTES_MAX: usize = 8 << 20;

/// This node's way to the others; see the module docs.
#[derive(Clone, Default)]
pub struct PeerLink {
    tls: Option<ClientTlsConfig>,
    token: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

impl std::fmt::Debug for PeerLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerLink")
            .field("tls", &self.tls.is_some())
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Why the link to the other nodes cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum PeerLinkError {
    #[error("cannot read the {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("the cluster token is not a valid header value")]
    Token,
}

impl PeerLink {
    /// A link with `token` (with tenants) and, with TLS, the CA of the
    /// nodes' certificates and this node's own certificate and key.
    pub fn new(
        token: Option<&str>,
        tls: Option<(&Path, &Path, &Path)>,
    ) -> Result<Self, PeerLinkError> {
        let read = |what: &'static str, path: &Path| {
            std::fs::read(path).map_err(|source| PeerLinkError::Read {
                what,
                path: path.display().to_string(),
                source,
            })
        };
        let tls = match tls {
            None => None,
            Some((ca, cert, key)) => Some(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(read("cluster CA", ca)?))
                    .identity(Identity::from_pem(
                        read("node certificate", cert)?,
                        read("node key", key)?,
                    )),
            ),
        };
        let token = token
            .map(|t| {
                format!("Bearer {t}")
                    .parse()
                    .map_err(|_| PeerLinkError::Token)
            })
            .transpose()?;
        Ok(Self { tls, token })
    }

    /// The URL of the node at `address`.
    pub fn url(&self, address: &str) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{address}")
    }
}

/// Puts the link's token on every call.
#[derive(Clone)]
pub struct PeerToken(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for PeerToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(token) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", token.clone());
        }
        Ok(request)
    }
}

/// A client of another node.
pub type PeerClient = pb::storaged_client::StoragedClient<InterceptedService<Channel, PeerToken>>;

/// Connects to the node at `address`, bounded by [`NODE_CONNECT_TIMEOUT`]
/// (handshakes included: a node that accepts but never answers, stopped,
/// would hold the caller forever).
pub async fn node_client(link: &PeerLink, address: &str) -> Result<PeerClient, String> {
    let mut endpoint = Channel::from_shared(link.url(address))
        .map_err(|e| e.to_string())?
        .connect_timeout(NODE_CONNECT_TIMEOUT)
        .tcp_nodelay(true);
    if let Some(tls) = &link.tls {
        endpoint = endpoint
            .tls_config(tls.clone())
            .map_err(|e| format!("TLS: {e}"))?;
    }
    let channel = tokio::time::timeout(NODE_CONNECT_TIMEOUT, endpoint.connect())
        .await
        .map_err(|_| format!("no answer within {} s", NODE_CONNECT_TIMEOUT.as_secs()))?
        .map_err(|e| format!("connecting: {}", error_chain(&e)))?;
    Ok(pb::storaged_client::StoragedClient::with_interceptor(
        channel,
        PeerToken(link.token.clone()),
    )
    .max_encoding_message_size(PEER_MESSAGE_BYTES_MAX)
    .max_decoding_message_size(PEER_MESSAGE_BYTES_MAX))
}

/// `e` and its sources (a TLS failure's reason is a source).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_link_never_prints_its_token_and_picks_the_scheme() {
        let link = PeerLink::new(Some("sdt_secret"), None).unwrap();
        assert!(!format!("{link:?}").contains("sdt_secret"));
        assert_eq!(link.url("10.0.0.1:7400"), "http://10.0.0.1:7400");
        assert!(matches!(
            PeerLink::new(Some("bad\ntoken"), None),
            Err(PeerLinkError::Token)
        ));
        let missing = Path::new("/nonexistent/ca.pem");
        let err = PeerLink::new(None, Some((missing, missing, missing))).unwrap_err();
        assert!(err.to_string().contains("cluster CA"), "{err}");
    }
}
