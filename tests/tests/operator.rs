//! What an operator installs and runs: the systemd unit (it verifies, and
//! storaged tells systemd when it is ready and when it stops), the
//! effective configuration (`--print-config`), and a clear error when the
//! metrics port is taken.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use storaged_tests::{Daemon, DaemonOpts, storaged_bin};

fn repo_file(rel: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

/// Reads notifications until one contains `want` (fails after 60 s).
fn wait_notification(sock: &UnixDatagram, want: &str) -> String {
    sock.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = sock
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no {want} notification ({e}); seen: {seen:?}"));
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        if msg.lines().any(|l| l == want) {
            return msg;
        }
        seen.push_str(&msg);
        seen.push('\n');
    }
}

// Guards against a Type=notify unit that never becomes active (storaged
// not saying READY=1 once it listens) or whose stop systemd cannot tell
// from a crash.
#[test]
fn storaged_tells_systemd_when_it_is_ready_and_when_it_stops() {
    let tmp = tempfile::tempdir().unwrap();
    let sock_path = tmp.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    let data = tmp.path().join("data");
    let mut child = Command::new(storaged_bin())
        .args(DaemonOpts::default().args(&data))
        .env("NOTIFY_SOCKET", &sock_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let ready = wait_notification(&sock, "READY=1");
    assert!(ready.contains("STATUS=serving on 127.0.0.1:"), "{ready}");
    // SAFETY: kill(2) on the pid of a child this test spawned and has not
    // reaped; no memory is passed.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0);
    wait_notification(&sock, "STOPPING=1");
    assert!(child.wait().unwrap().success(), "a clean stop exits 0");
}

// Guards against an example unit that systemd would refuse (a typo in a
// directive, a bad value).
#[test]
fn the_systemd_unit_verifies() {
    let analyze = "/usr/bin/systemd-analyze";
    assert!(
        Path::new(analyze).exists(),
        "{analyze} is missing: the test command installs it (bash tests/run.sh)"
    );
    let unit = std::fs::read_to_string(repo_file("tools/systemd/storaged.service")).unwrap();
    // Verify against the binary just built (the unit names its installed
    // path, which this machine does not have).
    let unit = unit.replace("/usr/local/bin/storaged", storaged_bin().to_str().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("storaged.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new(analyze)
        .args(["verify", path.to_str().unwrap()])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let complaints: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("storaged.service"))
        .collect();
    assert!(
        out.status.success() && complaints.is_empty(),
        "systemd-analyze verify: {text}"
    );
}

// Guards against --print-config that touches the pool, or that shows
// something other than what the flags and file give.
#[test]
fn print_config_shows_the_configuration_and_touches_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("never-created");
    let out = Command::new(storaged_bin())
        .args([
            "serve",
            "--config",
            repo_file("tools/storaged.toml").to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
            "--listen",
            "127.0.0.1:7999",
            "--print-config",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("listen = \"127.0.0.1:7999\""), "{text}");
    assert!(
        text.contains(&format!("data_dir = \"{}\"", data.display())),
        "{text}"
    );
    assert!(text.contains("buffer_pool = \"256MiB\""), "{text}");
    assert!(
        !data.exists(),
        "--print-config must not create the data dir"
    );
}

// Guards against a metrics port in use being found only after the pool
// was opened (or not at all): the start fails at once, naming it.
#[test]
fn a_taken_metrics_port_fails_the_start_naming_it() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let opts = DaemonOpts {
        extra: vec!["--metrics".into(), addr.to_string()],
        ..DaemonOpts::default()
    };
    let failure = match Daemon::try_start_args(&data, opts.args(&data)) {
        Ok(_) => panic!("started with its metrics port taken"),
        Err(f) => f,
    };
    assert_eq!(failure.code, Some(1));
    assert!(
        failure
            .stderr
            .contains(&format!("cannot listen for metrics on {addr}")),
        "{}",
        failure.stderr
    );
    assert!(
        !data.join("dev0.img").exists(),
        "nothing written before the ports are ours"
    );
}
