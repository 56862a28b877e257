//! nginx serving the same files from a plain directory, read over HTTP/1.1
//! with hyper at the same concurrency. nginx is configured to read cold, as
//! storaged does: `directio` (O_DIRECT for every file) with `aio threads`,
//! and `sendfile` on for anything directio does not cover.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::{Item, pipeline_latencies_us};
use crate::results::Measurement;
use crate::stats::{children, self_cpu_seconds, tree_cpu_seconds};

/// The nginx configuration the harness uses (also written to results.json).
pub fn config(prefix: &Path, root: &Path, port: u16) -> String {
    // nginx started as root runs its workers as `nobody`/`www-data`, who
    // cannot read a --out under a private directory (mode 0700, as
    // `mktemp -d` makes): every GET was 403. The workers then run as the
    // harness's own user, who wrote the files. (Without root, nginx never
    // switches users, and the directive would only draw a warning.)
    // SAFETY: geteuid has no preconditions.
    let user = if unsafe { libc::geteuid() } == 0 {
        "user root root;\n"
    } else {
        ""
    };
    format!(
        r#"{user}worker_processes 2;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    aio threads;
    directio 4k;
    directio_alignment 4k;
    output_buffers 2 1m;
    keepalive_requests 1000000;
    client_body_temp_path {prefix}/tmp;
    proxy_temp_path {prefix}/tmp;
    fastcgi_temp_path {prefix}/tmp;
    uwsgi_temp_path {prefix}/tmp;
    scgi_temp_path {prefix}/tmp;
    types {{ }}
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location / {{ }}
    }}
}}
"#,
        prefix = prefix.display(),
        root = root.display(),
    )
}

pub struct Nginx {
    child: Child,
    pub port: u16,
    pub command: String,
    pub config: String,
}

pub fn available() -> bool {
    Command::new("nginx")
        .arg("-v")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

impl Nginx {
    pub fn start(prefix: &Path, root: &Path) -> anyhow::Result<Nginx> {
        std::fs::create_dir_all(prefix.join("tmp"))?;
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let config = config(prefix, root, port);
        let conf_path: PathBuf = prefix.join("nginx.conf");
        std::fs::write(&conf_path, &config)?;
        let args = [
            "-p".to_owned(),
            prefix.display().to_string(),
            "-c".to_owned(),
            conf_path.display().to_string(),
        ];
        let child = Command::new("nginx")
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting nginx")?;
        let mut n = Nginx {
            child,
            port,
            command: format!("nginx {}", args.join(" ")),
            config,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = n.child.try_wait()? {
                bail!(
                    "nginx exited with {status}; see {}/error.log",
                    prefix.display()
                );
            }
            if Instant::now() > deadline {
                bail!("nginx did not listen on port {port}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(n)
    }

    pub fn cpu_seconds(&self) -> f64 {
        tree_cpu_seconds(self.child.id())
    }

    /// GETs every item (under URL directory `dir`) with `concurrency`
    /// requests in flight; whole bodies are received and counted, not copied.
    pub async fn get_items(
        &self,
        dir: &str,
        items: &[Item],
        concurrency: u32,
    ) -> anyhow::Result<Measurement> {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client: Client<HttpConnector, http_body_util::Empty<bytes::Bytes>> =
            Client::builder(TokioExecutor::new())
                .pool_max_idle_per_host(concurrency as usize)
                .build(connector);
        let client = Arc::new(client);
        let port = self.port;
        let (srv0, cli0, t0) = (self.cpu_seconds(), self_cpu_seconds(), Instant::now());
        let results: Vec<anyhow::Result<(u64, f64)>> = futures::stream::iter(items.iter().cloned())
            .map(|item| {
                let client = Arc::clone(&client);
                async move {
                    let uri: hyper::Uri =
                        format!("http://127.0.0.1:{port}/{dir}/{}", item.path).parse()?;
                    let resp = client.get(uri).await?;
                    if !resp.status().is_success() {
                        bail!("nginx answered {} for {}", resp.status(), item.path);
                    }
                    let mut body = resp.into_body();
                    let mut n = 0u64;
                    while let Some(frame) = body.frame().await {
                        if let Some(d) = frame?.data_ref() {
                            n += d.len() as u64;
                        }
                    }
                    if n != item.size {
                        bail!("{}: got {n} of {} bytes", item.path, item.size);
                    }
                    Ok((n, t0.elapsed().as_secs_f64() * 1e6))
                }
            })
            .buffered(concurrency as usize)
            .collect()
            .await;
        let seconds = t0.elapsed().as_secs_f64();
        let mut bytes = 0;
        let mut done_at = Vec::with_capacity(results.len());
        for r in results {
            let (n, t) = r?;
            bytes += n;
            done_at.push(t);
        }
        Ok(Measurement {
            bytes,
            samples: items.len() as u64,
            seconds,
            latencies_us: pipeline_latencies_us(&done_at, concurrency as usize),
            cpu_s_server: Some(self.cpu_seconds() - srv0),
            cpu_s_client: Some(self_cpu_seconds() - cli0),
            ..Default::default()
        })
    }
}

impl Drop for Nginx {
    /// SIGTERM first: the master stops its workers and exits. A SIGKILL of
    /// the master alone would orphan the workers, which then keep running
    /// (and listening) after the harness is gone.
    fn drop(&mut self) {
        let master = self.child.id();
        let workers = children(master);
        // SAFETY: kill(2) on our own child's pid, which `self.child` has not
        // reaped yet, so the pid cannot have been reused.
        unsafe { libc::kill(master as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        for worker in workers {
            if Path::new(&format!("/proc/{worker}")).exists() {
                // SAFETY: a best-effort kill of a worker that outlived its
                // master; the /proc check narrows pid reuse to a race the
                // harness accepts at exit.
                unsafe { libc::kill(worker as libc::pid_t, libc::SIGKILL) };
            }
        }
    }
}
