//! Unit tests of `config`.

// Guards device globs and directories: patterns match names in their
// directory (partition links skipped), directories give their block
// devices and .img files, links to one device count once, and a
// pattern that matches nothing is an error.
#[test]
fn device_globs_and_directories_expand() {
    use super::devices::wildcard;
    use super::expand_devices;
    assert!(wildcard(b"nvme-*", b"nvme-Samsung_1"));
    assert!(wildcard(b"dev?.img", b"dev3.img") && !wildcard(b"dev?.img", b"dev10.img"));
    assert!(!wildcard(b"nvme-*", b"sda"));
    let dir = tempfile::tempdir().unwrap();
    for n in [
        "dev0.img",
        "dev1.img",
        "notes.txt",
        "nvme-a",
        "nvme-a-part1",
    ] {
        std::fs::write(dir.path().join(n), b"x").unwrap();
    }
    std::os::unix::fs::symlink(dir.path().join("dev0.img"), dir.path().join("nvme-b")).unwrap();
    let got = expand_devices(&[dir.path().to_path_buf()]).unwrap();
    assert_eq!(
        got,
        vec![dir.path().join("dev0.img"), dir.path().join("dev1.img")]
    );
    let got = expand_devices(&[dir.path().join("dev0.img"), dir.path().join("nvme-*")]).unwrap();
    assert_eq!(
        got,
        vec![dir.path().join("dev0.img"), dir.path().join("nvme-a")],
        "nvme-b is dev0.img"
    );
    // Given explicitly twice: kept, for the pool to refuse by name.
    let twice = vec![dir.path().join("dev1.img"), dir.path().join("dev1.img")];
    assert_eq!(expand_devices(&twice).unwrap(), twice);
    assert!(
        expand_devices(&[dir.path().join("sd*")])
            .unwrap_err()
            .contains("matches nothing")
    );
    let plain = vec![dir.path().join("absent.img")];
    assert_eq!(expand_devices(&plain).unwrap(), plain);
}

use super::*;

#[test]
fn defaults() {
    let c = ServeConfig::resolve(ServeFlags::default()).unwrap();
    assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
    assert_eq!(c.store.devices.len(), 4);
    assert_eq!(c.store.device_size_bytes, 4 << 30);
    assert!(c.store.devices[0].starts_with(DEFAULT_DATA_DIR));
}

