//! JSON Web Tokens signed by an identity provider, as bearer credentials.
//!
//! `[jwt]` in the config names the provider's public keys (PEM files, RSA
//! for RS256 or Ed25519 for EdDSA), the issuer and the audience. A token
//! is accepted when its signature verifies with one of the keys, `iss` and
//! `aud` match, and `exp` (required) and `nbf` (if present) hold, with
//! `leeway_s` of clock skew. Its `tenant_claim` (default
//! `storaged_tenant`) names a configured tenant; optional `storaged_read`,
//! `storaged_write` (lists of dataset-name prefixes) and `storaged_admin`
//! (bool) narrow that tenant's rights for this token, never widen them.
//! Only the algorithms of the configured keys are accepted (no `none`, no
//! HMAC with a public key as secret).

use std::path::PathBuf;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::auth::Rights;

fn default_tenant_claim() -> String {
    "storaged_tenant".to_owned()
}

/// `[jwt]` as written in the config file.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct JwtSpec {
    pub issuer: String,
    pub audience: String,
    /// PEM public keys of the identity provider (RSA or Ed25519).
    pub public_keys: Vec<PathBuf>,
    #[serde(default = "default_tenant_claim")]
    pub tenant_claim: String,
    /// Clock skew allowed on `exp` and `nbf`, in seconds (default 30).
    pub leeway_s: Option<u64>,
}

/// Why a JWT was not accepted (`UNAUTHENTICATED`).
#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    #[error("the JWT has expired")]
    Expired,
    #[error("the JWT is not valid yet (nbf)")]
    NotYetValid,
    #[error("the JWT's issuer is not the configured one")]
    WrongIssuer,
    #[error("the JWT's audience does not include this storaged's")]
    WrongAudience,
    #[error("the JWT's signature does not verify with any configured key")]
    BadSignature,
    #[error("the JWT's algorithm {0} is not one of the configured keys' (RS256, EdDSA)")]
    Algorithm(String),
    #[error("the JWT has no string claim {0:?} naming its tenant")]
    NoTenant(String),
    #[error("the JWT names tenant {0:?}, which this storaged does not have")]
    UnknownTenant(String),
    #[error("the JWT's {claim} claim is not {expected}")]
    BadClaim {
        claim: &'static str,
        expected: &'static str,
    },
    #[error("the JWT is malformed or misses a required claim (exp, iss, aud): {0}")]
    Invalid(String),
}

/// What a verified token says.
#[derive(Debug, Clone)]
pub struct JwtIdentity {
    pub tenant: String,
    /// Rights the token narrows its tenant's to, if it carries any.
    pub narrowed: Option<Rights>,
}

struct Key {
    algorithm: Algorithm,
    key: DecodingKey,
}

/// The configured provider: keys and checks.
pub struct JwtVerifier {
    keys: Vec<Key>,
    issuer: String,
    audience: String,
    tenant_claim: String,
    leeway_s: u64,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("keys", &self.keys.len())
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish()
    }
}

impl JwtVerifier {
    /// Reads the keys, naming any file that is not an RSA or Ed25519
    /// public key.
    pub fn load(spec: &JwtSpec) -> Result<Self, String> {
        if spec.public_keys.is_empty() {
            return Err("jwt: public_keys is empty".into());
        }
        let mut keys = Vec::new();
        for path in &spec.public_keys {
            let pem = std::fs::read(path)
                .map_err(|e| format!("jwt: cannot read public key {}: {e}", path.display()))?;
            let key = if let Ok(k) = DecodingKey::from_rsa_pem(&pem) {
                Key {
                    algorithm: Algorithm::RS256,
                    key: k,
                }
            } else if let Ok(k) = DecodingKey::from_ed_pem(&pem) {
                Key {
                    algorithm: Algorithm::EdDSA,
                    key: k,
                }
            } else {
                return Err(format!(
                    "jwt: {} is not a PEM RSA or Ed25519 public key",
                    path.display()
                ));
            };
            keys.push(key);
        }
        Ok(Self {
            keys,
            issuer: spec.issuer.clone(),
            audience: spec.audience.clone(),
            tenant_claim: spec.tenant_claim.clone(),
            leeway_s: spec.leeway_s.unwrap_or(30),
        })
    }

    /// Whether `token` has the shape of a JWT (three base64url parts);
    /// storaged's own tokens do not.
    pub fn looks_like_jwt(token: &str) -> bool {
        token.split('.').count() == 3
    }

    /// Verifies `token` and reads its tenant and rights.
    pub fn verify(&self, token: &str) -> Result<JwtIdentity, JwtError> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| JwtError::Invalid(e.to_string()))?;
        let candidates: Vec<&Key> = self
            .keys
            .iter()
            .filter(|k| k.algorithm == header.alg)
            .collect();
        if candidates.is_empty() {
            return Err(JwtError::Algorithm(format!("{:?}", header.alg)));
        }
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[&self.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.validate_nbf = true;
        validation.leeway = self.leeway_s;
        let mut last = JwtError::BadSignature;
        for key in candidates {
            match jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
                token,
                &key.key,
                &validation,
            ) {
                Ok(data) => return self.identity(&data.claims),
                Err(e) => {
                    use jsonwebtoken::errors::ErrorKind;
                    last = match e.kind() {
                        ErrorKind::InvalidSignature => JwtError::BadSignature,
                        ErrorKind::ExpiredSignature => return Err(JwtError::Expired),
                        ErrorKind::ImmatureSignature => return Err(JwtError::NotYetValid),
                        ErrorKind::InvalidIssuer => return Err(JwtError::WrongIssuer),
                        ErrorKind::InvalidAudience => return Err(JwtError::WrongAudience),
                        _ => JwtError::Invalid(e.to_string()),
                    };
                }
            }
        }
        Err(last)
    }

    fn identity(
        &self,
        claims: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<JwtIdentity, JwtError> {
        let tenant = claims
            .get(&self.tenant_claim)
            .and_then(|v| v.as_str())
            .ok_or_else(|| JwtError::NoTenant(self.tenant_claim.clone()))?
            .to_owned();
        let prefixes = |claim: &'static str| -> Result<Option<Vec<String>>, JwtError> {
            match claims.get(claim) {
                None => Ok(None),
                Some(serde_json::Value::Array(items)) => items
                    .iter()
                    .map(|v| {
                        v.as_str().map(str::to_owned).ok_or(JwtError::BadClaim {
                            claim,
                            expected: "a list of strings",
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map(Some),
                Some(_) => Err(JwtError::BadClaim {
                    claim,
                    expected: "a list of strings",
                }),
            }
        };
        let read = prefixes("storaged_read")?;
        let write = prefixes("storaged_write")?;
        let admin = match claims.get("storaged_admin") {
            None => None,
            Some(serde_json::Value::Bool(b)) => Some(*b),
            Some(_) => {
                return Err(JwtError::BadClaim {
                    claim: "storaged_admin",
                    expected: "a boolean",
                });
            }
        };
        let narrowed = (read.is_some() || write.is_some() || admin.is_some()).then(|| Rights {
            // A list the token leaves out does not narrow that right.
            read: read.unwrap_or_else(|| vec![String::new()]),
            write: write.unwrap_or_else(|| vec![String::new()]),
            admin: admin.unwrap_or(true),
        });
        Ok(JwtIdentity { tenant, narrowed })
    }
}
