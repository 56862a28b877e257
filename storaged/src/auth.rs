//! Who is calling, and what they may do.
//!
//! Config declares tenants. Each has credentials (bearer tokens, stored as
//! SHA-256 hashes; Unix socket peer uids), rights on dataset-name prefixes
//! (read; write: ingest and delete; admin: scrub, device replacement, the
//! full status, other tenants' regions) and quotas. A call is
//! authenticated once, at the service edge, into a [`Principal`]; every
//! operation then asks it for the right it needs. Rights depend only on
//! the dataset's name, never on whether it exists, so a denial reveals
//! nothing about other tenants' data.
//!
//! With no tenants configured every caller is the local operator, with all
//! rights: storaged then listens on loopback and the Unix socket only
//! (see `config`).

use std::collections::HashMap;
use std::sync::Arc;

use serde::Deserialize;
use storaged_proto::auth::{TOKEN_BYTES_MAX, parse_sha256_hex, token_sha256};

use crate::size::parse_size;

/// A tenant as written in the config file (`[[tenant]]`).
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct TenantSpec {
    pub name: String,
    /// SHA-256 (hex) of each bearer token (`storagectl token new`).
    #[serde(default)]
    pub tokens_sha256: Vec<String>,
    /// Unix socket peers with these uids are this tenant.
    #[serde(default)]
    pub uids: Vec<u32>,
    /// Unix socket peers whose primary gid is one of these are this
    /// tenant (when their uid is not mapped).
    #[serde(default)]
    pub gids: Vec<u32>,
    /// TLS clients whose certificate (verified against `tls_client_ca`)
    /// has one of these subject common names or URI subject alternative
    /// names are this tenant.
    #[serde(default)]
    pub cert_names: Vec<String>,
    /// Dataset-name prefixes this tenant may read ("" is every name).
    #[serde(default)]
    pub read: Vec<String>,
    /// Prefixes it may ingest into and delete from (implies read).
    #[serde(default)]
    pub write: Vec<String>,
    /// Scrub, replace devices, see device paths and every dataset in
    /// Status, use other tenants' regions.
    #[serde(default)]
    pub admin: bool,
    #[serde(default)]
    pub quota: QuotaSpec,
}

/// Quotas as written in the config file; absent means unlimited.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaSpec {
    /// Bytes of datasets this tenant created ("10TiB").
    pub bytes: Option<String>,
    /// Datasets this tenant created.
    pub datasets: Option<u64>,
    /// Calls in progress at once (streams count until they end).
    pub requests: Option<u32>,
    /// Ingests in progress at once.
    pub ingests: Option<u32>,
    /// Pool bytes this tenant's calls may hold at once ("64MiB"); default
    /// `tenant_inflight` (half the buffer pool).
    pub inflight: Option<String>,
}

/// A tenant's resolved quotas.
#[derive(Debug, Clone, Default)]
pub struct Quota {
    pub bytes_max: Option<u64>,
    pub datasets_max: Option<u64>,
    pub requests_concurrent_max: Option<u32>,
    pub ingests_concurrent_max: Option<u32>,
    pub inflight_bytes_max: u64,
}

/// One tenant, resolved.
#[derive(Debug)]
pub struct Tenant {
    pub name: String,
    read: Vec<String>,
    write: Vec<String>,
    pub admin: bool,
    pub quota: Quota,
    /// Calls in progress (bounded by `quota.requests_concurrent_max`).
    requests: Arc<tokio::sync::Semaphore>,
    /// Ingests in progress (bounded by `quota.ingests_concurrent_max`).
    ingests: Arc<tokio::sync::Semaphore>,
    /// Pool bytes its calls hold (bounded by `quota.inflight_bytes_max`).
    pub inflight: Arc<crate::budget::Account>,
}

/// Longest JWT accepted (a bearer token of storaged's own is far shorter).
pub const JWT_BYTES_MAX: usize = 8192;

/// Longest tenant name.
pub const TENANT_NAME_BYTES_MAX: usize = 64;

