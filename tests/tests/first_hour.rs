//! What a new user meets in the first hour (issue 13): each finding from
//! trying the README as a user, kept fixed. Large objects on every remote
//! read path, a port in use, a second daemon on one data dir, closed
//! pipes, https:// URLs, the Unix socket's access, error texts, and freed
//! space given back to the devices.

use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use storaged_proto::model::BATCH_ANY_ORDER_ITEM_BYTES_MAX;
use storaged_tests::{
    Daemon, DaemonOpts, eventually, pattern, storagectl_bin, storaged_bin, write_tree,
};

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `storagectl --server URL ARGS...`, run as this user.
fn ctl_at(url: &str, args: &[&str]) -> std::process::Output {
    Command::new(storagectl_bin())
        .args(["--server", url])
        .args(args)
        .output()
        .unwrap()
}

/// The same as user `nobody` (runuser; needs root).
fn ctl_as_nobody(url: &str, args: &[&str]) -> std::process::Output {
    Command::new("runuser")
        .args(["-u", "nobody", "--"])
        .arg(storagectl_bin())
        .args(["--server", url])
        .args(args)
        .output()
        .unwrap()
}

/// Whether the tests run as root (the other-user checks need runuser).
fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

// Guards against remote epochs (and verify) failing on datasets holding an
// object over the any-order batch item limit: the loader's gRPC path
// asked for every object in one any-order ReadBatch, which refuses such
// items with RESOURCE_EXHAUSTED.
#[test]
fn objects_over_the_any_order_limit_stream_on_every_grpc_path() {
    let tmp = tempfile::tempdir().unwrap();
    let big = (BATCH_ANY_ORDER_ITEM_BYTES_MAX + (3 << 20) + 17) as usize;
    let mut files = vec![("shards/000.tar".to_owned(), pattern(1, big))];
    for i in 0..20 {
        files.push((format!("small/{i:02}"), pattern(100 + i, 5000 + i as usize)));
    }
    write_tree(&tmp.path().join("src"), &files);
    let d = Daemon::start(
        &tmp.path().join("data"),
        &DaemonOpts {
            device_size: "128MiB".into(),
            ..DaemonOpts::default()
        },
    );
    d.ctl_ok(&["ingest", "shards", tmp.path().join("src").to_str().unwrap()]);
    // The README's remote command: every batch over TCP.
    let out = d.ctl_ok(&[
        "--transport",
        "as-given",
        "epoch",
        "shards",
        "--workers",
        "2",
        "--batch",
        "4",
    ]);
    assert!(out.contains("21 samples"), "{out}");
    assert!(out.contains("via shm 0"), "all over gRPC: {out}");
    let out = d.ctl_ok(&["--transport", "as-given", "verify", "shards"]);
    assert!(out.contains("21 objects"), "{out}");
}

// Guards against a port in use being found only after a new pool was
// formatted: nothing may be written before the listeners are bound.
#[test]
fn a_port_in_use_fails_before_anything_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let data = tmp.path().join("data");
    let out = Command::new(storaged_bin())
        .args(["serve", "--listen", &addr, "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr_of(&out);
    assert!(err.contains(&format!("cannot listen on {addr}")), "{err}");
    assert!(err.contains("pick another with --listen"), "{err}");
    assert!(
        !data.exists(),
        "the data dir was created: {:?}",
        std::fs::read_dir(&data).map(|d| d.count())
    );
}

// Guards against two daemons sharing one data dir: the second names the
// first (pid) instead of failing on the socket or the catalog.
#[test]
fn a_second_daemon_on_the_same_data_dir_names_the_owner() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let d = Daemon::start(&data, &DaemonOpts::default());
    let pid = d.child.as_ref().unwrap().id();
    let f = Daemon::try_start_args(&data, DaemonOpts::default().args(&data))
        .err()
        .expect("the second daemon must fail");
    assert!(
        f.stderr.contains(&format!(
            "another storaged owns {} (pid {pid})",
            data.display()
        )),
        "{}",
        f.stderr
    );
    // The first is unharmed.
    d.ctl_ok(&["status"]);
}

