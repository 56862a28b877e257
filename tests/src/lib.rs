//! Harness for integration tests: runs the real `storaged` and `storagectl`
//! binaries on loopback.
//!
//! The binaries are found next to the test executable's profile directory
//! (`target/<profile>/`), or in `$STORAGED_BIN_DIR`. The README's test
//! command builds them first (`cargo build --bins`). Each daemon gets its own
//! temporary data dir and listens on port 0; the harness reads the bound
//! address from the daemon's first stdout line.

pub mod cluster;
pub mod etcd;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Directory holding the built binaries.
pub fn bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("STORAGED_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>")
        .to_path_buf();
    for b in ["storaged", "storagectl"] {
        assert!(
            dir.join(b).exists(),
            "{} is missing: build the binaries first (cargo build --bins), or set STORAGED_BIN_DIR",
            dir.join(b).display()
        );
    }
    dir
}

pub fn storaged_bin() -> PathBuf {
    bin_dir().join("storaged")
}

pub fn storagectl_bin() -> PathBuf {
    bin_dir().join("storagectl")
}

/// A running storaged.
pub struct Daemon {
    pub child: Option<Child>,
    pub url: String,
    pub data_dir: PathBuf,
    pub args: Vec<String>,
    stderr_path: PathBuf,
}

/// Options of a test daemon.
#[derive(Debug, Clone)]
pub struct DaemonOpts {
    pub devices: usize,
    pub device_size: String,
    pub stripe_unit: String,
    pub extra: Vec<String>,
}

impl Default for DaemonOpts {
    fn default() -> Self {
        Self {
            devices: 4,
            device_size: "64MiB".into(),
            stripe_unit: "64KiB".into(),
            extra: Vec::new(),
        }
    }
}

impl DaemonOpts {
    pub fn args(&self, data_dir: &Path) -> Vec<String> {
        let mut a = vec![
            "serve".to_owned(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--device-size".into(),
            self.device_size.clone(),
            "--stripe-unit".into(),
            self.stripe_unit.clone(),
        ];
        for i in 0..self.devices {
            a.push("--device".into());
            a.push(data_dir.join(format!("dev{i}.img")).display().to_string());
        }
        a.extend(self.extra.iter().cloned());
        a
    }
}

/// Outcome of starting a daemon that was expected to fail.
#[derive(Debug)]
pub struct StartFailure {
    pub code: Option<i32>,
    pub stderr: String,
}

impl Daemon {
    /// Starts storaged with `args`; panics if it does not come up.
    pub fn start_args(data_dir: &Path, args: Vec<String>) -> Daemon {
        match Self::try_start_args(data_dir, args) {
            Ok(d) => d,
            Err(f) => panic!("storaged failed to start ({:?}): {}", f.code, f.stderr),
        }
    }

    pub fn start(data_dir: &Path, opts: &DaemonOpts) -> Daemon {
        Self::start_args(data_dir, opts.args(data_dir))
    }

    /// Starts storaged with the default options and a config file of
    /// `text` written in `dir` (its data dir is `dir/data`).
    pub fn start_with_config_text(dir: &Path, text: &str) -> Daemon {
        let path = dir.join("storaged.toml");
        std::fs::write(&path, text).expect("writing the config");
        Self::start_with_config(&dir.join("data"), &path)
    }

    /// Starts storaged with the default options and `--config config`.
    pub fn start_with_config(data_dir: &Path, config: &Path) -> Daemon {
        Self::start(
            data_dir,
            &DaemonOpts {
                extra: vec!["--config".into(), config.display().to_string()],
                ..Default::default()
            },
        )
    }