/// Why a caller could not be authenticated (`UNAUTHENTICATED`).
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error(
        "this storaged requires credentials: send `authorization: Bearer <token>` (storagectl --token, env STORAGED_TOKEN)"
    )]
    Missing,
    #[error("the `authorization` metadata is not `Bearer <token>`")]
    Malformed,
    #[error("the bearer token is not known to this storaged")]
    UnknownToken,
    #[error(
        "uid {uid} on the Unix socket (and its gid) is not mapped to a tenant, and no token was sent"
    )]
    UnknownUid { uid: u32 },
    #[error(
        "no tenant has a cert_names entry for this client certificate ({names}), and no token was sent"
    )]
    UnknownCert { names: String },
    #[error(transparent)]
    Jwt(#[from] crate::jwt::JwtError),
}

/// An operation a caller may or may not be allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Right {
    Read,
    Write,
    Admin,
}

impl std::fmt::Display for Right {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Right::Read => "read",
            Right::Write => "write",
            Right::Admin => "admin",
        })
    }
}

/// A caller without the right (`PERMISSION_DENIED`). Names only what the
/// caller asked for, never whether it exists.
#[derive(Debug, thiserror::Error)]
pub enum Denied {
    #[error("tenant {tenant:?} may not {right} dataset {dataset:?}")]
    Dataset {
        tenant: String,
        right: Right,
        dataset: String,
    },
    #[error("tenant {tenant:?} lacks the admin right this call needs")]
    NotAdmin { tenant: String },
}

/// A quota that stops a call (`RESOURCE_EXHAUSTED`).
#[derive(Debug, thiserror::Error)]
pub enum QuotaExceeded {
    #[error("tenant {tenant:?} already has {limit} calls in progress (its `requests` quota)")]
    Requests { tenant: String, limit: u32 },
    #[error("tenant {tenant:?} already has {limit} ingests in progress (its `ingests` quota)")]
    Ingests { tenant: String, limit: u32 },
}

/// Rights on dataset-name prefixes (a JWT may narrow its tenant's to these).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rights {
    pub read: Vec<String>,
    pub write: Vec<String>,
    pub admin: bool,
}

impl Rights {
    /// Whether these rights allow `right` on dataset `name` (write
    /// implies read, as for tenants).
    pub fn allows(&self, right: Right, name: &str) -> bool {
        let under = |prefixes: &[String]| prefixes.iter().any(|p| name.starts_with(p.as_str()));
        match right {
            Right::Read => under(&self.read) || under(&self.write) || self.admin,
            Right::Write => under(&self.write),
            Right::Admin => self.admin,
        }
    }
}

/// How a principal proved itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// No tenants configured: everyone is the operator.
    Open,
    Token,
    UnixUid(u32),
    /// The Unix socket peer's gid (its uid mapped to no tenant).
    UnixGid(u32),
    /// A verified TLS client certificate.
    Certificate,
    /// A JWT from the configured identity provider.
    Jwt,
}

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Principal {
    /// `None`: the operator of a storaged without tenants (all rights).
    pub tenant: Option<Arc<Tenant>>,
    pub via: Via,
    /// Rights this credential narrows its tenant's to (a JWT's claims).
    pub narrowed: Option<Arc<Rights>>,
}

