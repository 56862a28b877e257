//! TLS and mutual TLS against the real daemon, with certificates the test
//! makes (rcgen): a client certificate from the configured CA is required
//! and names its tenant; no certificate, another CA's, an expired one, a
//! server the client does not trust and plaintext all fail.

use std::path::{Path, PathBuf};
use std::process::Output;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use storaged_proto::auth::token_sha256_hex;
use storaged_tests::{Daemon, pattern, write_tree};

const OPS: &str = "sdt_ops_tls_0123456789abcdef0123456789abcdef0123456789abcdef0123456";

struct Ca {
    params: CertificateParams,
    key: KeyPair,
    pem: String,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let pem = params.self_signed(&key).unwrap().pem();
    Ca { params, key, pem }
}

/// A certificate and key signed by `ca`, written as `<name>.pem` and
/// `<name>.key`.
struct Leaf {
    cert: PathBuf,
    key: PathBuf,
}

fn leaf(dir: &Path, ca: &Ca, name: &str, server: bool, uri: Option<&str>, expired: bool) -> Leaf {
    let key = KeyPair::generate().unwrap();
    let sans = if server {
        vec!["localhost".to_owned(), "127.0.0.1".to_owned()]
    } else {
        Vec::new()
    };
    let mut params = CertificateParams::new(sans).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    if let Some(uri) = uri {
        params
            .subject_alt_names
            .push(SanType::URI(uri.try_into().unwrap()));
    }
    params.extended_key_usages = vec![if server {
        ExtendedKeyUsagePurpose::ServerAuth
    } else {
        ExtendedKeyUsagePurpose::ClientAuth
    }];
    if expired {
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    }
    let issuer = Issuer::from_params(&ca.params, &ca.key);
    let cert = params.signed_by(&key, &issuer).unwrap();
    let out = Leaf {
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}.key")),
    };
    std::fs::write(&out.cert, cert.pem()).unwrap();
    std::fs::write(&out.key, key.serialize_pem()).unwrap();
    out
}

fn ctl(url: &str, ca: &Path, client: Option<&Leaf>, token: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = std::process::Command::new(storaged_tests::storagectl_bin());
    cmd.args(["--server", url, "--transport", "as-given", "--ca"])
        .arg(ca)
        .env_remove("STORAGED_TOKEN")
        .env_remove("STORAGED_CA")
        .env_remove("STORAGED_CERT")
        .env_remove("STORAGED_KEY");
    if let Some(c) = client {
        cmd.arg("--cert").arg(&c.cert).arg("--key").arg(&c.key);
    }
    if let Some(t) = token {
        cmd.args(["--token", t]);
    }
    cmd.args(args).output().unwrap()
}