    /// Starts storaged; returns its exit status and stderr if it exits
    /// before listening.
    pub fn try_start_args(data_dir: &Path, args: Vec<String>) -> Result<Daemon, StartFailure> {
        std::fs::create_dir_all(data_dir).expect("data dir");
        let stderr_path = data_dir.join(format!(
            "storaged-{}.stderr",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let stderr_file = std::fs::File::create(&stderr_path).expect("stderr file");
        let launched = storaged::testkit::launch(
            &storaged_bin(),
            &args,
            &[("RUST_LOG", "info")],
            stderr_file,
            Duration::from_secs(60),
        );
        match launched {
            Ok(l) => Ok(Daemon {
                child: Some(l.child),
                url: format!("http://{}", l.addr),
                data_dir: data_dir.to_owned(),
                args,
                stderr_path,
            }),
            Err(storaged::testkit::LaunchError::Exited { code }) => Err(StartFailure {
                code,
                stderr: std::fs::read_to_string(&stderr_path).unwrap_or_default(),
            }),
            Err(e) => panic!(
                "{e}; stderr: {}",
                std::fs::read_to_string(&stderr_path).unwrap_or_default()
            ),
        }
    }

    /// `kill -9`: no chance to clean up.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().expect("SIGKILL");
            c.wait().expect("reap");
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: sending a signal to our own child's pid, which stays
            // valid until we reap it below.
            unsafe {
                libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Some(status) = c.try_wait().expect("try_wait") {
                    assert!(status.success(), "storaged exited with {status} on SIGTERM");
                    return;
                }
                if Instant::now() > deadline {
                    let _ = c.kill();
                    panic!("storaged did not exit within 30 s of SIGTERM");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Starts again with the same arguments (a new port).
    pub fn restart(&mut self) {
        self.stop();
        *self = Daemon::start_args(&self.data_dir.clone(), self.args.clone());
    }

    /// Starts again on the port it has now, so TCP clients find it again.
    pub fn restart_same_port(&mut self) {
        let addr = self.url.trim_start_matches("http://").to_owned();
        for (i, a) in self.args.iter_mut().enumerate() {
            if a == "127.0.0.1:0" && i > 0 {
                *a = addr.clone();
            }
        }
        self.restart();
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Runs `storagectl` against this daemon.
    pub fn ctl(&self, args: &[&str]) -> Output {
        Command::new(storagectl_bin())
            .arg("--server")
            .arg(&self.url)
            .args(args)
            .output()
            .expect("running storagectl")
    }

    /// Runs `storagectl`, asserting success; returns stdout.
    /// `storagectl status --json`, parsed.
    pub fn status_json(&self) -> serde_json::Value {
        let out = self.ctl_ok(&["status", "--json"]);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("status --json: {e}: {out}"))
    }

    pub fn ctl_ok(&self, args: &[&str]) -> String {
        let out = self.ctl(args);
        assert!(
            out.status.success(),
            "storagectl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 stdout")
    }

    pub async fn client(&self) -> storaged_client::Client {
        storaged_client::Client::connect(&self.url)
            .await
            .expect("connecting to storaged")
    }

    /// The daemon's Unix socket (the default, under its data dir).
    pub fn unix_url(&self) -> String {
        format!("unix://{}", self.data_dir.join("storaged.sock").display())
    }

    /// A client on the Unix socket: same host, memory regions available.
    pub async fn local_client(&self) -> storaged_client::Client {
        storaged_client::Client::connect(&self.unix_url())
            .await
            .expect("connecting to storaged's Unix socket")
    }

    /// Starts `storagectl` with `args` against the Unix socket, stdout
    /// piped, for tests that watch or kill it.
    pub fn spawn_local_ctl(&self, args: &[&str]) -> std::process::Child {
        Command::new(storagectl_bin())
            .arg("--server")
            .arg(self.unix_url())
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning storagectl")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Reads every object of `files` from dataset `ds` with `storagectl cat`
/// and checks it byte for byte.
pub fn check_all(d: &Daemon, ds: &str, files: &[(String, Vec<u8>)]) {
    for (p, data) in files {
        let out = d.ctl(&["cat", ds, p]);
        assert!(
            out.status.success(),
            "cat {ds}/{p}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.stdout == *data, "{ds}/{p}: bytes differ");
    }
}

/// Flips bits `mask` of the byte at `at` in file `path` (a device file,
/// behind storaged's back) and syncs it.
pub fn flip_byte(path: &Path, at: u64, mask: u8) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open device file");
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).expect("read the byte");
    b[0] ^= mask;
    f.write_all_at(&b, at).expect("write the byte");
    f.sync_all().expect("sync");
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce:
/// the one generator of `storaged::testkit`.
pub use storaged::testkit::pattern;

/// Objects of every size class the read paths treat differently: empty,
/// one byte, around a checksum block (32 KiB), a few blocks, a stripe unit
/// and more, a MiB and more, and several MiB; named `f0`..`f8`.
pub fn size_class_files() -> Vec<(String, Vec<u8>)> {
    [
        0,
        1,
        4095,
        32 * 1024 - 1,
        32 * 1024 + 1,
        100_000,
        65_536 * 3 + 7,
        (1 << 20) + 3,
        5 * (1 << 20) + 12_345,
    ]
    .into_iter()
    .enumerate()
    .map(|(i, len)| (format!("f{i}"), pattern(i as u64 + 1, len)))
    .collect()
}

/// A daemon (default options) with `files` ingested as dataset `name`,
/// a TCP handle on it, and the bytes each path must read back as.
pub async fn daemon_with_dataset(
    name: &str,
    files: Vec<(String, Vec<u8>)>,
) -> (
    tempfile::TempDir,
    Daemon,
    storaged_client::Dataset,
    std::sync::Arc<std::collections::BTreeMap<String, Vec<u8>>>,
) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = tmp.path().join("src");
    write_tree(&src, &files);
    let d = Daemon::start(&tmp.path().join("data"), &DaemonOpts::default());
    d.ctl_ok(&["ingest", name, src.to_str().expect("utf-8 path")]);
    let ds = d.client().await.dataset(name).expect("valid name");
    (tmp, d, ds, std::sync::Arc::new(files.into_iter().collect()))
}

pub fn write_tree(root: &Path, files: &[(String, Vec<u8>)]) {
    for (rel, data) in files {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(&p, data).expect("write file");
    }
}

/// Every regular file under `root`, relative path → bytes.
pub fn read_tree(root: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir") {
            let e = e.expect("entry");
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(root).unwrap().to_str().unwrap().to_owned();
                out.insert(rel, std::fs::read(&p).expect("read"));
            }
        }
    }
    out
}

/// Polls `f` until it returns true or `timeout` passes.
/// Resident memory of process `pid`, in bytes.
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc/<pid>/status");
    kib << 10
}

pub async fn eventually(timeout: Duration, mut f: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The seed of a randomized test: `$VAR` if set (to rerun a failure),
/// else from the clock. Printed, so a failing run names it.
pub fn test_seed(var: &str, what: &str) -> u64 {
    let seed = std::env::var(var)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64 % 1_000_000)
                .unwrap_or(1)
        });
    println!("{what} seed {seed} (rerun with {var}={seed})");
    seed
}

