//! How callers prove who they are, as far as the wire is concerned: bearer
//! tokens in the `authorization` metadata, and the one-way hash under which
//! storaged's config stores them (so a leaked config leaks no token).
//!
//! A token is `sdt_` followed by 64 hex digits (256 random bits);
//! storaged's config holds the lowercase hex SHA-256 of the whole token
//! string. A random 256-bit secret needs no salt or slow hash: there is
//! nothing to guess.

use sha2::{Digest, Sha256};

/// gRPC metadata key carrying `Bearer <token>`.
pub const AUTHORIZATION_METADATA_KEY: &str = "authorization";

/// Environment variable clients read their token from.
pub const TOKEN_ENV: &str = "STORAGED_TOKEN";

/// Prefix of tokens `storagectl token new` makes (any string is accepted).
pub const TOKEN_PREFIX: &str = "sdt_";

/// Longest token accepted (longer ones are refused unhashed).
pub const TOKEN_BYTES_MAX: usize = 512;

/// The SHA-256 of `token`, as config stores it.
pub fn token_sha256(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// [`token_sha256`] as 64 lowercase hex digits.
pub fn token_sha256_hex(token: &str) -> String {
    hex(&token_sha256(token))
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Parses 64 hex digits into a SHA-256 value.
pub fn parse_sha256_hex(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 || !text.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// The metadata value for `token`.
pub fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// The token in an `authorization` value, if it is a bearer token.
pub fn parse_bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_and_parses() {
        let h = token_sha256_hex("abc");
        assert_eq!(
            h,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(parse_sha256_hex(&h), Some(token_sha256("abc")));
        assert_eq!(parse_sha256_hex("xyz"), None);
        assert_eq!(parse_sha256_hex(&"g".repeat(64)), None);
        assert_eq!(parse_bearer("Bearer sdt_1"), Some("sdt_1"));
        assert_eq!(parse_bearer("bearer  x "), Some("x"));
        assert_eq!(parse_bearer("Basic x"), None);
        assert_eq!(parse_bearer("Bearer "), None);
    }
}
