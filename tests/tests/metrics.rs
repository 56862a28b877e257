//! The Prometheus endpoint, end to end: the real daemon with `--metrics`,
//! its exposition checked by `promtool check metrics`, and a real
//! Prometheus (the Debian package, which the test command installs)
//! scraping it on loopback and seeing the counters move after reads.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use storaged_tests::{Daemon, DaemonOpts, pattern, write_tree};

/// A loopback port nobody listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET path` on `127.0.0.1:port`: (status code, body).
fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    // Prometheus answers chunked; storaged with a length. Undo chunking.
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut rest = body;
        while let Some((len, tail)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(len.trim(), 16).unwrap_or(0);
            if n == 0 || tail.len() < n {
                break;
            }
            out.push_str(&tail[..n]);
            rest = tail[n..].trim_start_matches("\r\n");
        }
        out
    } else {
        body.to_owned()
    };
    Ok((code, body))
}

/// The sum of every sample of `name` whose labels contain `labels`.
fn sample_sum(exposition: &str, name: &str, labels: &str) -> f64 {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|l| l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn tool(name: &str) -> String {
    let path = format!("/usr/bin/{name}");
    assert!(
        Path::new(&path).exists(),
        "{path} is missing: the test command installs the Debian `prometheus` package (bash tests/run.sh)"
    );
    path
}

/// A Prometheus server on loopback scraping `target` every second.
struct Prometheus {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(target: u16) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: storaged\n    static_configs:\n      - targets: ['127.0.0.1:{target}']\n"
            ),
        )
        .unwrap();
        let port = free_port();
        let child = Command::new(tool("prometheus"))
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("prometheus.log")).unwrap())
            .spawn()
            .expect("starting prometheus");
        Prometheus {
            child,
            port,
            _dir: dir,
        }
    }

    /// The value of an instant query that yields one number, if it does.
    fn query(&self, expr: &str) -> Option<f64> {
        let q: String = expr
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect();
        let (code, body) = http_get(self.port, &format!("/api/v1/query?query={q}")).ok()?;
        if code != 200 {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    }

    /// Waits until `expr` is at least `min`; the last value seen either way.
    fn wait_for(&self, expr: &str, min: f64) -> Option<f64> {
        let deadline = Instant::now() + Duration::from_secs(90);
        let mut last = None;
        while Instant::now() < deadline {
            last = self.query(expr);
            if last.is_some_and(|v| v >= min) {
                return last;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        last
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// Guards against a metrics endpoint that Prometheus cannot parse, whose
// counters do not move with the work done, or that lets a client invent
// label values: reads and a failed read show up in the exposition,
// promtool accepts it, and a real Prometheus scraping it sees device
// bytes and read calls grow.
#[test]
fn prometheus_scrapes_the_metrics_and_sees_reads() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let metrics_port = free_port();
    let opts = DaemonOpts {
        extra: vec!["--metrics".into(), format!("127.0.0.1:{metrics_port}")],
        ..DaemonOpts::default()
    };
    let d = Daemon::start(&data, &opts);
    let files: Vec<(String, Vec<u8>)> = (0..4)
        .map(|i| (format!("f{i}.bin"), pattern(i, 300_000 + i as usize * 1000)))
        .collect();
    let src = tmp.path().join("src");
    write_tree(&src, &files);
    d.ctl_ok(&["ingest", "ds", src.to_str().unwrap()]);

    let (code, before) = http_get(metrics_port, "/metrics").unwrap();
    assert_eq!(code, 200);
    let written = sample_sum(&before, "storaged_device_written_bytes_total", "");
    assert!(written >= 1_200_000.0, "device writes counted: {written}");
    assert_eq!(
        sample_sum(
            &before,
            "storaged_rpc_seconds_count",
            "method=\"Ingest\",code=\"OK\""
        ),
        1.0
    );

    for (path, bytes) in &files {
        let out = d.ctl(&["cat", "ds", path]);
        assert!(out.status.success() && out.stdout == *bytes);
    }
    assert!(!d.ctl(&["cat", "ds", "missing"]).status.success());
    let (_, after) = http_get(metrics_port, "/metrics").unwrap();
    let read = sample_sum(&after, "storaged_device_read_bytes_total", "");
    assert!(read >= 1_200_000.0, "device reads counted: {read}");
    assert!(sample_sum(&after, "storaged_device_io_seconds_count", "op=\"read\"") >= 4.0);
    assert!(
        sample_sum(
            &after,
            "storaged_rpc_seconds_count",
            "method=\"Read\",code=\"OK\""
        ) >= 4.0
    );
    assert!(
        sample_sum(&after, "storaged_rpc_seconds_count", "code=\"NOT_FOUND\"") >= 1.0,
        "failed calls counted by code"
    );
    assert!(sample_sum(&after, "storaged_grpc_served_bytes_total", "") >= 1_200_000.0);
    assert_eq!(sample_sum(&after, "storaged_datasets", ""), 1.0);
    assert_eq!(sample_sum(&after, "storaged_device_up", ""), 4.0);
    assert!(!after.contains("method=\"Nope\""));
    let (code, _) = http_get(metrics_port, "/other").unwrap();
    assert_eq!(code, 404);

    // promtool parses and lints the exposition.
    let mut check = Command::new(tool("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    check
        .stdin
        .take()
        .unwrap()
        .write_all(after.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // A real Prometheus scrapes it; its view moves with more reads.
    let prom = Prometheus::start(metrics_port);
    let seen = prom
        .wait_for("sum(storaged_device_read_bytes_total)", read)
        .expect("Prometheus scraped storaged");
    assert!(seen >= read, "{seen} < {read}");
    for (path, _) in &files {
        assert!(d.ctl(&["cat", "ds", path]).status.success());
    }
    let more = prom.wait_for("sum(storaged_device_read_bytes_total)", read + 1_200_000.0);
    assert!(
        more.is_some_and(|v| v >= read + 1_200_000.0),
        "Prometheus sees the new reads: {more:?} after {read}"
    );
    let calls = prom.wait_for(
        "sum(storaged_rpc_seconds_count{method=\"Read\",code=\"OK\"})",
        8.0,
    );
    assert!(calls.is_some_and(|v| v >= 8.0), "{calls:?}");
}

// Guards against RPCs that leave no trace: each runs in an `rpc` span that
// names its method, dataset and object, and ends with its bytes and code.
#[test]
fn every_rpc_is_traced_with_dataset_object_bytes_and_code() {
    use std::io::BufRead;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let stderr_path = tmp.path().join("stderr.log");
    let mut child = Command::new(storaged_tests::storaged_bin())
        .args(DaemonOpts::default().args(&data))
        .env("RUST_LOG", "info,storaged::metrics::rpc=debug")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    let url = format!(
        "http://{}",
        first
            .trim()
            .strip_prefix("storaged listening on ")
            .unwrap_or_else(|| panic!("{first:?}"))
    );
    let ctl = |args: &[&str]| {
        Command::new(storaged_tests::storagectl_bin())
            .arg("--server")
            .arg(&url)
            .args(args)
            .output()
            .unwrap()
    };
    let src = tmp.path().join("src");
    write_tree(&src, &[("a.bin".to_string(), pattern(7, 100_000))]);
    assert!(
        ctl(&["ingest", "ds", src.to_str().unwrap()])
            .status
            .success()
    );
    assert!(ctl(&["cat", "ds", "a.bin"]).status.success());
    assert!(!ctl(&["cat", "ds", "nope"]).status.success());
    let _ = child.kill();
    let _ = child.wait();
    let log = std::fs::read_to_string(&stderr_path).unwrap();
    let line = |needle: &str| {
        log.lines()
            .any(|l| l.contains(needle) && l.contains(" rpc "))
    };
    assert!(
        line("rpc{method=Read dataset=\"ds\" object=\"a.bin\" bytes=1000") && line("code=\"OK\""),
        "{log}"
    );
    assert!(
        line("rpc{method=Read dataset=\"ds\" object=\"nope\"") && line("code=\"NOT_FOUND\""),
        "{log}"
    );
    assert!(line("rpc{method=Ingest"), "{log}");
}