/// Runs storagectl with its stdout a pipe whose reader is already gone.
fn ctl_into_closed_pipe(d: &Daemon, args: &[&str]) -> std::process::Output {
    let mut child = Command::new(storagectl_bin())
        .arg("--server")
        .arg(&d.url)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let status = child.wait().unwrap();
    std::process::Output {
        status,
        stdout: Vec::new(),
        stderr: stderr.into_bytes(),
    }
}

// Guards against storagectl panicking ("failed printing to stdout: Broken
// pipe", exit 101) when its reader stops early (`| head`).
#[test]
fn a_closed_pipe_ends_storagectl_quietly() {
    let tmp = tempfile::tempdir().unwrap();
    write_tree(
        &tmp.path().join("src"),
        &[("a".to_owned(), vec![1; 10]), ("b".to_owned(), vec![2; 10])],
    );
    let d = Daemon::start(&tmp.path().join("data"), &DaemonOpts::default());
    d.ctl_ok(&["ingest", "ds", tmp.path().join("src").to_str().unwrap()]);
    for args in [
        &["ls"][..],
        &["ls", "ds"],
        &["stat", "ds", "a"],
        &["status"],
        &["cat", "ds", "a"],
    ] {
        let out = ctl_into_closed_pipe(&d, args);
        let err = stderr_of(&out);
        assert!(
            out.status.success() && err.is_empty(),
            "{args:?}: {:?} {err}",
            out.status
        );
    }
}

// Guards against https:// URLs being used as plaintext, and URLs without a
// scheme failing unclearly.
#[test]
fn urls_that_cannot_work_are_refused_with_the_fix() {
    for (url, says) in [
        (
            "https://127.0.0.1:7400",
            "https:// needs the CA certificate",
        ),
        ("127.0.0.1:7400", "add http:// to the URL"),
    ] {
        let out = ctl_at(url, &["ls"]);
        let err = stderr_of(&out);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains(says), "{url}: {err}");
    }
}

// Guards against storagectl calls without a deadline (a stuck server hung
// `status` forever) and against a deadline flag that takes anything.
#[test]
fn storagectl_calls_have_deadlines_and_the_flag_is_checked() {
    for (bad, says) in [
        ("soon", "expected a number"),
        ("30", "no unit"),
        ("5x", "unknown unit"),
        ("0s", "use 0 for no deadline"),
    ] {
        let out = ctl_at("http://127.0.0.1:1", &["--timeout", bad, "status"]);
        let err = stderr_of(&out);
        assert_eq!(out.status.code(), Some(2), "{bad}: {err}");
        assert!(err.contains(says), "{bad}: {err}");
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(&tmp.path().join("data"), &DaemonOpts::default());
    for ok in ["30s", "2m", "0", "1500ms"] {
        let out = d.ctl(&["--timeout", ok, "status"]);
        assert!(out.status.success(), "{ok}: {}", stderr_of(&out));
    }
    // A deadline too short for the call fails it, by code (scrubbing 8
    // MiB at the default 64 MiB/s takes over 100 ms).
    let src = tmp.path().join("src");
    write_tree(&src, &[("a".into(), pattern(2, 8 << 20))]);
    d.ctl_ok(&["ingest", "ds", src.to_str().unwrap()]);
    let out = d.ctl(&["--timeout", "20ms", "--transport", "as-given", "scrub"]);
    let err = stderr_of(&out);
    assert!(!out.status.success());
    assert!(err.contains("DEADLINE_EXCEEDED"), "{err}");
}

// Guards against connection errors repeating their causes and not saying
// what to check.
#[test]
fn an_unreachable_server_is_named_once_with_the_fix() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = ctl_at(&format!("http://127.0.0.1:{port}"), &["ls"]);
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("is storaged running at"), "{err}");
    assert!(err.contains("storaged serve"), "{err}");
    for part in ["transport error", "tcp connect error", "Connection refused"] {
        assert!(err.matches(part).count() <= 1, "{part} repeated: {err}");
    }
    assert_eq!(err.lines().count(), 1, "{err}");
}