fn err(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn mutual_tls_admits_valid_client_certificates_and_maps_them_to_tenants() {
    // Guards against a storaged reachable over the network without
    // encryption or client identity: with TLS and tenants it may listen on
    // every address, and then only clients with a valid certificate from
    // its CA get in, as the tenant their certificate names.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ca_good = ca("storaged test CA");
    let ca_other = ca("someone else's CA");
    let ca_pem = dir.join("ca.pem");
    std::fs::write(&ca_pem, &ca_good.pem).unwrap();
    let other_ca_pem = dir.join("other-ca.pem");
    std::fs::write(&other_ca_pem, &ca_other.pem).unwrap();
    let server = leaf(dir, &ca_good, "server", true, None, false);
    let vision = leaf(
        dir,
        &ca_good,
        "vision",
        false,
        Some("spiffe://lab/vision"),
        false,
    );
    let laptop = leaf(dir, &ca_good, "ops-laptop", false, None, false);
    let stranger = leaf(
        dir,
        &ca_other,
        "stranger",
        false,
        Some("spiffe://lab/vision"),
        false,
    );
    let expired = leaf(
        dir,
        &ca_good,
        "expired",
        false,
        Some("spiffe://lab/vision"),
        true,
    );

    let config = dir.join("storaged.toml");
    std::fs::write(
        &config,
        format!(
            r#"
tls_cert = "{cert}"
tls_key = "{key}"
tls_client_ca = "{ca}"

[[tenant]]
name = "vision"
cert_names = ["spiffe://lab/vision"]
read = ["shared-"]

[[tenant]]
name = "ops"
tokens_sha256 = ["{ops}"]
write = [""]
admin = true
"#,
            cert = server.cert.display(),
            key = server.key.display(),
            ca = ca_pem.display(),
            ops = token_sha256_hex(OPS),
        ),
    )
    .unwrap();
    let data = dir.join("data");
    let mut args: Vec<String> = [
        "serve",
        "--listen",
        "0.0.0.0:0",
        "--data-dir",
        data.to_str().unwrap(),
        "--device-size",
        "64MiB",
        "--stripe-unit",
        "64KiB",
        "--config",
        config.to_str().unwrap(),
    ]
    .map(String::from)
    .into();
    args.push("--device".into());
    args.push(data.join("dev0.img").display().to_string());
    // Every address, with tenants and TLS: no --insecure needed.
    let d = Daemon::start_args(&data, args);
    let port = d.url.rsplit(':').next().unwrap().to_owned();
    let url = format!("https://127.0.0.1:{port}");

    // The operator: a certificate no tenant claims, and a token.
    let src = dir.join("src");
    write_tree(&src, &[("a".into(), pattern(1, 100_000))]);
    for name in ["shared-imagenet", "private-audio"] {
        let out = ctl(
            &url,
            &ca_pem,
            Some(&laptop),
            Some(OPS),
            &["ingest", name, src.to_str().unwrap()],
        );
        assert!(out.status.success(), "{}", err(&out));
    }
    // The certificate names the tenant: vision sees what it may read.
    let out = ctl(&url, &ca_pem, Some(&vision), None, &["ls"]);
    assert!(out.status.success(), "{}", err(&out));
    let ls = String::from_utf8_lossy(&out.stdout);
    assert!(
        ls.contains("shared-imagenet") && !ls.contains("private-audio"),
        "{ls}"
    );
    let out = ctl(
        &url,
        &ca_pem,
        Some(&vision),
        None,
        &["cat", "shared-imagenet", "a"],
    );
    assert_eq!(out.stdout, pattern(1, 100_000));
    let out = ctl(
        &url,
        &ca_pem,
        Some(&vision),
        None,
        &["rm", "shared-imagenet", "--yes"],
    );
    assert!(err(&out).contains("PERMISSION_DENIED"), "{}", err(&out));

    // A valid certificate no tenant claims, without a token.
    let out = ctl(&url, &ca_pem, Some(&laptop), None, &["ls"]);
    assert!(err(&out).contains("UNAUTHENTICATED"), "{}", err(&out));
    assert!(err(&out).contains("ops-laptop"), "{}", err(&out));

    // No certificate, another CA's, an expired one: no handshake.
    for (what, client, says) in [
        ("no certificate", None, ""),
        ("another CA's certificate", Some(&stranger), ""),
        ("an expired certificate", Some(&expired), ""),
    ] {
        let out = ctl(&url, &ca_pem, client, Some(OPS), &["status"]);
        eprintln!("{what}: {}", err(&out));
        assert!(!out.status.success(), "{what} got in");
        assert!(err(&out).contains(says), "{what}: {}", err(&out));
        assert!(!err(&out).contains("panicked"), "{what}: {}", err(&out));
    }
    // A client that does not trust the server's CA stops too.
    let out = ctl(&url, &other_ca_pem, Some(&vision), None, &["ls"]);
    assert!(!out.status.success(), "a server the client does not trust");
    // Plaintext to the TLS port gets nowhere.
    let out = ctl(
        &format!("http://127.0.0.1:{port}"),
        &ca_pem,
        None,
        Some(OPS),
        &["ls"],
    );
    assert!(!out.status.success(), "plaintext got in");
    // https:// without a CA says what is missing.
    let out = std::process::Command::new(storaged_tests::storagectl_bin())
        .args(["--server", &url, "ls"])
        .env_remove("STORAGED_CA")
        .output()
        .unwrap();
    assert!(err(&out).contains("--ca"), "{}", err(&out));
    // The Unix socket stays plain (its peers are known by uid): the
    // operator's token works there without any certificate.
    let out = std::process::Command::new(storaged_tests::storagectl_bin())
        .args(["--server", &d.unix_url(), "--token", OPS, "status"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", err(&out));
}

#[test]
fn tls_files_that_cannot_be_used_are_named_at_start() {
    // Guards against a TLS misconfiguration starting a daemon that fails
    // every handshake, or failing without naming the file.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let not_pem = dir.join("not.pem");
    std::fs::write(&not_pem, "hello").unwrap();
    for (config, says) in [
        (
            format!("tls_cert = \"{}\"\n", not_pem.display()),
            "TLS needs both tls_cert and tls_key",
        ),
        (
            format!(
                "tls_cert = \"{0}\"\ntls_key = \"{0}\"\n",
                dir.join("missing.pem").display()
            ),
            "cannot read tls_cert",
        ),
        (
            format!("tls_cert = \"{0}\"\ntls_key = \"{0}\"\n", not_pem.display()),
            "holds no PEM CERTIFICATE block",
        ),
    ] {
        let path = dir.join("storaged.toml");
        std::fs::write(&path, config).unwrap();
        let data = dir.join("data");
        let f = Daemon::try_start_args(
            &data,
            [
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
                data.to_str().unwrap(),
                "--config",
                path.to_str().unwrap(),
            ]
            .map(String::from)
            .into(),
        )
        .err()
        .expect("storaged refused to start");
        assert_eq!(f.code, Some(1));
        assert!(f.stderr.contains(says), "{says}: {}", f.stderr);
    }
}