#[test]
fn flags_override_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.toml");
    std::fs::write(
        &p,
        "listen = \"127.0.0.1:9000\"\ndevice_size = \"640MiB\"\nstripe_unit = \"256KiB\"\ndevices = [\"/tmp/a\", \"/tmp/b\"]\n",
    )
    .unwrap();
    let c = ServeConfig::resolve(ServeFlags {
        config: Some(p.clone()),
        listen: Some("127.0.0.1:9001".into()),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(c.listen.port(), 9001);
    assert_eq!(c.store.device_size_bytes, 640 << 20);
    assert_eq!(c.store.stripe_unit_bytes, 256 << 10);
    assert_eq!(c.store.devices.len(), 2);
    std::fs::write(&p, "lisen = \"x\"\n").unwrap();
    let err = ServeConfig::resolve(ServeFlags {
        config: Some(p),
        ..Default::default()
    })
    .unwrap_err();
    assert!(matches!(err, ConfigError::Parse { .. }), "{err:?}");
    assert!(err.to_string().contains("lisen"), "{err}");
    assert!(
        ServeConfig::resolve(ServeFlags {
            device_size: Some("12XB".into()),
            ..Default::default()
        })
        .is_err()
    );
}

/// Guards the metrics endpoint's settings: off by default, from the
/// file or the flag (the flag wins), device metrics on with it, and a
/// bad address refused by name.
#[test]
fn metrics_address_from_file_or_flag() {
    let c = ServeConfig::resolve(ServeFlags::default()).unwrap();
    assert!(c.metrics.is_none() && !c.store.io_metrics);
    let dir = tempfile::tempdir().unwrap();
    let c = resolve_file(dir.path(), "metrics = \"127.0.0.1:9464\"\n").unwrap();
    assert_eq!(c.metrics.unwrap().port(), 9464);
    assert!(c.store.io_metrics);
    let c = ServeConfig::resolve(ServeFlags {
        metrics: Some("127.0.0.1:9999".into()),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(c.metrics.unwrap().port(), 9999);
    let err = ServeConfig::resolve(ServeFlags {
        metrics: Some("nowhere".into()),
        ..Default::default()
    })
    .unwrap_err();
    assert_eq!(err.key(), Some("metrics"), "{err:?}");
    assert!(
        err.to_string().contains("metrics address \"nowhere\""),
        "{err}"
    );
}

/// Guards against the example config (tools/storaged.toml) drifting
/// from the code: it names every option, and as written it resolves
/// to exactly the defaults.
#[test]
fn the_example_config_is_every_option_at_its_default() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../tools/storaged.toml");
    let from_example = ServeConfig::resolve(ServeFlags {
        config: Some(example.into()),
        ..Default::default()
    })
    .unwrap();
    let defaults = ServeConfig::resolve(ServeFlags::default()).unwrap();
    assert_eq!(
        from_example.effective_toml().unwrap(),
        defaults.effective_toml().unwrap()
    );
    let text = std::fs::read_to_string(example).unwrap();
    let table: toml::Table = toml::from_str(&defaults.effective_toml().unwrap()).unwrap();
    for key in table.keys() {
        assert!(
            text.lines().any(|l| l.starts_with(&format!("{key} = "))),
            "{key} is not in the example"
        );
    }
    for optional in [
        "metrics",
        "unix_group",
        "audit_log",
        "tls_cert",
        "tls_key",
        "tls_client_ca",
    ] {
        assert!(text.contains(&format!("# {optional} = ")), "{optional}");
    }
    assert!(text.contains("# [[tenant]]") && text.contains("# [jwt]"));
}

/// Guards against --print-config leaking token hashes, or printing
/// something other than what is in force.
#[test]
fn print_config_shows_what_is_in_force_with_secrets_redacted() {
    let dir = tempfile::tempdir().unwrap();
    let hash = "ab".repeat(32);
    let c = resolve_file(
        dir.path(),
        &format!(
            "buffer_pool = \"64MiB\"\nmetrics = \"127.0.0.1:9464\"\n[[tenant]]\nname = \"a\"\ntokens_sha256 = [\"{hash}\"]\nread = [\"\"]\n"
        ),
    )
    .unwrap();
    let text = c.effective_toml().unwrap();
    assert!(!text.contains(&hash), "{text}");
    assert!(text.contains(REDACTED), "{text}");
    assert!(text.contains("buffer_pool = \"64MiB\""), "{text}");
    assert!(text.contains("hint_cache = \"24MiB\""), "derived: {text}");
    assert!(text.contains("metrics = \"127.0.0.1:9464\""), "{text}");
    assert!(
        text.contains("[[tenant]]") && text.contains("name = \"a\""),
        "{text}"
    );
}

/// Resolves a config file holding `text` (written under `dir`).
fn resolve_file(dir: &Path, text: &str) -> Result<ServeConfig, ConfigError> {
    let p = dir.join("c.toml");
    std::fs::write(&p, text).unwrap();
    ServeConfig::resolve(ServeFlags {
        config: Some(p),
        ..Default::default()
    })
}

// Guards against the Unix socket's access being fixed (root-owned 0755
// locked every other user out of the same-host path): mode and group
// come from the config, bad modes are refused by name.
#[test]
fn unix_socket_access_is_configurable() {
    let dir = tempfile::tempdir().unwrap();
    let resolve = |text: &str| resolve_file(dir.path(), text);
    assert_eq!(resolve("").unwrap().unix_access.mode, 0o660);
    let c = resolve("unix_mode = \"0666\"\nunix_group = \"users\"\n").unwrap();
    assert_eq!(c.unix_access.mode, 0o666);
    assert_eq!(c.unix_access.group.as_deref(), Some("users"));
    let err = resolve("unix_mode = \"rw\"\n").unwrap_err();
    assert_eq!(err.key(), Some("unix_mode"), "{err:?}");
    assert!(err.to_string().contains("unix_mode"), "{err}");
    assert!(resolve("unix_mode = \"01777\"\n").is_err());
}

// Guards against a small buffer_pool failing to start because of the
// read-ahead default: the cache follows the pool unless set, and an
// explicit one over half the pool is refused by name.
#[test]
fn read_ahead_cache_follows_the_pool() {
    let dir = tempfile::tempdir().unwrap();
    let resolve = |text: &str| resolve_file(dir.path(), text);
    let c = ServeConfig::resolve(ServeFlags::default()).unwrap();
    assert_eq!(c.store.limits.hint_cache_bytes_max, 96 << 20);
    let c = resolve("buffer_pool = \"16MiB\"\n").unwrap();
    assert_eq!(c.store.limits.hint_cache_bytes_max, 6 << 20);
    let c =
        resolve("buffer_pool = \"1GiB\"\nhint_cache = \"512MiB\"\nread_merge = \"0\"\n").unwrap();
    assert_eq!(c.store.limits.hint_cache_bytes_max, 512 << 20);
    assert_eq!(c.store.limits.read_merge_bytes_max, 0);
    let err = resolve("buffer_pool = \"16MiB\"\nhint_cache = \"9MiB\"\n").unwrap_err();
    assert_eq!(err.key(), Some("hint_cache"), "{err:?}");
    let err = resolve("read_merge = \"32MiB\"\n").unwrap_err();
    assert_eq!(err.key(), Some("read_merge"), "{err:?}");
}

/// Guards the TCP bulk channel's address: on by default beside gRPC,
/// off where TLS would be skipped, and never unencrypted off loopback
/// without --insecure; its staging sizes are checked.
#[test]
fn the_bulk_channel_listens_beside_grpc_unless_that_would_skip_tls() {
    let with = |bulk: Option<&str>, file: &str, insecure: bool| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, file).unwrap();
        ServeConfig::resolve(ServeFlags {
            config: Some(path),
            bulk_listen: bulk.map(str::to_owned),
            insecure,
            ..Default::default()
        })
    };
    let c = with(None, "", false).unwrap();
    assert_eq!(c.bulk_listen, Some("127.0.0.1:0".parse().unwrap()));
    let c = with(Some("off"), "", false).unwrap();
    assert_eq!(c.bulk_listen, None);
    let c = with(Some("127.0.0.1:7401"), "", false).unwrap();
    assert_eq!(c.bulk_listen, Some("127.0.0.1:7401".parse().unwrap()));
    let err = with(Some("0.0.0.0:7401"), "", false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no TLS") && err.contains("--insecure"),
        "{err}"
    );
    assert!(with(Some("0.0.0.0:7401"), "", true).is_ok());
    let err = with(Some("nowhere"), "", false).unwrap_err().to_string();
    assert!(err.contains("auto, off, or an address"), "{err}");
    let tls = "tls_cert = \"/c.pem\"\ntls_key = \"/k.pem\"\n";
    assert_eq!(
        with(None, tls, false).unwrap().bulk_listen,
        None,
        "auto is off with TLS"
    );
    let err = with(Some("127.0.0.1:7401"), tls, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no TLS yet"), "{err}");
    for (file, key) in [
        ("bulk_staging = \"100KiB\"\n", "bulk_staging"),
        ("bulk_staging = \"3GiB\"\n", "bulk_staging"),
        ("bulk_staging = \"1536KiB\"\n", "bulk_staging"),
        (
            "bulk_staging = \"32MiB\"\nbulk_staging_total = \"16MiB\"\n",
            "bulk_staging_total",
        ),
    ] {
        let err = with(None, file, false).unwrap_err().to_string();
        assert!(err.contains(key), "{file}: {err}");
    }
}

/// Guards against cluster keys that cannot work being accepted: a repair
/// faster than a node can be seen back, credentials for what is not
/// configured, cluster keys without a cluster.
#[test]
fn cluster_repair_and_credential_keys_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let base = "cluster = \"etcd://127.0.0.1:2379\"\nnode_id = \"n1\"\n";
    let c = resolve_file(dir.path(), base).unwrap();
    let cluster = c.cluster.as_ref().unwrap();
    assert_eq!(cluster.rebuild_after_s, DEFAULT_CLUSTER_REBUILD_AFTER_S);
    assert_eq!(
        (cluster.peer_token.clone(), cluster.peer_ca.clone()),
        (None, None)
    );
    let off = resolve_file(dir.path(), &format!("{base}cluster_rebuild_after_s = 0\n")).unwrap();
    assert_eq!(off.cluster.unwrap().rebuild_after_s, 0);
    for (extra, key) in [
        (
            "cluster_lease_ttl_s = 20\ncluster_rebuild_after_s = 5\n",
            "cluster_rebuild_after_s",
        ),
        (
            "cluster_token_file = \"/nonexistent\"\n",
            "cluster_token_file",
        ),
        ("cluster_ca = \"/nonexistent\"\n", "cluster_ca"),
    ] {
        let err = resolve_file(dir.path(), &format!("{base}{extra}")).unwrap_err();
        assert!(err.to_string().contains(key), "{extra}: {err}");
    }
    let err = resolve_file(dir.path(), "cluster_rebuild_after_s = 60\n").unwrap_err();
    assert!(err.to_string().contains("--cluster"), "{err}");
}