/// Held while a call is in progress: one of its tenant's `requests`.
#[derive(Debug)]
pub struct CallPermit {
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Principal {
    /// The operator of a storaged without tenants.
    pub fn operator() -> Self {
        Self {
            tenant: None,
            via: Via::Open,
            narrowed: None,
        }
    }

    /// The tenant's name, or "operator".
    pub fn name(&self) -> &str {
        self.tenant.as_ref().map_or("operator", |t| t.name.as_str())
    }

    pub fn is_admin(&self) -> bool {
        self.tenant.as_ref().is_none_or(|t| t.admin)
            && self.narrowed.as_ref().is_none_or(|r| r.admin)
    }

    /// Whether the caller may exercise `right` on dataset `name`: its
    /// tenant may, and its credential does not narrow that away.
    pub fn allows(&self, right: Right, name: &str) -> bool {
        let Some(t) = &self.tenant else {
            return true;
        };
        let tenant = Rights {
            read: t.read.clone(),
            write: t.write.clone(),
            admin: t.admin,
        };
        tenant.allows(right, name) && self.narrowed.as_ref().is_none_or(|r| r.allows(right, name))
    }

    /// `Ok` if the caller may exercise `right` on dataset `name`.
    pub fn check(&self, right: Right, name: &str) -> Result<(), Denied> {
        if self.allows(right, name) {
            return Ok(());
        }
        Err(Denied::Dataset {
            tenant: self.name().to_owned(),
            right,
            dataset: name.to_owned(),
        })
    }

    /// `Ok` if the caller has the admin right.
    pub fn check_admin(&self) -> Result<(), Denied> {
        if self.is_admin() {
            return Ok(());
        }
        Err(Denied::NotAdmin {
            tenant: self.name().to_owned(),
        })
    }

    /// One of the tenant's concurrent calls, or `RESOURCE_EXHAUSTED` at
    /// once (never a wait behind the tenant's own stalled calls).
    pub fn call_permit(&self) -> Result<CallPermit, QuotaExceeded> {
        self.permit(
            |t| (&t.requests, t.quota.requests_concurrent_max),
            |tenant, limit| QuotaExceeded::Requests { tenant, limit },
        )
    }

    /// One of the tenant's concurrent ingests.
    pub fn ingest_permit(&self) -> Result<CallPermit, QuotaExceeded> {
        self.permit(
            |t| (&t.ingests, t.quota.ingests_concurrent_max),
            |tenant, limit| QuotaExceeded::Ingests { tenant, limit },
        )
    }

    /// A permit of the semaphore `pick` names, if its limit is set.
    fn permit(
        &self,
        pick: impl FnOnce(&Tenant) -> (&Arc<tokio::sync::Semaphore>, Option<u32>),
        exceeded: impl FnOnce(String, u32) -> QuotaExceeded,
    ) -> Result<CallPermit, QuotaExceeded> {
        let Some(t) = &self.tenant else {
            return Ok(CallPermit { _permit: None });
        };
        let (semaphore, limit) = pick(t);
        let Some(limit) = limit else {
            return Ok(CallPermit { _permit: None });
        };
        Arc::clone(semaphore)
            .try_acquire_owned()
            .map(|p| CallPermit { _permit: Some(p) })
            .map_err(|_| exceeded(t.name.clone(), limit))
    }

    /// The owner recorded for datasets this caller creates ("" for the
    /// operator of a storaged without tenants).
    pub fn owner(&self) -> &str {
        self.tenant.as_ref().map_or("", |t| t.name.as_str())
    }
}

/// The configured tenants and their credentials.
#[derive(Debug, Default)]
pub struct Tenants {
    list: Vec<Arc<Tenant>>,
    by_token: HashMap<[u8; 32], Arc<Tenant>>,
    by_uid: HashMap<u32, Arc<Tenant>>,
    by_gid: HashMap<u32, Arc<Tenant>>,
    by_cert_name: HashMap<String, Arc<Tenant>>,
    jwt: Option<Arc<crate::jwt::JwtVerifier>>,
}

/// What a caller presented.
#[derive(Debug, Default, Clone, Copy)]
pub struct Presented<'a> {
    /// The `authorization` metadata value, if any.
    pub authorization: Option<&'a str>,
    /// The peer's uid, on the Unix socket.
    pub unix_uid: Option<u32>,
    /// The peer's gid, on the Unix socket.
    pub unix_gid: Option<u32>,
    /// The names a verified client certificate proves (`tls::cert_names`).
    pub cert_names: &'a [String],
}

