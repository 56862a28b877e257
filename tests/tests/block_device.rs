//! Block devices, not just files: a pool on two loop devices (`losetup`)
//! ingests, serves and survives a restart. Needs root, as CI has; without it
//! the test fails with a message rather than skipping.

use std::path::{Path, PathBuf};
use std::process::Command;

use storaged_tests::{Daemon, pattern, read_tree, write_tree};

/// A loop device over a backing file, detached on drop.
struct Loop(PathBuf);

impl Loop {
    fn attach(backing: &Path) -> Loop {
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(backing)
            .output()
            .expect("running losetup (util-linux)");
        assert!(
            out.status.success(),
            "losetup failed (this test needs root and /dev/loop-control): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Loop(PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_on_loop_devices() {
    let tmp = tempfile::tempdir().unwrap();
    let loops: Vec<Loop> = (0..2)
        .map(|i| {
            let f = tmp.path().join(format!("backing{i}.img"));
            std::fs::File::create(&f)
                .unwrap()
                .set_len(32 << 20)
                .unwrap();
            Loop::attach(&f)
        })
        .collect();
    for l in &loops {
        use std::os::unix::fs::FileTypeExt;
        assert!(
            std::fs::metadata(&l.0)
                .unwrap()
                .file_type()
                .is_block_device()
        );
    }
    let data = tmp.path().join("data");
    let mut args = vec![
        "serve".to_owned(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--data-dir".into(),
        data.display().to_string(),
        "--stripe-unit".into(),
        "64KiB".into(),
    ];
    for l in &loops {
        args.push("--device".into());
        args.push(l.0.display().to_string());
    }
    let mut d = Daemon::start_args(&data, args);
    let src = tmp.path().join("src");
    write_tree(
        &src,
        &[
            ("big".into(), pattern(1, 5 << 20)),
            ("small".into(), pattern(2, 100)),
        ],
    );
    d.ctl_ok(&["ingest", "onloop", src.to_str().unwrap()]);
    let status = d.status_json();
    let paths: Vec<&str> = status["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|dev| dev["path"].as_str().unwrap())
        .collect();
    for l in &loops {
        assert!(paths.contains(&l.0.to_str().unwrap()), "{status}");
    }
    d.restart();
    let out = tmp.path().join("out");
    d.ctl_ok(&["export", "onloop", out.to_str().unwrap()]);
    assert_eq!(read_tree(&out), read_tree(&src));
    d.stop();
}
