//! A client that is not ours: Python grpcio calls health, lists services
//! through reflection and calls the API dynamically from reflected
//! descriptors (tests/interop/interop_check.py), including the streaming
//! reads that storaged frames itself (`storaged::wire`).
//!
//! The interpreter comes from `$STORAGED_TEST_PYTHON`, or `.venv/bin/python`
//! at the workspace root, which the README's test command creates with
//! grpcio, grpcio-health-checking and grpcio-reflection. Without it the test
//! fails with instructions: it never skips.

use std::path::PathBuf;

use storaged_tests::{Daemon, DaemonOpts, write_tree};

fn python() -> PathBuf {
    if let Ok(p) = std::env::var("STORAGED_TEST_PYTHON") {
        return PathBuf::from(p);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let p = root.join(".venv/bin/python");
    assert!(
        p.exists(),
        "{} is missing: run tests/run.sh (it creates the virtualenv with grpcio, grpcio-health-checking and grpcio-reflection), or set STORAGED_TEST_PYTHON",
        p.display()
    );
    p
}

/// Size of `big`; interop_check.py regenerates the same bytes.
const INTEROP_BIG_BYTES: usize = 3 * 1024 * 1024 + 123;

#[test]
fn python_grpcio_health_reflection_and_dynamic_calls() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(&tmp.path().join("data"), &DaemonOpts::default());
    let src = tmp.path().join("src");
    // Several read windows, and a tail that ends mid-block: the zero-copy
    // framing of Read and ReadBatch must decode in a stack that is not ours.
    let big: Vec<u8> = (0..INTEROP_BIG_BYTES)
        .map(|i| (i.wrapping_mul(7) + i / 4096) as u8)
        .collect();
    write_tree(
        &src,
        &[("a".into(), b"hello".to_vec()), ("big".into(), big)],
    );
    d.ctl_ok(&["ingest", "interop", src.to_str().unwrap()]);
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("interop/interop_check.py");
    let target = d.url.trim_start_matches("http://").to_owned();
    let out = std::process::Command::new(python())
        .arg(script)
        .arg(&target)
        .arg(INTEROP_BIG_BYTES.to_string())
        .output()
        .expect("running python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "interop check failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("interop ok"), "{stdout}");
}