// Guards against the error naming a range's end where the user gave an
// offset (`cat --offset 209715190 --length 100` said "209715290").
#[test]
fn out_of_range_names_what_was_asked() {
    let tmp = tempfile::tempdir().unwrap();
    write_tree(&tmp.path().join("src"), &[("a".to_owned(), vec![7; 1000])]);
    let d = Daemon::start(&tmp.path().join("data"), &DaemonOpts::default());
    d.ctl_ok(&["ingest", "ds", tmp.path().join("src").to_str().unwrap()]);
    let out = d.ctl(&["cat", "ds", "a", "--offset", "990", "--length", "100"]);
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1));
    assert!(err.contains("OUT_OF_RANGE"), "{err}");
    assert!(err.contains("offset 990 with length 100"), "{err}");
}

fn socket_mode(d: &Daemon) -> u32 {
    std::fs::metadata(d.data_dir.join("storaged.sock"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777
}

// Guards against the Unix socket's access being fixed (root-owned 0755:
// other users silently fell back to TCP, and `verify --via shm` then only
// said regions need a unix:// connection).
#[test]
fn unix_socket_access_is_configured_and_explained() {
    let tmp = tempfile::tempdir().unwrap();
    // Readable by the user the check runs as.
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    write_tree(&tmp.path().join("src"), &[("a".to_owned(), vec![7; 1000])]);
    let data = tmp.path().join("data");
    let mut d = Daemon::start(&data, &DaemonOpts::default());
    assert_eq!(socket_mode(&d), 0o660);
    d.ctl_ok(&["ingest", "ds", tmp.path().join("src").to_str().unwrap()]);
    let root = is_root();
    if root {
        let out = ctl_as_nobody(&d.url, &["verify", "ds", "--via", "shm"]);
        let err = stderr_of(&out);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains("may not use storaged's Unix socket"), "{err}");
        assert!(err.contains("unix_mode"), "{err}");
    } else {
        println!("not root: the other-user half of this test needs root (runuser)");
    }
    let config = tmp.path().join("open.toml");
    std::fs::write(&config, "unix_mode = \"0666\"\n").unwrap();
    d.stop();
    let mut args = DaemonOpts::default().args(&data);
    args.extend(["--config".to_owned(), config.display().to_string()]);
    let d2 = Daemon::start_args(&data, args);
    assert_eq!(socket_mode(&d2), 0o666);
    if root {
        let out = ctl_as_nobody(&d2.url, &["verify", "ds", "--via", "shm"]);
        assert!(out.status.success(), "{}", stderr_of(&out));
    }
}

/// Bytes the device files of `d` take on their file system.
fn allocated_bytes(dir: &Path) -> u64 {
    (0..4)
        .map(|i| {
            std::fs::metadata(dir.join(format!("dev{i}.img")))
                .unwrap()
                .blocks()
                * 512
        })
        .sum()
}

// Guards against deleted data never giving disk space back: the device
// files kept every block (each at its high-water mark). Also the switch
// (`discard = false`) and the start-up pass, which gives back what was
// freed while discards were off (or before a crash).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_gives_space_back_to_the_devices() {
    let tmp = tempfile::tempdir().unwrap();
    let files: Vec<(String, Vec<u8>)> = (0..8)
        .map(|i| (format!("f{i}"), pattern(i, 2 << 20)))
        .collect();
    write_tree(&tmp.path().join("src"), &files);
    let data = tmp.path().join("data");
    let off = tmp.path().join("off.toml");
    std::fs::write(&off, "discard = false\n").unwrap();
    let mut args = DaemonOpts::default().args(&data);
    args.extend(["--config".to_owned(), off.display().to_string()]);
    let mut d = Daemon::start_args(&data, args);
    let src = tmp.path().join("src");
    d.ctl_ok(&["ingest", "a", src.to_str().unwrap()]);
    let before_rm = allocated_bytes(&data);
    assert!(before_rm >= 16 << 20, "{before_rm}");
    d.ctl_ok(&["rm", "a", "--yes"]);
    let status = d.client().await.status().await.unwrap();
    assert!(!status.discard().enabled);
    assert!(d.ctl_ok(&["status"]).contains("discard:     off"));
    assert_eq!(allocated_bytes(&data), before_rm, "discard is off");

    // On (the default): the start-up pass gives the old space back.
    d.stop();
    let mut d = Daemon::start(&data, &DaemonOpts::default());
    let client = d.client().await;
    assert!(
        eventually(Duration::from_secs(60), async || {
            let s = client.status().await.unwrap();
            s.discard().startup_pass_done
        })
        .await
    );
    let s = client.status().await.unwrap();
    assert!(
        s.discard().enabled && s.discard().discarded_bytes >= 16 << 20,
        "{s:?}"
    );
    let after_pass = allocated_bytes(&data);
    assert!(
        after_pass + (15 << 20) <= before_rm,
        "{after_pass} vs {before_rm}"
    );

    // A delete while running: given back in the background, and a new
    // ingest meanwhile reads back intact.
    d.ctl_ok(&["ingest", "b", src.to_str().unwrap()]);
    let with_b = allocated_bytes(&data);
    d.ctl_ok(&["rm", "b", "--yes"]);
    d.ctl_ok(&["ingest", "c", src.to_str().unwrap()]);
    assert!(
        eventually(Duration::from_secs(60), async || {
            client.status().await.unwrap().discard().pending_bytes == 0
        })
        .await
    );
    let out = d.ctl_ok(&["verify", "c"]);
    assert!(out.contains("8 objects"), "{out}");
    d.ctl_ok(&["rm", "c", "--yes"]);
    assert!(
        eventually(Duration::from_secs(60), async || {
            client.status().await.unwrap().discard().pending_bytes == 0
                && allocated_bytes(&data) + (15 << 20) <= with_b
        })
        .await,
        "{} vs {with_b}",
        allocated_bytes(&data)
    );
    let out = d.ctl_ok(&["status"]);
    assert!(out.contains("discard:     on"), "{out}");
    d.stop();
}

