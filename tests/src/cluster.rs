//! A cluster on one machine for the tests: a real etcd on loopback and
//! storaged nodes joining it, with short leases and sweeps so failures
//! show within seconds; and readers of `storagectl cluster status`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::etcd::Etcd;
use crate::{Daemon, DaemonOpts};

/// Short leases so a dead node is seen down within seconds. Rebalancing
/// off: tests that look at where shares are turn it on themselves.
pub const CONFIG: &str = "cluster_lease_ttl_s = 2\ncluster_request_timeout_s = 2\ncluster_sweep_interval_s = 1\ncluster_rebalance = false\n";

pub struct Cluster {
    pub etcd: Etcd,
    pub dir: tempfile::TempDir,
}

impl Cluster {
    pub fn start() -> Cluster {
        Self::start_with(CONFIG)
    }

    /// A cluster whose nodes read `config` (TOML) instead of [`CONFIG`].
    pub fn start_with(config: &str) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("node.toml"), config).expect("config");
        let etcd = Etcd::start(&dir.path().join("etcd"));
        Cluster { etcd, dir }
    }

    pub fn data_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `storaged serve` arguments of a node with its data in `data`.
    pub fn args(&self, data: &Path, extra: &[&str]) -> Vec<String> {
        let mut extra: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
        extra.extend([
            "--config".to_owned(),
            self.dir.path().join("node.toml").display().to_string(),
        ]);
        DaemonOpts {
            devices: 2,
            device_size: "32MiB".into(),
            extra,
            ..Default::default()
        }
        .args(data)
    }

    /// Starts nodes `ids`, in order.
    pub fn nodes(&self, ids: &[&str]) -> Vec<Daemon> {
        ids.iter().map(|id| self.node(id)).collect()
    }

    /// Starts node `id` (data dir named after it) in cluster `default`.
    pub fn node(&self, id: &str) -> Daemon {
        let data = self.data_dir(id);
        Daemon::start_args(
            &data,
            self.args(&data, &["--cluster", &self.etcd.url(), "--node-id", id]),
        )
    }
}

/// `storagectl cluster status --json` from `d`.
pub fn status(d: &Daemon) -> serde_json::Value {
    let out = d.ctl_ok(&["cluster", "status", "--json"]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("cluster status --json: {e}: {out}"))
}

/// Each node's state, by id.
pub fn states(s: &serde_json::Value) -> Vec<(String, String)> {
    s["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| {
            (
                n["node_id"].as_str().unwrap().to_owned(),
                n["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

pub fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
    p.iter()
        .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
        .collect()
}

/// Waits until `done` holds, for at most `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
