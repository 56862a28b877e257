//! A cluster with TLS and tenants, on a real etcd: nodes call each other
//! over TLS verified against the cluster's CA and with the nodes' token,
//! clients use their own tokens against every node, and a tenant reads a
//! cluster dataset (and the unit datasets that hold its shares) only where
//! its rights on the dataset's name allow.

use std::path::{Path, PathBuf};
use std::process::Output;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use storaged_proto::auth::token_sha256_hex;
use storaged_tests::cluster::Cluster;
use storaged_tests::{Daemon, pattern, read_tree, write_tree};

const TEAM: &str = "sdt_team_cluster_0123456789abcdef0123456789abcdef0123456789abcdef01";
const OTHER: &str = "sdt_other_cluster_0123456789abcdef0123456789abcdef0123456789abcdef0";
const NODES: &str = "sdt_nodes_cluster_0123456789abcdef0123456789abcdef0123456789abcdef0";

/// The cluster's CA (written as ca.pem) and one node certificate and key
/// for every node (node.pem, node.key): a server's and a client's, for
/// 127.0.0.1.
struct Pki {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn pki(dir: &Path) -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "cluster CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let key = KeyPair::generate().unwrap();
    let mut node =
        CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
    node.distinguished_name.push(DnType::CommonName, "node");
    node.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let cert = node
        .signed_by(&key, &Issuer::from_params(&ca, &ca_key))
        .unwrap();
    let out = Pki {
        ca: dir.join("ca.pem"),
        cert: dir.join("node.pem"),
        key: dir.join("node.key"),
    };
    std::fs::write(&out.ca, ca_pem).unwrap();
    std::fs::write(&out.cert, cert.pem()).unwrap();
    std::fs::write(&out.key, key.serialize_pem()).unwrap();
    out
}

/// The nodes' config: short leases, TLS, the cluster CA and token file,
/// and the tenants (the same on every node).
fn config(pki: &Pki, token_file: &Path) -> String {
    format!(
        r#"
cluster_lease_ttl_s = 2
cluster_request_timeout_s = 2
cluster_sweep_interval_s = 1
cluster_rebalance = false
tls_cert = "{cert}"
tls_key = "{key}"
cluster_ca = "{ca}"
cluster_token_file = "{token_file}"

[[tenant]]
name = "team"
tokens_sha256 = ["{team}"]
write = ["team-"]

[[tenant]]
name = "other"
tokens_sha256 = ["{other}"]
write = ["other-"]

[[tenant]]
name = "nodes"
tokens_sha256 = ["{nodes}"]
write = ["cluster."]
"#,
        cert = pki.cert.display(),
        key = pki.key.display(),
        ca = pki.ca.display(),
        token_file = token_file.display(),
        team = token_sha256_hex(TEAM),
        other = token_sha256_hex(OTHER),
        nodes = token_sha256_hex(NODES),
    )
}

fn https(d: &Daemon) -> String {
    format!("https://127.0.0.1:{}", d.url.rsplit(':').next().unwrap())
}