fn valid_tenant_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= TENANT_NAME_BYTES_MAX
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl Tenants {
    /// Resolves and checks the config's tenants: unique names, tokens and
    /// uids; tokens given as 64 hex digits. `inflight_bytes_default` is
    /// the pool bytes a tenant without an `inflight` quota may hold.
    /// `accepts_jwt`: JWTs can name tenants, so a tenant needs no
    /// credentials of its own.
    pub fn from_specs(
        specs: &[TenantSpec],
        inflight_bytes_default: u64,
        accepts_jwt: bool,
    ) -> Result<Self, String> {
        let mut t = Self::default();
        for spec in specs {
            let name = &spec.name;
            if !valid_tenant_name(name) {
                return Err(format!(
                    "tenant {name:?}: names are 1 to {TENANT_NAME_BYTES_MAX} of A-Z a-z 0-9 . _ -"
                ));
            }
            if t.list.iter().any(|o| &o.name == name) {
                return Err(format!("tenant {name:?} is declared twice"));
            }
            if !accepts_jwt
                && spec.tokens_sha256.is_empty()
                && spec.uids.is_empty()
                && spec.gids.is_empty()
                && spec.cert_names.is_empty()
            {
                return Err(format!(
                    "tenant {name:?} has no credentials: add tokens_sha256, uids or cert_names (or configure [jwt])"
                ));
            }
            let size = |what: &str, v: &Option<String>| -> Result<Option<u64>, String> {
                v.as_deref()
                    .map(|s| {
                        parse_size(s).map_err(|e| format!("tenant {name:?} quota {what}: {e}"))
                    })
                    .transpose()
            };
            let quota = Quota {
                bytes_max: size("bytes", &spec.quota.bytes)?,
                datasets_max: spec.quota.datasets,
                requests_concurrent_max: spec.quota.requests,
                ingests_concurrent_max: spec.quota.ingests,
                inflight_bytes_max: size("inflight", &spec.quota.inflight)?
                    .unwrap_or(inflight_bytes_default),
            };
            let permits = |n: Option<u32>| {
                Arc::new(tokio::sync::Semaphore::new(
                    n.map_or(tokio::sync::Semaphore::MAX_PERMITS, |n| n as usize),
                ))
            };
            let tenant = Arc::new(Tenant {
                name: name.clone(),
                read: spec.read.clone(),
                write: spec.write.clone(),
                admin: spec.admin,
                requests: permits(quota.requests_concurrent_max),
                ingests: permits(quota.ingests_concurrent_max),
                inflight: crate::budget::Account::new(
                    format!("tenant {name:?}"),
                    usize::try_from(quota.inflight_bytes_max).unwrap_or(usize::MAX),
                ),
                quota,
            });
            for hex in &spec.tokens_sha256 {
                let hash = parse_sha256_hex(&hex.to_ascii_lowercase()).ok_or_else(|| {
                    format!(
                        "tenant {name:?}: tokens_sha256 entry {hex:?} is not 64 hex digits (use `storagectl token new`)"
                    )
                })?;
                if let Some(other) = t.by_token.insert(hash, Arc::clone(&tenant)) {
                    return Err(format!(
                        "tenants {:?} and {name:?} share a token",
                        other.name
                    ));
                }
            }
            for cert_name in &spec.cert_names {
                if cert_name.is_empty() {
                    return Err(format!("tenant {name:?}: an empty cert_names entry"));
                }
                if let Some(other) = t
                    .by_cert_name
                    .insert(cert_name.clone(), Arc::clone(&tenant))
                {
                    return Err(format!(
                        "tenants {:?} and {name:?} both claim certificate name {cert_name:?}",
                        other.name
                    ));
                }
            }
            for uid in &spec.uids {
                if let Some(other) = t.by_uid.insert(*uid, Arc::clone(&tenant)) {
                    return Err(format!(
                        "tenants {:?} and {name:?} both claim uid {uid}",
                        other.name
                    ));
                }
            }
            for gid in &spec.gids {
                if let Some(other) = t.by_gid.insert(*gid, Arc::clone(&tenant)) {
                    return Err(format!(
                        "tenants {:?} and {name:?} both claim gid {gid}",
                        other.name
                    ));
                }
            }
            t.list.push(tenant);
        }
        Ok(t)
    }

    /// Whether any tenant is configured (else everyone is the operator).
    /// Accepts JWTs from `verifier` as bearer tokens too.
    #[must_use]
    pub fn with_jwt(mut self, verifier: crate::jwt::JwtVerifier) -> Self {
        self.jwt = Some(Arc::new(verifier));
        self
    }

    pub fn enabled(&self) -> bool {
        !self.list.is_empty()
    }

    pub fn list(&self) -> &[Arc<Tenant>] {
        &self.list
    }

    /// Who presented `p`. A token, when sent, decides (a wrong token is
    /// never rescued by the uid); otherwise the Unix peer's uid.
    pub fn authenticate(&self, p: Presented<'_>) -> Result<Principal, AuthError> {
        if !self.enabled() {
            return Ok(Principal::operator());
        }
        if let Some(value) = p.authorization {
            let token = storaged_proto::auth::parse_bearer(value).ok_or(AuthError::Malformed)?;
            if let Some(jwt) = &self.jwt
                && crate::jwt::JwtVerifier::looks_like_jwt(token)
            {
                if token.len() > JWT_BYTES_MAX {
                    return Err(AuthError::Malformed);
                }
                let id = jwt.verify(token)?;
                let tenant = self
                    .list
                    .iter()
                    .find(|t| t.name == id.tenant)
                    .ok_or(crate::jwt::JwtError::UnknownTenant(id.tenant))?;
                return Ok(Principal {
                    tenant: Some(Arc::clone(tenant)),
                    via: Via::Jwt,
                    narrowed: id.narrowed.map(Arc::new),
                });
            }
            if token.len() > TOKEN_BYTES_MAX {
                return Err(AuthError::UnknownToken);
            }
            return self
                .by_token
                .get(&token_sha256(token))
                .map(|t| Principal {
                    tenant: Some(Arc::clone(t)),
                    via: Via::Token,
                    narrowed: None,
                })
                .ok_or(AuthError::UnknownToken);
        }
        if !p.cert_names.is_empty() {
            return p
                .cert_names
                .iter()
                .find_map(|n| self.by_cert_name.get(n))
                .map(|t| Principal {
                    tenant: Some(Arc::clone(t)),
                    via: Via::Certificate,
                    narrowed: None,
                })
                .ok_or_else(|| AuthError::UnknownCert {
                    names: p.cert_names.join(", "),
                });
        }
        let Some(uid) = p.unix_uid else {
            return Err(AuthError::Missing);
        };
        if let Some(t) = self.by_uid.get(&uid) {
            return Ok(Principal {
                tenant: Some(Arc::clone(t)),
                via: Via::UnixUid(uid),
                narrowed: None,
            });
        }
        p.unix_gid
            .and_then(|gid| self.by_gid.get(&gid).map(|t| (gid, t)))
            .map(|(gid, t)| Principal {
                tenant: Some(Arc::clone(t)),
                via: Via::UnixGid(gid),
                narrowed: None,
            })
            .ok_or(AuthError::UnknownUid { uid })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use storaged_proto::auth::{bearer, token_sha256_hex};

    fn tenants() -> Tenants {
        Tenants::from_specs(
            &[
                TenantSpec {
                    name: "vision".into(),
                    tokens_sha256: vec![token_sha256_hex("sdt_a")],
                    uids: vec![1000],
                    read: vec!["shared-".into()],
                    write: vec!["vision-".into()],
                    quota: QuotaSpec {
                        requests: Some(1),
                        ..Default::default()
                    },
                    ..Default::default()
                },
                TenantSpec {
                    name: "ops".into(),
                    tokens_sha256: vec![token_sha256_hex("sdt_b")],
                    admin: true,
                    ..Default::default()
                },
                TenantSpec {
                    name: "audio".into(),
                    cert_names: vec!["audio-cn".into(), "spiffe://x/audio".into()],
                    gids: vec![4000],
                    ..Default::default()
                },
            ],
            1 << 30,
            false,
        )
        .unwrap()
    }

    /// Who `token` (and, on the Unix socket, `uid`) is.
    fn who(t: &Tenants, token: Option<&str>, uid: Option<u32>) -> Result<Principal, AuthError> {
        let value = token.map(bearer);
        t.authenticate(Presented {
            authorization: value.as_deref(),
            unix_uid: uid,
            unix_gid: None,
            cert_names: &[],
        })
    }

    #[test]
    fn credentials_map_to_tenants() {
        let t = tenants();
        assert_eq!(who(&t, Some("sdt_a"), None).unwrap().name(), "vision");
        let p = who(&t, None, Some(1000)).unwrap();
        assert_eq!(p.via, Via::UnixUid(1000));
        // A wrong token is not rescued by a known uid.
        assert!(matches!(
            who(&t, Some("sdt_nope"), Some(1000)),
            Err(AuthError::UnknownToken)
        ));
        assert!(matches!(
            t.authenticate(Presented::default()),
            Err(AuthError::Missing)
        ));
        assert!(matches!(
            t.authenticate(Presented {
                authorization: Some("Basic x"),
                ..Default::default()
            }),
            Err(AuthError::Malformed)
        ));
        // A verified client certificate names its tenant; an unknown one
        // is refused by its names, and a token still decides first.
        let certified = |names: &[String]| {
            t.authenticate(Presented {
                cert_names: names,
                ..Default::default()
            })
        };
        let p = certified(&["spiffe://x/audio".into()]).unwrap();
        assert_eq!((p.name(), p.via), ("audio", Via::Certificate));
        assert_eq!(certified(&["audio-cn".into()]).unwrap().name(), "audio");
        assert!(matches!(
            certified(&["stranger".into()]),
            Err(AuthError::UnknownCert { .. })
        ));
        let p = t
            .authenticate(Presented {
                authorization: Some(&bearer("sdt_a")),
                cert_names: &["audio-cn".into()],
                ..Default::default()
            })
            .unwrap();
        assert_eq!(p.name(), "vision");
        assert!(matches!(
            who(&t, None, Some(0)),
            Err(AuthError::UnknownUid { uid: 0 })
        ));
        // A uid no tenant claims, in a group one does: that tenant; a
        // mapped uid wins over its group.
        let by_group = |uid| {
            t.authenticate(Presented {
                unix_uid: Some(uid),
                unix_gid: Some(4000),
                ..Default::default()
            })
        };
        let p = by_group(0).unwrap();
        assert_eq!((p.name(), p.via), ("audio", Via::UnixGid(4000)));
        assert_eq!(by_group(1000).unwrap().name(), "vision");
        // No tenants: everyone is the operator.
        let open = Tenants::default()
            .authenticate(Presented::default())
            .unwrap();
        assert!(open.is_admin() && open.allows(Right::Write, "anything"));
    }

    #[test]
    fn rights_follow_prefixes_and_quotas_fail_fast() {
        let p = who(&tenants(), Some("sdt_a"), None).unwrap();
        assert!(p.allows(Right::Read, "shared-imagenet"));
        assert!(!p.allows(Right::Write, "shared-imagenet"));
        assert!(p.allows(Right::Read, "vision-x") && p.allows(Right::Write, "vision-x"));
        assert!(!p.allows(Right::Read, "audio-x"));
        let err = p.check(Right::Read, "audio-x").unwrap_err();
        assert!(err.to_string().contains("may not read"), "{err}");
        assert!(p.check_admin().is_err());
        let held = p.call_permit().unwrap();
        assert!(matches!(
            p.call_permit(),
            Err(QuotaExceeded::Requests { limit: 1, .. })
        ));
        drop(held);
        assert!(p.call_permit().is_ok());
    }

    #[test]
    fn bad_specs_are_refused_by_name() {
        let spec = |name: &str, token: &str| TenantSpec {
            name: name.into(),
            tokens_sha256: vec![token.into()],
            ..Default::default()
        };
        let err = Tenants::from_specs(&[spec("a b", &token_sha256_hex("x"))], 1 << 30, false)
            .unwrap_err();
        assert!(err.contains("names are"), "{err}");
        let err = Tenants::from_specs(&[spec("a", "nothex")], 1 << 30, false).unwrap_err();
        assert!(err.contains("64 hex"), "{err}");
        let h = token_sha256_hex("x");
        let err = Tenants::from_specs(&[spec("a", &h), spec("b", &h)], 1 << 30, false).unwrap_err();
        assert!(err.contains("share a token"), "{err}");
        let err = Tenants::from_specs(
            &[TenantSpec {
                name: "c".into(),
                ..Default::default()
            }],
            1 << 30,
            false,
        )
        .unwrap_err();
        assert!(err.contains("no credentials"), "{err}");
    }
}
