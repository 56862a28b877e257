//! Tenants against the real daemon: tokens and Unix uids, rights on
//! dataset-name prefixes, admin operations, regions, quotas, the audit log
//! and the safe defaults of a storaged without tenants.

use std::path::Path;

use storaged_client::{Client, ConnectOptions};
use storaged_proto::auth::token_sha256_hex;
use storaged_proto::pb;
use storaged_tests::{Daemon, DaemonOpts, pattern, write_tree};
use tonic::Code;

const VISION: &str = "sdt_vision_0123456789abcdef0123456789abcdef0123456789abcdef01234567";
const AUDIO: &str = "sdt_audio_0123456789abcdef0123456789abcdef0123456789abcdef012345678";
const OPS: &str = "sdt_ops_0123456789abcdef0123456789abcdef0123456789abcdef0123456789a";
const SMALL: &str = "sdt_small_0123456789abcdef0123456789abcdef0123456789abcdef012345678";

fn uid() -> u32 {
    // SAFETY: getuid(2) cannot fail.
    unsafe { libc::getuid() }
}

/// A config with four tenants; this process's uid maps to "local" on the
/// Unix socket (read of "shared-" only).
fn config(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("storaged.toml");
    let text = format!(
        r#"
audit_log = "{audit}"

[[tenant]]
name = "vision"
tokens_sha256 = ["{vision}"]
read = ["shared-"]
write = ["vision-"]

[[tenant]]
name = "audio"
tokens_sha256 = ["{audio}"]
write = ["audio-"]

[[tenant]]
name = "ops"
tokens_sha256 = ["{ops}"]
admin = true

[[tenant]]
name = "small"
tokens_sha256 = ["{small}"]
write = ["small-"]
quota = {{ bytes = "1MiB", datasets = 2 }}

[[tenant]]
name = "local"
uids = [{uid}]
read = ["shared-"]
"#,
        audit = dir.join("audit.log").display(),
        vision = token_sha256_hex(VISION),
        audio = token_sha256_hex(AUDIO),
        ops = token_sha256_hex(OPS),
        small = token_sha256_hex(SMALL),
        uid = uid(),
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn daemon(tmp: &tempfile::TempDir) -> Daemon {
    let config = config(tmp.path());
    Daemon::start_with_config(&tmp.path().join("data"), &config)
}

async fn as_tenant(d: &Daemon, token: &str) -> Client {
    Client::connect_with(
        &d.url,
        &ConnectOptions {
            token: Some(token.into()),
            ..Default::default()
        },
    )
    .await
    .unwrap()
}

fn ctl_as(d: &Daemon, token: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(storaged_tests::storagectl_bin())
        .args(["--server", &d.url, "--token", token])
        .args(args)
        .output()
        .unwrap()
}

fn code_of(e: storaged_client::ClientError) -> Code {
    match e {
        storaged_client::ClientError::Status(s) => s.code(),
        other => panic!("expected a status, got {other}"),
    }
}

fn ingest_as(d: &Daemon, token: &str, dataset: &str, src: &Path) -> std::process::Output {
    ctl_as(d, token, &["ingest", dataset, src.to_str().unwrap()])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_see_and_touch_only_their_own_datasets() {
    // Guards against every loopback client being trusted completely: any
    // caller could list, read and delete every dataset.
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_tree(&src, &[("a".into(), pattern(1, 100_000))]);
    let d = daemon(&tmp);

    // No credentials, or a wrong token: UNAUTHENTICATED, on every method.
    let anonymous = Client::connect_with(&d.url, &ConnectOptions::default())
        .await
        .unwrap();
    assert_eq!(
        code_of(anonymous.list_datasets().await.unwrap_err()),
        Code::Unauthenticated
    );
    assert_eq!(
        code_of(anonymous.status().await.unwrap_err()),
        Code::Unauthenticated
    );
    let forged = as_tenant(&d, "sdt_forged").await;
    let err = forged.list_datasets().await.unwrap_err();
    assert_eq!(code_of(err), Code::Unauthenticated);
    let out = d.ctl(&["ls"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("UNAUTHENTICATED") && err.contains("--token"),
        "{err}"
    );

    assert!(ingest_as(&d, VISION, "vision-train", &src).status.success());
    assert!(ingest_as(&d, AUDIO, "audio-train", &src).status.success());
    // Writing outside one's prefixes is denied, and nothing is created.
    let out = ingest_as(&d, VISION, "audio-mine", &src);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("PERMISSION_DENIED"), "{err}");

    let vision = as_tenant(&d, VISION).await;
    let audio = as_tenant(&d, AUDIO).await;
    let names = |c: Client| async move {
        c.list_datasets()
            .await
            .unwrap()
            .into_iter()
            .map(|d| d.name)
            .collect::<Vec<_>>()
    };
    assert_eq!(names(vision.clone()).await, ["vision-train"]);
    assert_eq!(names(audio.clone()).await, ["audio-train"]);
    let ops = as_tenant(&d, OPS).await;
    assert_eq!(names(ops.clone()).await.len(), 2, "admin sees all");

    // Another tenant's dataset: PERMISSION_DENIED for every read path, and
    // the same for one that does not exist (no existence oracle).
    for dataset in ["vision-train", "vision-nothing-here"] {
        let ds = audio.dataset(dataset).unwrap();
        assert_eq!(
            code_of(ds.read("a").await.unwrap_err()),
            Code::PermissionDenied
        );
        assert_eq!(
            code_of(ds.stat("a").await.unwrap_err()),
            Code::PermissionDenied
        );
        assert_eq!(
            code_of(ds.list("").await.unwrap_err()),
            Code::PermissionDenied
        );
        assert_eq!(
            code_of(ds.hint(&["a".into()]).await.unwrap_err()),
            Code::PermissionDenied
        );
        let err = audio
            .raw()
            .read_batch(pb::ReadBatchRequest {
                dataset: dataset.into(),
                items: vec![pb::ReadItem {
                    path: "a".into(),
                    offset: 0,
                    length: None,
                }],
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
        let err = audio
            .raw()
            .delete_dataset(pb::DeleteDatasetRequest {
                dataset: dataset.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
        assert!(!err.message().contains("not found"), "{}", err.message());
    }
    // The owner still reads it, byte for byte.
    let got = vision
        .dataset("vision-train")
        .unwrap()
        .read("a")
        .await
        .unwrap();
    assert_eq!(&got[..], &pattern(1, 100_000)[..]);

    // Status: no device paths and only readable datasets for non-admins.
    let s = audio.status().await.unwrap();
    assert!(
        s.devices.iter().all(|d| d.path.is_empty()),
        "{:?}",
        s.devices
    );
    assert_eq!(s.datasets.len(), 1);
    let s = ops.status().await.unwrap();
    assert!(s.devices.iter().all(|d| !d.path.is_empty()));

    // Admin operations need the admin right.
    let out = ctl_as(&d, AUDIO, &["scrub"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("PERMISSION_DENIED"),
        "{:?}",
        out
    );
    // A path of this test's own, so nothing else on the machine decides
    // whether it exists.
    let target = d.data_dir.join("replacement.img");
    let out = ctl_as(
        &d,
        AUDIO,
        &[
            "device",
            "replace",
            "0",
            target.to_str().unwrap(),
            "--healthy",
        ],
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("PERMISSION_DENIED"));
    assert!(!target.exists());
    assert!(ctl_as(&d, OPS, &["scrub"]).status.success());

    // The owner deletes its own.
    let out = ctl_as(&d, VISION, &["rm", "vision-train", "--yes"]);
    assert!(out.status.success(), "{out:?}");

    // The audit log: writes, admin operations and denials, no secrets.
    let audit = std::fs::read_to_string(tmp.path().join("audit.log")).unwrap();
    let lines: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let has = |op: &str, principal: &str, result: &str| {
        lines
            .iter()
            .any(|l| l["operation"] == op && l["principal"] == principal && l["result"] == result)
    };
    assert!(has("ingest", "vision", "ok"), "{audit}");
    assert!(has("ingest", "vision", "PermissionDenied"), "{audit}");
    assert!(has("read", "audio", "PermissionDenied"), "{audit}");
    assert!(has("scrub", "audio", "PermissionDenied"), "{audit}");
    assert!(has("scrub", "ops", "ok"), "{audit}");
    assert!(has("delete_dataset", "vision", "ok"), "{audit}");
    assert!(
        has("list_datasets", "unauthenticated", "Unauthenticated"),
        "{audit}"
    );
    let ok_ingest = lines
        .iter()
        .find(|l| l["operation"] == "ingest" && l["result"] == "ok")
        .unwrap();
    assert_eq!(ok_ingest["bytes"], 100_000);
    assert!(
        ok_ingest["request_id"]
            .as_str()
            .is_some_and(|s| !s.is_empty())
    );
    for secret in [VISION, AUDIO, OPS, "sdt_forged"] {
        assert!(!audit.contains(secret), "a token reached the audit log");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uids_map_to_tenants_and_regions_stay_with_their_tenant() {
    // Guards against regions and ReadInto ignoring tenants: one tenant
    // reading into (or through) another's region.
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_tree(&src, &[("a".into(), pattern(2, 50_000))]);
    let d = daemon(&tmp);
    assert!(ingest_as(&d, VISION, "vision-x", &src).status.success());

    // On the Unix socket without a token, the uid decides: "local" reads
    // shared- only.
    let local = Client::connect_with(&d.unix_url(), &ConnectOptions::default())
        .await
        .unwrap();
    assert!(local.list_datasets().await.unwrap().is_empty());
    let err = local
        .dataset("vision-x")
        .unwrap()
        .read("a")
        .await
        .unwrap_err();
    assert_eq!(code_of(err), Code::PermissionDenied);

    // A token on the Unix socket wins over the uid.
    let vision_local = Client::connect_with(
        &d.unix_url(),
        &ConnectOptions {
            token: Some(VISION.into()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut region = vision_local.register_region(1 << 20).await.unwrap();
    let reads = [storaged_client::RegionRead::whole("a", 50_000)];
    let batch = vision_local
        .dataset("vision-x")
        .unwrap()
        .read_into(&mut region, &reads)
        .await
        .unwrap();
    assert_eq!(batch.get(0).unwrap(), &pattern(2, 50_000)[..]);
    drop(batch);
    // The same uid as another tenant: the region does not exist for it.
    let audio_local = Client::connect_with(
        &d.unix_url(),
        &ConnectOptions {
            token: Some(AUDIO.into()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let err = audio_local
        .raw()
        .read_into(pb::ReadIntoRequest {
            region_id: region.id(),
            dataset: "audio-none".into(),
            items: vec![],
            max_in_flight: 0,
            dataset_id: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{}", err.message());
    // And it may not read vision's dataset into its own region either.
    let mut own = audio_local.register_region(1 << 20).await.unwrap();
    let err = audio_local
        .dataset("vision-x")
        .unwrap()
        .read_into(&mut own, &reads)
        .await
        .unwrap_err();
    assert_eq!(code_of(err), Code::PermissionDenied);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_stop_ingests_before_any_byte_is_written() {
    // Guards against one tenant filling the shared pool: declared sizes
    // over the quota fail at once, and nothing is written.
    let tmp = tempfile::tempdir().unwrap();
    let small_src = tmp.path().join("small");
    write_tree(&small_src, &[("a".into(), pattern(3, 600_000))]);
    let big_src = tmp.path().join("big");
    write_tree(&big_src, &[("b".into(), pattern(4, 2 << 20))]);
    let d = daemon(&tmp);
    let ops = as_tenant(&d, OPS).await;
    let used_before = ops.status().await.unwrap().used_bytes;

    let out = ingest_as(&d, SMALL, "small-big", &big_src);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("RESOURCE_EXHAUSTED") && err.contains("quota"),
        "{err}"
    );
    let s = ops.status().await.unwrap();
    assert_eq!(s.used_bytes, used_before, "nothing was allocated");
    assert!(s.datasets.is_empty());

    // Within the quota it works; the second pushes bytes over.
    assert!(ingest_as(&d, SMALL, "small-1", &small_src).status.success());
    let out = ingest_as(&d, SMALL, "small-2", &small_src);
    assert!(String::from_utf8_lossy(&out.stderr).contains("quota"));
    // Datasets: 2 at most (deleting frees the quota).
    assert!(
        ctl_as(&d, SMALL, &["rm", "small-1", "--yes"])
            .status
            .success()
    );
    let tiny = tmp.path().join("tiny");
    write_tree(&tiny, &[("t".into(), pattern(5, 10))]);
    assert!(ingest_as(&d, SMALL, "small-t1", &tiny).status.success());
    assert!(ingest_as(&d, SMALL, "small-t2", &tiny).status.success());
    let out = ingest_as(&d, SMALL, "small-t3", &tiny);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("3 datasets"), "{err}");
}

#[test]
fn a_storaged_without_tenants_stays_on_loopback_unless_told() {
    // Guards against `--listen 0.0.0.0:PORT` exposing an open pool (every
    // caller is the operator) without a word.
    let tmp = tempfile::tempdir().unwrap();
    let mut args = DaemonOpts::default().args(&tmp.path().join("data"));
    let at = args.iter().position(|a| a == "127.0.0.1:0").unwrap();
    args[at] = "0.0.0.0:0".into();
    let Err(err) = Daemon::try_start_args(&tmp.path().join("data"), args.clone()) else {
        panic!("storaged listened on 0.0.0.0 without --insecure");
    };
    assert_eq!(err.code, Some(1));
    assert!(
        err.stderr.contains("refusing to listen on 0.0.0.0") && err.stderr.contains("--insecure"),
        "{}",
        err.stderr
    );
    assert!(
        !tmp.path().join("data").join("dev0.img").exists(),
        "nothing was created"
    );
    args.push("--insecure".into());
    let d = Daemon::start_args(&tmp.path().join("data"), args);
    assert!(d.stderr().contains("INSECURE"), "{}", d.stderr());
    // Device files and the catalog are for storaged alone.
    use std::os::unix::fs::PermissionsExt;
    for f in ["dev0.img", "catalog.redb"] {
        let mode = std::fs::metadata(d.data_dir.join(f))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{f} is {mode:o}");
    }
}

#[test]
fn token_new_prints_a_working_config_line() {
    let out = std::process::Command::new(storaged_tests::storagectl_bin())
        .args(["token", "new", "--tenant", "vision"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let token = text
        .lines()
        .find_map(|l| l.strip_prefix("token:"))
        .unwrap()
        .trim()
        .to_owned();
    assert!(token.starts_with("sdt_") && token.len() == 68, "{token}");
    assert!(text.contains(&token_sha256_hex(&token)), "{text}");
    assert!(text.contains("\"vision\""), "{text}");
}
