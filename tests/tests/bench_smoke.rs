//! Smoke test of the benchmark harness: `storaged-bench --quick` runs end to
//! end against fio and nginx (installed by tests/run.sh) and writes a
//! results.json that honours its contract. No timing is asserted.

use storaged_tests::bin_dir;

const WORKLOADS: [&str; 7] = [
    "shard_stream",
    "random_4k",
    "random_128k",
    "random_imagenet",
    "list_1m",
    "tls_shard_stream",
    "tls_random_128k",
];
const SYSTEMS: [&str; 10] = [
    "fio",
    "storaged_grpc",
    "storaged_mount",
    "storaged_mount_ls",
    "storaged_mount_find",
    "nginx",
    "local_odirect",
    "local_buffered",
    "storaged_grpc_token",
    "storaged_grpc_tls",
];
const ROW_KEYS: [&str; 11] = [
    "workload",
    "system",
    "concurrency",
    "gib_per_s",
    "samples_per_s",
    "p50_us",
    "p99_us",
    "p999_us",
    "cpu_s_per_gib_server",
    "cpu_s_per_gib_client",
    "ratio_to_fio",
];

#[test]
fn quick_run_writes_valid_results_json() {
    let out = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let bench = bin_dir().join("storaged-bench");
    assert!(
        bench.exists(),
        "{} missing: cargo build --bins",
        bench.display()
    );
    let run = std::process::Command::new(&bench)
        .arg("--quick")
        .arg("--out")
        .arg(out.path())
        .output()
        .expect("running storaged-bench");
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "storaged-bench failed:\n{stderr}");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        stdout.contains("workload") && stdout.contains("storaged_grpc"),
        "summary table:\n{stdout}"
    );

    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("results.json")).unwrap()).unwrap();
    let machine = &json["machine"];
    for key in ["cpu_model", "cores", "ram_bytes", "kernel", "devices"] {
        assert!(!machine[key].is_null(), "machine.{key}");
    }
    assert_eq!(machine["devices"].as_array().unwrap().len(), 4);
    let fio_cmds = json["commands"]["fio"].as_array().unwrap();
    assert!(fio_cmds.iter().all(|c| {
        c.as_str()
            .unwrap()
            .contains("--ioengine=io_uring --direct=1")
    }));
    assert!(
        json["commands"]["nginx"]["config"]
            .as_str()
            .unwrap()
            .contains("directio")
    );

    let rows = json["results"].as_array().unwrap();
    for row in rows {
        for key in ROW_KEYS {
            assert!(row.get(key).is_some(), "row lacks {key}: {row}");
        }
    }
    for w in WORKLOADS {
        assert!(rows.iter().any(|r| r["workload"] == w), "no {w} rows");
    }
    for s in SYSTEMS {
        assert!(rows.iter().any(|r| r["system"] == s), "no {s} rows");
    }
    // Ratios are relative to fio in the same workload and concurrency.
    for r in rows.iter().filter(|r| r["system"] == "fio") {
        assert_eq!(r["ratio_to_fio"].as_f64(), Some(1.0), "{r}");
    }
    // (The tls workloads compare storaged with itself: no fio there.)
    let storaged_rows = rows.iter().filter(|r| {
        r["system"] == "storaged_grpc"
            && r["workload"] != "list_1m"
            && !r["workload"].as_str().unwrap().starts_with("tls_")
    });
    for r in storaged_rows {
        assert!(r["gib_per_s"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["ratio_to_fio"].as_f64().is_some(), "{r}");
    }
}