/// Messages of a raw Ingest stream, for tests that drive the protocol
/// directly (disconnects, crashes, protocol violations).
pub mod ingest_msg {
    use bytes::Bytes;
    use storaged_proto::pb::{self, ingest_request::Msg};

    fn wrap(m: Msg) -> pb::IngestRequest {
        pb::IngestRequest { msg: Some(m) }
    }

    pub fn begin(dataset: &str, storage_class: i32) -> pb::IngestRequest {
        wrap(Msg::Begin(pb::IngestBegin {
            dataset: dataset.into(),
            storage_class,
            ec_data_units: 0,
            ec_parity_units: 0,
            cluster_unit: false,
        }))
    }

    pub fn object(path: &str, size: u64) -> pb::IngestRequest {
        wrap(Msg::Object(pb::ObjectBegin {
            path: path.into(),
            size,
            crc32: None,
        }))
    }

    pub fn data(bytes: impl Into<Bytes>) -> pb::IngestRequest {
        wrap(Msg::Data(bytes.into()))
    }

    pub fn commit(object_count: u64, total_bytes: u64) -> pb::IngestRequest {
        wrap(Msg::Commit(pb::IngestCommit {
            object_count,
            total_bytes,
        }))
    }
}

/// An Ingest call left open: push messages with `tx`; `call` resolves when
/// the server answers.
pub struct OpenIngest {
    pub tx: tokio::sync::mpsc::Sender<storaged_proto::pb::IngestRequest>,
    pub call: tokio::task::JoinHandle<
        Result<tonic::Response<storaged_proto::pb::IngestResponse>, tonic::Status>,
    >,
}

impl OpenIngest {
    pub async fn start(client: &storaged_client::Client) -> OpenIngest {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mut rpc = client.raw();
        let call = tokio::spawn(async move {
            rpc.ingest(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
        });
        OpenIngest { tx, call }
    }

    pub async fn send(&self, msgs: Vec<storaged_proto::pb::IngestRequest>) {
        for m in msgs {
            self.tx.send(m).await.expect("ingest stream open");
        }
    }

    /// Ends the stream (without commit) and returns the server's answer.
    pub async fn close(
        self,
    ) -> Result<tonic::Response<storaged_proto::pb::IngestResponse>, tonic::Status> {
        drop(self.tx);
        self.call.await.expect("ingest task")
    }
}