// Guards against `device replace` leaving the old device file behind
// without a word about it.
#[test]
fn replacing_a_present_device_says_what_to_do_with_the_old_one() {
    let tmp = tempfile::tempdir().unwrap();
    write_tree(
        &tmp.path().join("src"),
        &[("a".to_owned(), pattern(3, 300_000))],
    );
    let d = Daemon::start(&tmp.path().join("data"), &DaemonOpts::default());
    d.ctl_ok(&["ingest", "ds", tmp.path().join("src").to_str().unwrap()]);
    let old = d.data_dir.join("dev3.img");
    let new = tmp.path().join("new3.img");
    let len = std::fs::metadata(&old).unwrap().len();
    std::fs::File::create(&new).unwrap().set_len(len).unwrap();
    // A present, healthy device is replaced only when asked explicitly.
    let out = d.ctl(&["device", "replace", "3", new.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--healthy"), "{err}");
    let out = d.ctl_ok(&["device", "replace", "3", "--healthy", new.to_str().unwrap()]);
    assert!(
        out.contains(&format!("{} is no longer part of the pool", old.display())),
        "{out}"
    );
    assert!(out.contains("remove it"), "{out}");
    assert!(old.exists());
    assert!(d.ctl_ok(&["verify", "ds"]).contains("1 objects"));
}

// Guards against `ls DATASET` printing no header, an empty directory
// becoming an empty dataset without a word, and a tree with an unreadable
// file having no way in but fixing the tree.
#[test]
fn ingest_warns_on_nothing_and_skips_unreadable_on_request() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let d = Daemon::start(&tmp.path().join("data"), &DaemonOpts::default());
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let out = d.ctl(&["ingest", "nothing", empty.to_str().unwrap()]);
    assert!(out.status.success());
    let err = stderr_of(&out);
    assert!(err.contains("holds no regular files"), "{err}");

    let src = tmp.path().join("src");
    write_tree(
        &src,
        &[
            ("ok/a".to_owned(), vec![1; 100]),
            ("ok/b".to_owned(), vec![2; 100]),
            ("secret/c".to_owned(), vec![3; 100]),
        ],
    );
    let listing = d.ctl_ok(&["ls", "nothing"]);
    assert_eq!(
        listing
            .lines()
            .next()
            .unwrap()
            .split_whitespace()
            .collect::<Vec<_>>(),
        ["SIZE", "CRC32", "PATH"]
    );
    if !is_root() {
        println!("not root: the unreadable-file half of this test needs root (runuser)");
        return;
    }
    std::fs::set_permissions(src.join("secret/c"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let as_nobody = |args: &[&str]| ctl_as_nobody(&d.url, args);
    let out = as_nobody(&["ingest", "strict", src.to_str().unwrap()]);
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("--skip-unreadable"), "{err}");
    let out = as_nobody(&[
        "ingest",
        "lenient",
        src.to_str().unwrap(),
        "--skip-unreadable",
    ]);
    let err = stderr_of(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("skipped unreadable") && err.contains("secret/c"),
        "{err}"
    );
    let listing = d.ctl_ok(&["ls", "lenient"]);
    assert_eq!(
        listing.lines().count(),
        1 + 2,
        "header and 2 objects: {listing}"
    );
}

/// Runs storagectl on a pseudo-terminal (`script`), with `input` typed.
fn ctl_on_a_terminal(d: &Daemon, args: &str, input: &str) -> std::process::Output {
    use std::io::Write;
    let command = format!("{} --server {} {args}", storagectl_bin().display(), d.url);
    // Nothing to type: stdin is /dev/null. A pipe closed at once made
    // script(1) lose the child's first output now and then under load.
    let mut child = Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .stdin(if input.is_empty() {
            Stdio::null()
        } else {
            Stdio::piped()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("script(1) from util-linux");
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input.as_bytes()).unwrap();
    }
    child.wait_with_output().unwrap()
}

// Guards against `rm` deleting a dataset at once on a terminal (it asks
// what would go; `n` keeps it, `y` deletes it) and against silent long
// commands: verify and export draw progress on a terminal.
#[test]
fn on_a_terminal_rm_asks_first_and_long_commands_show_progress() {
    let tmp = tempfile::tempdir().unwrap();
    write_tree(&tmp.path().join("src"), &[("a".to_owned(), vec![1; 10])]);
    let d = Daemon::start(&tmp.path().join("data"), &DaemonOpts::default());
    d.ctl_ok(&["ingest", "ds", tmp.path().join("src").to_str().unwrap()]);
    let out = ctl_on_a_terminal(&d, "rm ds", "n\n");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("delete dataset ds (1 objects"), "{text}");
    assert!(text.contains("not deleted"), "{text}");
    assert!(d.ctl_ok(&["ls"]).contains("ds"));
    // verify and export show progress on a terminal (and only there).
    let out = ctl_on_a_terminal(&d, "verify ds", "");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("verify pass 1 ["),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!d.ctl_ok(&["verify", "ds"]).contains("verify pass 1 ["));
    let target = tmp.path().join("out");
    let out = ctl_on_a_terminal(&d, &format!("export ds {}", target.display()), "");
    assert!(String::from_utf8_lossy(&out.stdout).contains("export ["));
    let out = ctl_on_a_terminal(&d, "rm ds", "y\n");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("deleted ds"), "{text}");
    assert!(!d.ctl_ok(&["ls"]).contains("ds "));
}
