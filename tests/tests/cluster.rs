//! Cluster mode's membership against a real etcd on loopback: nodes join
//! and are seen by every node, one id belongs to one pool, a node of
//! another cluster is refused, a killed node goes down and rejoins, and
//! an etcd outage leaves reads running while the cluster RPCs answer
//! UNAVAILABLE.

use std::time::Duration;

use storaged_tests::cluster::{Cluster, pairs, states, status, wait_for};
use storaged_tests::etcd::Etcd;
use storaged_tests::{Daemon, DaemonOpts};

#[test]
fn nodes_join_and_every_node_sees_them_all() {
    let c = Cluster::start();
    let nodes = c.nodes(&["n1", "n2", "n3"]);
    let mut ids = Vec::new();
    for d in &nodes {
        let s = status(d);
        assert_eq!(
            states(&s),
            pairs(&[("n1", "up"), ("n2", "up"), ("n3", "up")])
        );
        assert_eq!(s["placement_epoch"], 3, "{s}");
        assert_eq!(s["placement_nodes"], serde_json::json!(["n1", "n2", "n3"]));
        ids.push(s["cluster_id"].as_str().unwrap().to_owned());
        // Each node advertises where it listens.
        let me = s["this_node"].as_str().unwrap();
        let row = s["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["node_id"] == me)
            .unwrap();
        assert_eq!(
            format!("http://{}", row["advertise"].as_str().unwrap()),
            d.url
        );
        assert!(row["capacity_bytes"].as_u64().unwrap() > 0);
        assert!(row["lease_ttl_s"].as_i64().unwrap() > 0);
    }
    assert!(ids.windows(2).all(|w| w[0] == w[1] && w[0].len() == 32));
    // The human form names every node.
    let text = nodes[0].ctl_ok(&["cluster", "status"]);
    for id in ["n1", "n2", "n3"] {
        assert!(text.contains(id), "{text}");
    }
    assert!(text.contains("placement epoch: 3"), "{text}");

    // A clean stop revokes the lease: down at once, still a member, and
    // the placement map keeps it (it has not left).
    let mut nodes = nodes;
    nodes[2].stop();
    let s = status(&nodes[0]);
    assert_eq!(
        states(&s),
        pairs(&[("n1", "up"), ("n2", "up"), ("n3", "down")])
    );
    assert_eq!(s["placement_epoch"], 3);
}

#[test]
fn two_nodes_cannot_share_an_id() {
    // Guards against a second pool joining under a live or a down node's
    // id, which would send the first one's reads to the wrong devices.
    let c = Cluster::start();
    let mut n1 = c.node("n1");
    let data = c.data_dir("impostor");
    let args = c.args(&data, &["--cluster", &c.etcd.url(), "--node-id", "n1"]);
    let refused = Daemon::try_start_args(&data, args.clone())
        .err()
        .expect("a second node with id n1 started");
    assert_eq!(refused.code, Some(1));
    assert!(
        refused.stderr.contains("two nodes cannot share an id")
            && refused.stderr.contains("live at"),
        "{}",
        refused.stderr
    );
    n1.stop();
    let refused = Daemon::try_start_args(&data, args)
        .err()
        .expect("a second node took the id of a down node");
    assert!(
        refused.stderr.contains("two nodes cannot share an id"),
        "{}",
        refused.stderr
    );
    // The id's own pool comes back under it.
    let n1 = Daemon::start_args(&n1.data_dir.clone(), n1.args.clone());
    assert_eq!(states(&status(&n1)), pairs(&[("n1", "up")]));
}

#[test]
fn a_node_of_another_cluster_or_under_another_id_is_refused() {
    // Guards against a wrong flag moving a pool into another cluster or
    // renaming it, and against a wiped etcd silently making a new cluster
    // around old data.
    let c = Cluster::start();
    let mut n1 = c.node("n1");
    n1.stop();
    let data = n1.data_dir.clone();
    let url = c.etcd.url();
    let refused = Daemon::try_start_args(
        &data,
        c.args(
            &data,
            &[
                "--cluster",
                &url,
                "--cluster-name",
                "other",
                "--node-id",
                "n1",
            ],
        ),
    )
    .err()
    .expect("a node of cluster default joined cluster other");
    assert!(
        refused
            .stderr
            .contains("a node of another cluster cannot join"),
        "{}",
        refused.stderr
    );
    let refused = Daemon::try_start_args(
        &data,
        c.args(&data, &["--cluster", &url, "--node-id", "n9"]),
    )
    .err()
    .expect("node n1's pool joined as n9");
    assert!(
        refused.stderr.contains("start it with --node-id n1"),
        "{}",
        refused.stderr
    );
    // A fresh etcd has no cluster "default": the node does not make one.
    let other = Etcd::start(&c.dir.path().join("etcd2"));
    let refused = Daemon::try_start_args(
        &data,
        c.args(&data, &["--cluster", &other.url(), "--node-id", "n1"]),
    )
    .err()
    .expect("a node joined an etcd without its cluster");
    assert!(
        refused.stderr.contains("etcd has no cluster \"default\""),
        "{}",
        refused.stderr
    );
    assert_eq!(
        other
            .ctl(&["get", "--prefix", "--keys-only", "/storaged/"])
            .trim(),
        "",
        "a refused node wrote to the control plane"
    );
    // With its own flags it comes back.
    let n1 = Daemon::start_args(&data, n1.args.clone());
    assert_eq!(states(&status(&n1)), pairs(&[("n1", "up")]));
}

#[test]
fn a_killed_node_goes_down_and_rejoins() {
    let c = Cluster::start();
    let n1 = c.node("n1");
    let mut n2 = c.node("n2");
    n2.kill9();
    // The lease (2 s) expires with nobody renewing it.
    wait_for("n2 to be seen down", Duration::from_secs(30), || {
        states(&status(&n1)) == pairs(&[("n1", "up"), ("n2", "down")])
    });
    let before = status(&n1);
    n2 = Daemon::start_args(&n2.data_dir.clone(), n2.args.clone());
    let after = status(&n1);
    assert_eq!(states(&after), pairs(&[("n1", "up"), ("n2", "up")]));
    assert_eq!(after["placement_epoch"], before["placement_epoch"]);
    // Killed and restarted before its old lease expired: the node takes
    // its liveness key back at once instead of being refused.
    n2.kill9();
    let n2 = Daemon::start_args(&n2.data_dir.clone(), n2.args.clone());
    assert_eq!(states(&status(&n2)), pairs(&[("n1", "up"), ("n2", "up")]));
    // And stays up past the old lease's expiry.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(states(&status(&n1)), pairs(&[("n1", "up"), ("n2", "up")]));
}

#[test]
fn with_etcd_down_the_node_serves_on_and_cluster_calls_are_unavailable() {
    // (Reads of cluster datasets during the outage: cluster_data.rs.)
    let mut c = Cluster::start();
    let n1 = c.node("n1");
    c.etcd.kill();
    let out = n1.ctl(&["cluster", "status"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("UNAVAILABLE") && err.contains("cannot be reached"),
        "{err}"
    );
    // The node serves on, across more than a lease's time.
    std::thread::sleep(Duration::from_secs(3));
    n1.ctl_ok(&["status"]);
    n1.ctl_ok(&["ls"]);

    c.etcd.restart();
    wait_for("n1 to be up again", Duration::from_secs(30), || {
        let out = n1.ctl(&["cluster", "status", "--json"]);
        out.status.success()
            && serde_json::from_slice::<serde_json::Value>(&out.stdout)
                .is_ok_and(|s| states(&s) == pairs(&[("n1", "up")]))
    });
}

#[test]
fn cluster_calls_on_a_single_node_say_it_is_not_in_a_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(&dir.path().join("d"), &DaemonOpts::default());
    let out = d.ctl(&["cluster", "status"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("FAILED_PRECONDITION") && err.contains("not in a cluster"),
        "{err}"
    );
}

#[test]
fn cluster_flags_are_checked_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d");
    for (extra, says) in [
        (vec!["--node-id", "n1"], "give --cluster"),
        (
            vec!["--cluster", "http://127.0.0.1:2379", "--node-id", "n1"],
            "etcd://",
        ),
        (
            vec!["--cluster", "etcd://127.0.0.1:2379"],
            "needs --node-id",
        ),
        (
            vec!["--cluster", "etcd://127.0.0.1:2379", "--node-id", "N/1"],
            "node id \"N/1\"",
        ),
        (
            vec![
                "--cluster",
                "etcd://127.0.0.1:2379",
                "--node-id",
                "n1",
                "--advertise",
                "nowhere",
            ],
            "HOST:PORT",
        ),
    ] {
        let args = DaemonOpts {
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
            ..Default::default()
        }
        .args(&data);
        let refused = Daemon::try_start_args(&data, args)
            .err()
            .unwrap_or_else(|| panic!("{extra:?} started"));
        assert_eq!(refused.code, Some(1), "{extra:?}");
        assert!(
            refused.stderr.contains(says),
            "{extra:?}: {}",
            refused.stderr
        );
    }
    // Nothing was formatted.
    assert!(!data.join("dev0.img").exists());
}

#[test]
fn an_unreachable_etcd_at_start_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("etcd://127.0.0.1:{port}");
    let args = DaemonOpts {
        extra: vec![
            "--cluster".into(),
            url.clone(),
            "--node-id".into(),
            "n1".into(),
        ],
        ..Default::default()
    }
    .args(&data);
    let refused = Daemon::try_start_args(&data, args)
        .err()
        .expect("started without its control plane");
    assert_eq!(refused.code, Some(1));
    assert!(
        refused.stderr.contains("cannot be reached") && refused.stderr.contains(&url),
        "{}",
        refused.stderr
    );
}
