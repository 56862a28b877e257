//! JWTs from an identity provider as bearer tokens, against the real
//! daemon: EdDSA and RS256 keys made by the test (rcgen, openssl), the
//! checks a token must pass, and claims that narrow a tenant's rights.

use std::path::Path;
use std::process::{Command, Output};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use storaged_tests::{Daemon, pattern, write_tree};

fn ed25519(dir: &Path, name: &str) -> (EncodingKey, std::path::PathBuf) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let public = dir.join(format!("{name}.pub"));
    std::fs::write(&public, key.public_key_pem()).unwrap();
    (
        EncodingKey::from_ed_pem(key.serialize_pem().as_bytes()).unwrap(),
        public,
    )
}

fn rsa(dir: &Path) -> (EncodingKey, std::path::PathBuf) {
    let private = dir.join("rsa.key");
    let public = dir.join("rsa.pub");
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .output()
            .expect("openssl(1) (tests/run.sh installs it)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
        "-out",
        private.to_str().unwrap(),
    ]);
    run(&[
        "pkey",
        "-in",
        private.to_str().unwrap(),
        "-pubout",
        "-out",
        public.to_str().unwrap(),
    ]);
    (
        EncodingKey::from_rsa_pem(&std::fs::read(&private).unwrap()).unwrap(),
        public,
    )
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn sign(alg: Algorithm, key: &EncodingKey, claims: serde_json::Value) -> String {
    jsonwebtoken::encode(&Header::new(alg), &claims, key).unwrap()
}

fn ctl(d: &Daemon, token: &str, args: &[&str]) -> Output {
    Command::new(storaged_tests::storagectl_bin())
        .args([
            "--server",
            &d.url,
            "--transport",
            "as-given",
            "--token",
            token,
        ])
        .args(args)
        .output()
        .unwrap()
}

fn err(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn jwts_from_the_identity_provider_name_tenants_and_are_checked() {
    // Guards against bearer credentials that only a config file can mint:
    // an identity provider's JWTs (RS256, EdDSA) name the tenant, and
    // expired, foreign, wrongly addressed or algorithm-swapped tokens fail.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (ed, ed_pub) = ed25519(dir, "idp-ed");
    let (rs, rs_pub) = rsa(dir);
    let (stranger, _) = ed25519(dir, "stranger");
    let config = dir.join("storaged.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[jwt]
issuer = "https://idp.test"
audience = "storaged"
public_keys = ["{}", "{}"]

[[tenant]]
name = "vision"
read = ["shared-"]

[[tenant]]
name = "ops"
write = [""]
admin = true
"#,
            ed_pub.display(),
            rs_pub.display()
        ),
    )
    .unwrap();
    let d = Daemon::start_with_config(&dir.join("data"), &config);
    let claims = |tenant: &str| json!({"iss": "https://idp.test", "aud": "storaged", "exp": now() + 600, "storaged_tenant": tenant});
    let ops = sign(Algorithm::RS256, &rs, claims("ops"));
    let vision = sign(Algorithm::EdDSA, &ed, claims("vision"));

    let src = dir.join("src");
    write_tree(&src, &[("a".into(), pattern(3, 5000))]);
    for name in ["shared-x", "private-y"] {
        let out = ctl(&d, &ops, &["ingest", name, src.to_str().unwrap()]);
        assert!(out.status.success(), "{}", err(&out));
    }
    let out = ctl(&d, &vision, &["ls"]);
    assert!(out.status.success(), "{}", err(&out));
    let ls = String::from_utf8_lossy(&out.stdout);
    assert!(ls.contains("shared-x") && !ls.contains("private-y"), "{ls}");

    // Each broken token fails UNAUTHENTICATED, saying why.
    let mut expired = claims("vision");
    expired["exp"] = json!(now() - 3600);
    let mut wrong_aud = claims("vision");
    wrong_aud["aud"] = json!("someone-else");
    let mut wrong_iss = claims("vision");
    wrong_iss["iss"] = json!("https://evil.test");
    let mut no_exp = claims("vision");
    no_exp.as_object_mut().unwrap().remove("exp");
    let hs = sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(&std::fs::read(&ed_pub).unwrap()),
        claims("ops"),
    );
    for (what, token, says) in [
        ("expired", sign(Algorithm::EdDSA, &ed, expired), "expired"),
        (
            "wrong audience",
            sign(Algorithm::EdDSA, &ed, wrong_aud),
            "audience",
        ),
        (
            "wrong issuer",
            sign(Algorithm::EdDSA, &ed, wrong_iss),
            "issuer",
        ),
        ("no exp", sign(Algorithm::EdDSA, &ed, no_exp), "exp"),
        (
            "unknown key",
            sign(Algorithm::EdDSA, &stranger, claims("vision")),
            "signature",
        ),
        ("HS256 with the public key as secret", hs, "algorithm"),
        (
            "unknown tenant",
            sign(Algorithm::EdDSA, &ed, claims("nobody")),
            "does not have",
        ),
    ] {
        let out = ctl(&d, &token, &["ls"]);
        assert!(!out.status.success(), "{what} was accepted");
        assert!(
            err(&out).contains("UNAUTHENTICATED"),
            "{what}: {}",
            err(&out)
        );
        assert!(err(&out).contains(says), "{what}: {}", err(&out));
    }

    // Claims narrow the tenant's rights for this token, never widen them.
    let mut narrow = claims("ops");
    narrow["storaged_write"] = json!([]);
    narrow["storaged_admin"] = json!(false);
    let narrow = sign(Algorithm::RS256, &rs, narrow);
    let out = ctl(&d, &narrow, &["ls"]);
    assert!(out.status.success(), "{}", err(&out));
    let out = ctl(&d, &narrow, &["rm", "private-y", "--yes"]);
    assert!(err(&out).contains("PERMISSION_DENIED"), "{}", err(&out));
    let out = ctl(&d, &narrow, &["scrub"]);
    assert!(err(&out).contains("PERMISSION_DENIED"), "{}", err(&out));
    let mut wider = claims("vision");
    wider["storaged_write"] = json!([""]);
    let wider = sign(Algorithm::EdDSA, &ed, wider);
    let out = ctl(&d, &wider, &["rm", "shared-x", "--yes"]);
    assert!(err(&out).contains("PERMISSION_DENIED"), "{}", err(&out));
}