/// `storagectl` against `url` with the cluster's CA and `token`.
fn ctl(url: &str, ca: &Path, token: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = std::process::Command::new(storaged_tests::storagectl_bin());
    cmd.args(["--server", url, "--ca"])
        .arg(ca)
        .env_remove("STORAGED_TOKEN")
        .env_remove("STORAGED_CA")
        .env_remove("STORAGED_CERT")
        .env_remove("STORAGED_KEY");
    if let Some(t) = token {
        cmd.args(["--token", t]);
    }
    cmd.args(args).output().unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_cluster_with_tls_and_tenants_carries_credentials_between_nodes() {
    // Guards against cluster mode being open where a single node is not:
    // nodes must reach each other over TLS with the nodes' token (an
    // ingest fans out to them), clients must present their own tokens on
    // every node they read from, and a tenant must not read another's
    // cluster dataset, by its name or by its shares' unit datasets.
    let tmp = tempfile::tempdir().unwrap();
    let pki = pki(tmp.path());
    let token_file = tmp.path().join("cluster.token");
    std::fs::write(&token_file, format!("{NODES}\n")).unwrap();
    let c = Cluster::start_with(&config(&pki, &token_file));
    let nodes = c.nodes(&["n1", "n2", "n3"]);
    let urls: Vec<String> = nodes.iter().map(https).collect();
    let files: Vec<(String, Vec<u8>)> = (0..30u64)
        .map(|i| (format!("s/{i:02}"), pattern(i, 1000 + i as usize * 40_000)))
        .collect();
    let src = tmp.path().join("src");
    write_tree(&src, &files);
    let src_s = src.to_str().unwrap();

    // Ingest through n1 as team: the units reach n2 and n3 over TLS.
    let out = ctl(
        &urls[0],
        &pki.ca,
        Some(TEAM),
        &["ingest", "--class", "ec:2+1", "team-ds", src_s],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    // Read back through n3, straight from every node, byte for byte.
    let export = tmp.path().join("export");
    let out = ctl(
        &urls[2],
        &pki.ca,
        Some(TEAM),
        &["export", "team-ds", export.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(read_tree(&export), files.iter().cloned().collect());

    // Another tenant sees nothing of it and reads none of it.
    let out = ctl(&urls[1], &pki.ca, Some(OTHER), &["ls"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("team-ds"));
    let out = ctl(&urls[1], &pki.ca, Some(OTHER), &["cat", "team-ds", "s/01"]);
    assert!(
        stderr(&out).contains("PERMISSION_DENIED"),
        "{}",
        stderr(&out)
    );
    // Nor its shares, by the unit's name, on any node.
    let record = c.etcd.ctl(&[
        "get",
        "--print-value-only",
        "/storaged/default/datasets/team-ds",
    ]);
    let record: serde_json::Value = serde_json::from_str(record.trim()).unwrap();
    let unit = record["unit"].as_str().unwrap().to_owned();
    for url in &urls {
        let out = ctl(url, &pki.ca, Some(OTHER), &["cat", &unit, "s/01"]);
        assert!(
            stderr(&out).contains("PERMISSION_DENIED"),
            "{}",
            stderr(&out)
        );
    }
    // The team may read its shares where they are (as its reads do).
    let out = ctl(
        &urls[1],
        &pki.ca,
        Some(TEAM),
        &["cat", &unit, ".storaged-cluster/manifest"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    // And may not write outside its names, through a cluster either.
    let out = ctl(
        &urls[0],
        &pki.ca,
        Some(TEAM),
        &["ingest", "other-ds", src_s],
    );
    assert!(
        stderr(&out).contains("PERMISSION_DENIED"),
        "{}",
        stderr(&out)
    );

    // No token, a wrong one, or plaintext: refused.
    let out = ctl(&urls[2], &pki.ca, None, &["cat", "team-ds", "s/01"]);
    assert!(stderr(&out).contains("UNAUTHENTICATED"), "{}", stderr(&out));
    let out = ctl(
        &urls[2],
        &pki.ca,
        Some("sdt_not_a_token"),
        &["cat", "team-ds", "s/01"],
    );
    assert!(stderr(&out).contains("UNAUTHENTICATED"), "{}", stderr(&out));
    let plain = urls[2].replace("https://", "http://");
    let out = ctl(&plain, &pki.ca, Some(TEAM), &["--transport", "grpc", "ls"]);
    assert!(!out.status.success(), "plaintext to a TLS node must fail");

    // rm as team frees every node's share (the sweep runs on each).
    let out = ctl(&urls[1], &pki.ca, Some(TEAM), &["rm", "team-ds", "--yes"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn a_cluster_with_tenants_or_tls_names_the_credential_it_lacks() {
    // Guards against a cluster that starts with tenants or TLS but whose
    // nodes could not call each other (found only at the first ingest),
    // or whose node token could write users' datasets.
    let tmp = tempfile::tempdir().unwrap();
    let pki = pki(tmp.path());
    let token_file = tmp.path().join("cluster.token");
    std::fs::write(&token_file, NODES).unwrap();
    let full = config(&pki, &token_file);
    let c = Cluster::start_with(&full);
    let start = |text: &str, what: &str| {
        let dir = tmp.path().join(what);
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = dir.join("node.toml");
        std::fs::write(&cfg, text).unwrap();
        let data = dir.join("data");
        let mut args = c.args(&data, &["--cluster", &c.etcd.url(), "--node-id", "n9"]);
        // The cluster's own --config comes last; this one replaces it.
        let at = args.iter().position(|a| a == "--config").unwrap();
        args[at + 1] = cfg.display().to_string();
        match Daemon::try_start_args(&data, args) {
            Ok(_) => panic!("{what}: started"),
            Err(f) => f.stderr,
        }
    };
    let without = |key: &str| {
        full.lines()
            .filter(|l| !l.starts_with(key))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let err = start(&without("cluster_token_file"), "no-token");
    assert!(err.contains("cluster_token_file"), "{err}");
    let err = start(&without("cluster_ca"), "no-ca");
    assert!(err.contains("cluster_ca"), "{err}");
    let team_token = tmp.path().join("team.token");
    std::fs::write(&team_token, TEAM).unwrap();
    let wrong = full.replace(
        &token_file.display().to_string(),
        &team_token.display().to_string(),
    );
    let err = start(&wrong, "team-token");
    assert!(err.contains("may not write the unit datasets"), "{err}");
    let unknown = tmp.path().join("unknown.token");
    std::fs::write(&unknown, "sdt_nobody").unwrap();
    let err = start(
        &full.replace(
            &token_file.display().to_string(),
            &unknown.display().to_string(),
        ),
        "unknown-token",
    );
    assert!(err.contains("is no tenant's"), "{err}");
}
