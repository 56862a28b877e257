//! Cluster datasets on four nodes and a real etcd: ingest `ec:2+1`
//! through one node and read it back through another, byte for byte;
//! lose a node in the middle of an epoch and lose no sample; kill the
//! coordinator of an ingest at random points and find nothing partial
//! visible and every node's space accounted; stop etcd and read on.

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use storaged_client::Client;
use storaged_client::cluster::ClusterDataset;
use storaged_tests::cluster::{Cluster, pairs, states, status, wait_for};
use storaged_tests::{Daemon, read_tree, storagectl_bin, test_seed, write_tree};

/// Files of every shape a layout has edges at: empty, one byte, around
/// one chunk (1 MiB), several stripes, and many small samples.
fn tree(seed: u64, small: usize) -> Vec<(String, Vec<u8>)> {
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut bytes = |n: usize| (0..n).map(|_| next() as u8).collect::<Vec<u8>>();
    let mut files = vec![
        ("empty".to_owned(), Vec::new()),
        ("one".to_owned(), bytes(1)),
        ("chunk".to_owned(), bytes(1 << 20)),
        ("two-chunks-and-one".to_owned(), bytes((2 << 20) + 1)),
        ("stripes/five".to_owned(), bytes((5 << 20) + 12345)),
    ];
    for i in 0..small {
        let n = 1000 + (i * 7919) % 60_000;
        files.push((format!("train/{:05}.jpg", i), bytes(n)));
    }
    files
}

/// [`tree`] written under the cluster's dir: (files, where).
fn source(c: &Cluster, small: usize) -> (Vec<(String, Vec<u8>)>, std::path::PathBuf) {
    let src = c.data_dir("src");
    let files = tree(test_seed("STORAGED_CLUSTER_SEED", "tree"), small);
    write_tree(&src, &files);
    (files, src)
}

fn map(files: &[(String, Vec<u8>)]) -> BTreeMap<String, Vec<u8>> {
    files.iter().cloned().collect()
}

/// `storagectl ARGS` against `d`; (success, stdout, stderr).
fn ctl(d: &Daemon, args: &[&str]) -> (bool, String, String) {
    let out = d.ctl(args);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The dataset's record in etcd.
fn record(c: &Cluster, name: &str) -> serde_json::Value {
    let out = c.etcd.ctl(&[
        "get",
        "--print-value-only",
        &format!("/storaged/default/datasets/{name}"),
    ]);
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("record of {name}: {e}: {out}"))
}

/// Every committed dataset's unit, from etcd.
fn committed_units(c: &Cluster) -> BTreeSet<String> {
    let out = c.etcd.ctl(&[
        "get",
        "--prefix",
        "--print-value-only",
        "/storaged/default/datasets/",
    ]);
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("dataset record");
            v["unit"].as_str().unwrap().to_owned()
        })
        .collect()
}

/// A node's local datasets (its units among them), and whether its
/// space is all accounted: used bytes = what its datasets hold, and no
/// ingest open.
fn local_units(d: &Daemon) -> (BTreeSet<String>, bool) {
    let s = d.status_json();
    let datasets = s["datasets"].as_array().cloned().unwrap_or_default();
    let names = datasets
        .iter()
        .map(|d| d["name"].as_str().unwrap().to_owned())
        .filter(|n| n.starts_with("cluster."))
        .collect();
    let held: u64 = datasets
        .iter()
        .map(|d| d["allocated_bytes"].as_u64().unwrap_or(0))
        .sum();
    let accounted = s["used_bytes"].as_u64() == Some(held)
        && s["ingests_in_progress"].as_u64().unwrap_or(0) == 0;
    (names, accounted)
}

#[test]
fn ingest_through_one_node_reads_back_identically_through_another() {
    let c = Cluster::start();
    let nodes = c.nodes(&["n1", "n2", "n3", "n4"]);
    let (files, src) = source(&c, 60);
    let src_s = src.to_str().unwrap();
    let out = nodes[0].ctl_ok(&["ingest", "--class", "ec:2+1", "imagenet", src_s]);
    assert!(out.contains("class ec:2+1"), "{out}");
    let r = record(&c, "imagenet");
    assert_eq!(r["k"], 2);
    assert_eq!(r["m"], 1);
    assert_eq!(r["nodes"].as_array().unwrap().len(), 3);
    // Every node lists it; the shares themselves are not listed.
    for d in &nodes {
        let ls = d.ctl_ok(&["ls"]);
        assert!(ls.contains("imagenet") && ls.contains("ec:2+1"), "{ls}");
        assert!(!ls.contains("cluster."), "{ls}");
    }
    // Export through another node: byte-identical.
    let out_dir = c.data_dir("export");
    nodes[2].ctl_ok(&["export", "imagenet", out_dir.to_str().unwrap()]);
    assert_eq!(read_tree(&out_dir), map(&files));
    let ls = nodes[1].ctl_ok(&["ls", "imagenet", "--prefix", "stripes/"]);
    let five = &map(&files)["stripes/five"];
    assert!(
        ls.contains(&format!(
            "{:>12}  {:08x}  stripes/five",
            five.len(),
            crc32fast::hash(five)
        )),
        "{ls}"
    );
    assert_eq!(ls.lines().count(), 2, "{ls}");
    let cat = nodes[3].ctl(&["cat", "imagenet", "stripes/five"]);
    assert!(cat.status.success());
    assert_eq!(cat.stdout, map(&files)["stripes/five"]);
    let part = nodes[3].ctl(&[
        "cat", "imagenet", "chunk", "--offset", "100", "--length", "7",
    ]);
    assert_eq!(part.stdout, map(&files)["chunk"][100..107]);

    // What cannot be made is refused, naming why; nothing is left.
    let (ok, _, err) = ctl(
        &nodes[1],
        &["ingest", "--class", "ec:2+1", "imagenet", src_s],
    );
    assert!(!ok && err.contains("ALREADY_EXISTS"), "{err}");
    let (ok, _, err) = ctl(&nodes[1], &["ingest", "--class", "stripe", "other", src_s]);
    assert!(!ok && err.contains("ec:K+M"), "{err}");
    let (ok, _, err) = ctl(&nodes[1], &["ingest", "--class", "ec:4+1", "other", src_s]);
    assert!(
        !ok && err.contains("FAILED_PRECONDITION") && err.contains("needs 5 nodes"),
        "{err}"
    );
    let (ok, _, err) = ctl(&nodes[1], &["ingest", "cluster.x", src_s]);
    assert!(!ok && err.contains("INVALID_ARGUMENT"), "{err}");

    // rm through any node: gone everywhere, and every node's share freed.
    nodes[1].ctl_ok(&["rm", "imagenet", "--yes"]);
    for d in &nodes {
        assert!(!d.ctl_ok(&["ls"]).contains("imagenet"));
    }
    for d in &nodes {
        wait_for(
            "every share of a removed dataset to be freed",
            Duration::from_secs(30),
            || {
                let (units, accounted) = local_units(d);
                units.is_empty() && accounted && d.status_json()["used_bytes"] == 0
            },
        );
    }
}

#[test]
fn a_node_killed_during_an_epoch_loses_no_sample() {
    let c = Cluster::start();
    let mut nodes = c.nodes(&["n1", "n2", "n3", "n4"]);
    let (files, src) = source(&c, 300);
    nodes[0].ctl_ok(&[
        "ingest",
        "--class",
        "ec:2+1",
        "samples",
        src.to_str().unwrap(),
    ]);
    let want = map(&files);
    let victim = record(&c, "samples")["nodes"][1]
        .as_str()
        .unwrap()
        .to_owned();
    let victim_index: usize = victim[1..].parse::<usize>().unwrap() - 1;

    let rt = tokio::runtime::Runtime::new().unwrap();
    let (read, degraded) = rt.block_on(async {
        // Opened through a node that is not the victim; reads then go to
        // the dataset's nodes directly.
        let via = if victim_index == 3 { 0 } else { 3 };
        let client = Client::connect(&nodes[via].url).await.unwrap();
        let ds = ClusterDataset::open(&client, "samples").await.unwrap();
        // A shuffled epoch, 8 samples in flight, like a DataLoader.
        let mut order: Vec<String> = ds.objects().iter().map(|o| o.path.clone()).collect();
        let seed = test_seed("STORAGED_CLUSTER_SEED", "epoch order");
        order.sort_by_key(|p| crc32fast::hash(format!("{seed}{p}").as_bytes()));
        let mut read: BTreeMap<String, usize> = BTreeMap::new();
        for (i, batch) in order.chunks(8).enumerate() {
            if i == order.len() / 16 {
                nodes[victim_index].kill9();
            }
            let got = futures::future::join_all(batch.iter().map(|p| ds.read(p))).await;
            for (p, bytes) in batch.iter().zip(got) {
                let bytes = bytes.unwrap_or_else(|e| panic!("{p}: {e}"));
                assert_eq!(bytes.as_ref(), want[p].as_slice(), "{p}");
                *read.entry(p.clone()).or_default() += 1;
            }
        }
        (read, ds.degraded_reads())
    });
    assert_eq!(read.len(), want.len());
    assert!(read.values().all(|&n| n == 1), "a sample came twice");
    assert!(degraded > 0, "no read needed parity after {victim} died");
    // Status names the dataset at risk, readable from parity, and how
    // long the victim has been down (the repair's own record of it).
    let via = if victim_index == 3 { 0 } else { 3 };
    wait_for(
        "status to show the dataset at risk",
        Duration::from_secs(30),
        || {
            let s = status(&nodes[via]);
            let down_since = s["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|n| n["node_id"] == victim.as_str())
                .and_then(|n| n["down_since_unix_s"].as_u64())
                .unwrap_or(0);
            s["at_risk"]
                == serde_json::json!([{"name": "samples", "ec_data_units": 2,
                "ec_parity_units": 1, "nodes_down": [victim.clone()], "readable": true}])
                && down_since > 0
        },
    );
    let text = nodes[via].ctl_ok(&["cluster", "status"]);
    assert!(
        text.contains("datasets at risk:") && text.contains("yes, from parity"),
        "{text}"
    );
    assert!(
        text.contains("down ") && text.contains("is rebuilt on other nodes"),
        "{text}"
    );

    // The victim comes back and rejoins.
    let d = &nodes[victim_index];
    nodes[victim_index] = Daemon::start_args(&d.data_dir.clone(), d.args.clone());
    wait_for("the victim to be up", Duration::from_secs(30), || {
        states(&status(&nodes[0]))
            == pairs(&[("n1", "up"), ("n2", "up"), ("n3", "up"), ("n4", "up")])
    });
    let out_dir = c.data_dir("export");
    nodes[victim_index].ctl_ok(&["export", "samples", out_dir.to_str().unwrap()]);
    assert_eq!(read_tree(&out_dir), want);
}

#[test]
fn a_coordinator_killed_anywhere_leaves_nothing_partial_and_no_space_lost() {
    // Guards against a cluster ingest whose coordinator dies leaving a
    // dataset visible without all its shares, or shares nobody frees.
    let c = Cluster::start();
    let mut nodes = c.nodes(&["n1", "n2", "n3", "n4"]);
    let (files, src) = source(&c, 40);
    let want = map(&files);
    let src_s = src.to_str().unwrap().to_owned();
    let started = Instant::now();
    nodes[0].ctl_ok(&["ingest", "--class", "ec:2+1", "reference", &src_s]);
    let ingest_ms = started.elapsed().as_millis() as u64;
    let mut x = test_seed("STORAGED_CLUSTER_KILL_SEED", "kill points") | 1;
    let mut committed = 0;
    for i in 0..20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let delay_ms = x % (ingest_ms * 3 / 2 + 1);
        let name = format!("ds{i}");
        let mut child = Command::new(storagectl_bin())
            .args([
                "--server",
                &nodes[0].url,
                "ingest",
                "--class",
                "ec:2+1",
                &name,
                &src_s,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        nodes[0].kill9();
        let _ = child.wait();
        // Nothing partial: the dataset is either absent or whole.
        let ls = nodes[1].ctl_ok(&["ls"]);
        if ls.contains(&name) {
            committed += 1;
            let out_dir = c.data_dir(&format!("export-{i}"));
            nodes[2].ctl_ok(&["export", &name, out_dir.to_str().unwrap()]);
            assert_eq!(
                read_tree(&out_dir),
                want,
                "{name} (killed after {delay_ms} ms)"
            );
        }
        let d = &nodes[0];
        nodes[0] = Daemon::start_args(&d.data_dir.clone(), d.args.clone());
    }
    println!("{committed} of 20 ingests committed before the kill");
    // Every node's shares are those of committed datasets, and its space
    // is all theirs, once the sweeps have run.
    let units = committed_units(&c);
    for d in &nodes {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (local, accounted) = local_units(d);
            if accounted && local.is_subset(&units) {
                break;
            }
            if Instant::now() >= deadline {
                let log: Vec<String> = d
                    .stderr()
                    .lines()
                    .filter(|l| !l.contains("INFO storaged::service::caller"))
                    .map(str::to_owned)
                    .collect();
                panic!(
                    "{}: shares {local:?} (committed: {units:?}), space accounted: {accounted}; status: {}; log:\n{}",
                    d.url,
                    d.status_json(),
                    log.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[test]
fn with_etcd_down_known_datasets_read_on_and_changes_are_unavailable() {
    let mut c = Cluster::start();
    let nodes = c.nodes(&["n1", "n2", "n3"]);
    let (files, src) = source(&c, 20);
    let src_s = src.to_str().unwrap();
    nodes[0].ctl_ok(&["ingest", "--class", "ec:2+1", "ds", src_s]);
    // Read once through n2, so it has the layout.
    let out_dir = c.data_dir("before");
    nodes[1].ctl_ok(&["export", "ds", out_dir.to_str().unwrap()]);

    c.etcd.kill();
    let out_dir = c.data_dir("during");
    nodes[1].ctl_ok(&["export", "ds", out_dir.to_str().unwrap()]);
    assert_eq!(read_tree(&out_dir), map(&files));
    let (ok, _, err) = ctl(&nodes[2], &["ingest", "--class", "ec:2+1", "new", src_s]);
    assert!(
        !ok && err.contains("UNAVAILABLE") && err.contains("cannot be reached"),
        "{err}"
    );
    let (ok, _, err) = ctl(&nodes[2], &["rm", "ds", "--yes"]);
    assert!(!ok && err.contains("UNAVAILABLE"), "{err}");

    c.etcd.restart();
    wait_for("ingest to work again", Duration::from_secs(30), || {
        ctl(&nodes[2], &["ingest", "--class", "ec:2+1", "new", src_s]).0
    });
    let out_dir = c.data_dir("after");
    nodes[0].ctl_ok(&["export", "new", out_dir.to_str().unwrap()]);
    assert_eq!(read_tree(&out_dir), map(&files));
}

#[test]
fn a_node_drained_under_reads_leaves_nothing_behind_and_a_new_node_takes_data() {
    let c = Cluster::start();
    let nodes = c.nodes(&["n1", "n2", "n3", "n4"]);
    let (files, src) = source(&c, 200);
    let src_s = src.to_str().unwrap();
    nodes[0].ctl_ok(&["ingest", "--class", "ec:2+1", "ds", src_s]);
    let victim = record(&c, "ds")["nodes"][0].as_str().unwrap().to_owned();
    let v: usize = victim[1..].parse::<usize>().unwrap() - 1;
    let reader_at = (v + 1) % 4;

    // Epochs run the whole time; every object is checked against its
    // CRC-32 as it is read, so an epoch that ends well read it all right.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let stop = std::sync::Arc::clone(&stop);
        let url = nodes[reader_at].url.clone();
        std::thread::spawn(move || {
            let mut epochs = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let out = Command::new(storagectl_bin())
                    .args([
                        "--server",
                        &url,
                        "epoch",
                        "ds",
                        "--workers",
                        "2",
                        "--batch",
                        "8",
                    ])
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "an epoch failed during the drain: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                epochs += 1;
            }
            epochs
        })
    };
    let out = nodes[(v + 2) % 4].ctl_ok(&["cluster", "drain", &victim]);
    assert!(out.contains("1 dataset share(s) moved"), "{out}");
    let r = record(&c, "ds");
    let now: Vec<&str> = r["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    assert!(!now.contains(&victim.as_str()) && now.len() == 3, "{r}");
    let s = status(&nodes[0]);
    assert!(
        !s["placement_nodes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n == victim.as_str())
    );
    let row = s["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node_id"] == victim.as_str())
        .unwrap()
        .clone();
    assert_eq!(row["member_state"], "drained", "{s}");
    // The drained node's share is freed by its sweep.
    wait_for(
        "the drained node to hold nothing",
        Duration::from_secs(30),
        || {
            let (units, accounted) = local_units(&nodes[v]);
            units.is_empty() && accounted
        },
    );
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let epochs = reader.join().expect("reader");
    assert!(epochs >= 1);

    // It can go: the dataset reads whole without it and without parity.
    let mut nodes = nodes;
    nodes[v].kill9();
    let out = nodes[reader_at].ctl_ok(&["epoch", "ds", "--workers", "2"]);
    assert!(out.contains(", 0 reads rebuilt from parity"), "{out}");
    let out_dir = c.data_dir("export");
    nodes[reader_at].ctl_ok(&["export", "ds", out_dir.to_str().unwrap()]);
    assert_eq!(read_tree(&out_dir), map(&files));

    // A node that joins takes new data: ec:3+1 needs four nodes up and
    // placed, which only n5 makes.
    let (ok, _, err) = ctl(&nodes[0], &["ingest", "--class", "ec:3+1", "wide", src_s]);
    assert!(!ok && err.contains("needs 4 nodes"), "{err}");
    let n5 = c.node("n5");
    nodes[0].ctl_ok(&["ingest", "--class", "ec:3+1", "wide", src_s]);
    let r = record(&c, "wide");
    assert!(
        r["nodes"].as_array().unwrap().iter().any(|n| n == "n5"),
        "{r}"
    );
    let out_dir = c.data_dir("export-wide");
    n5.ctl_ok(&["export", "wide", out_dir.to_str().unwrap()]);
    assert_eq!(read_tree(&out_dir), map(&files));

    let (ok, _, err) = ctl(&nodes[0], &["cluster", "drain", "n9"]);
    assert!(!ok && err.contains("NOT_FOUND"), "{err}");
}

#[test]
fn an_ingest_onto_a_node_drained_meanwhile_is_refused_at_commit() {
    // Guards against a stale placement: an ingest that chose a node which
    // was drained before the ingest committed would record a dataset with
    // a share on a node that then says it holds nothing and leaves.
    use storaged_tests::{OpenIngest, ingest_msg};
    let c = Cluster::start();
    let nodes = c.nodes(&["n1", "n2", "n3", "n4"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = rt.block_on(Client::connect(&nodes[0].url)).unwrap();
    let ingest = rt.block_on(OpenIngest::start(&client));
    let mut begin = ingest_msg::begin("late", storaged_proto::pb::StorageClass::Ec as i32);
    if let Some(storaged_proto::pb::ingest_request::Msg::Begin(b)) = &mut begin.msg {
        b.ec_data_units = 2;
        b.ec_parity_units = 1;
    }
    let data = vec![7u8; 300_000];
    rt.block_on(ingest.send(vec![
        begin,
        ingest_msg::object("a", data.len() as u64),
        ingest_msg::data(data.clone()),
    ]));
    // The ingest's intent names its nodes; drain one of them.
    let mut chosen = String::new();
    wait_for("the ingest's intent", Duration::from_secs(30), || {
        let out = c.etcd.ctl(&[
            "get",
            "--prefix",
            "--print-value-only",
            "/storaged/default/ingests/",
        ]);
        match out.lines().find(|l| !l.trim().is_empty()) {
            Some(l) => {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                chosen = v["nodes"][0].as_str().unwrap().to_owned();
                true
            }
            None => false,
        }
    });
    let drained = nodes.iter().find(|d| d.url != nodes[0].url).unwrap();
    drained.ctl_ok(&["cluster", "drain", &chosen]);
    rt.block_on(ingest.send(vec![ingest_msg::commit(1, data.len() as u64)]));
    let answer = rt.block_on(ingest.close());
    let status = answer.expect_err("an ingest onto a drained node committed");
    assert_eq!(status.code(), tonic::Code::Aborted, "{status:?}");
    assert!(
        status.message().contains("placement changed") && status.message().contains(&chosen),
        "{status:?}"
    );
    assert!(!nodes[1].ctl_ok(&["ls"]).contains("late"));
    // Its shares are swept everywhere.
    for d in &nodes {
        wait_for(
            "the refused ingest's shares to be swept",
            Duration::from_secs(30),
            || {
                let (units, accounted) = local_units(d);
                units.is_empty() && accounted
            },
        );
    }
}

#[test]
fn a_dead_nodes_shares_are_rebuilt_elsewhere_by_a_drain() {
    let c = Cluster::start();
    let mut nodes = c.nodes(&["n1", "n2", "n3", "n4"]);
    let (files, src) = source(&c, 50);
    nodes[0].ctl_ok(&["ingest", "--class", "ec:2+1", "ds", src.to_str().unwrap()]);
    let victim = record(&c, "ds")["nodes"][1].as_str().unwrap().to_owned();
    let v: usize = victim[1..].parse::<usize>().unwrap() - 1;
    let other = (v + 1) % 4;
    nodes[v].kill9();
    wait_for(
        "the dead node to be seen down",
        Duration::from_secs(30),
        || {
            states(&status(&nodes[other]))
                .iter()
                .any(|(id, state)| id == &victim && state == "down")
        },
    );
    let out = nodes[other].ctl_ok(&["cluster", "drain", &victim]);
    assert!(out.contains("1 dataset share(s) moved"), "{out}");
    let r = record(&c, "ds");
    assert!(
        !r["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n == victim.as_str()),
        "{r}"
    );
    // Redundancy is back: every node of the dataset is up, nothing is
    // read from parity, and the bytes are the same.
    let out = nodes[other].ctl_ok(&["epoch", "ds", "--workers", "2"]);
    assert!(out.contains(", 0 reads rebuilt from parity"), "{out}");
    let out_dir = c.data_dir("export");
    nodes[other].ctl_ok(&["export", "ds", out_dir.to_str().unwrap()]);
    assert_eq!(read_tree(&out_dir), map(&files));
    // The dead node comes back holding a share nobody names: swept.
    let d = &nodes[v];
    nodes[v] = Daemon::start_args(&d.data_dir.clone(), d.args.clone());
    wait_for(
        "the returned node's stale share to be swept",
        Duration::from_secs(30),
        || {
            let (units, accounted) = local_units(&nodes[v]);
            units.is_empty() && accounted
        },
    );
}

#[test]
fn a_node_that_hangs_costs_reads_a_timeout_not_a_hang() {
    // Guards against reads of a node that accepts connections but never
    // answers (stopped, or cut off without a reset) waiting forever.
    let c = Cluster::start();
    let nodes = c.nodes(&["n1", "n2", "n3", "n4"]);
    let (files, src) = source(&c, 40);
    nodes[0].ctl_ok(&["ingest", "--class", "ec:2+1", "ds", src.to_str().unwrap()]);
    let want = map(&files);
    let victim = record(&c, "ds")["nodes"][0].as_str().unwrap().to_owned();
    let v: usize = victim[1..].parse::<usize>().unwrap() - 1;
    let pid = nodes[v].child.as_ref().unwrap().id() as libc::pid_t;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let via = (v + 1) % 4;
    let started = rt.block_on(async {
        let client = Client::connect(&nodes[via].url).await.unwrap();
        let ds = ClusterDataset::open(&client, "ds").await.unwrap();
        // SAFETY: signalling our own child, which we reap later.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
        let started = Instant::now();
        for o in ds.objects().to_vec() {
            let bytes = ds
                .read(&o.path)
                .await
                .unwrap_or_else(|e| panic!("{}: {e}", o.path));
            assert_eq!(bytes.as_ref(), want[&o.path].as_slice(), "{}", o.path);
        }
        assert!(ds.degraded_reads() > 0);
        started
    });
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(60),
        "reads took {took:?} with a hung node"
    );
}

#[test]
fn an_ingest_onto_a_node_that_hangs_fails_and_leaves_no_intent() {
    // Guards against a cluster ingest waiting forever on a node that
    // accepts connections but never answers, and against a failed start
    // leaving its intent in etcd for as long as the coordinator lives.
    // Long leases: the stopped node must still look up when chosen.
    let c = Cluster::start_with(
        "cluster_lease_ttl_s = 60\ncluster_request_timeout_s = 2\ncluster_sweep_interval_s = 1\ncluster_rebalance = false\n",
    );
    let nodes = c.nodes(&["n1", "n2", "n3", "n4"]);
    let (_files, src) = source(&c, 10);
    let pid = nodes[3].child.as_ref().unwrap().id() as libc::pid_t;
    // SAFETY: signalling our own child, which we reap later.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let started = Instant::now();
    // ec:3+1 over four nodes must use the stopped one.
    let (ok, _, err) = ctl(
        &nodes[0],
        &["ingest", "--class", "ec:3+1", "ds", src.to_str().unwrap()],
    );
    let took = started.elapsed();
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    assert!(
        !ok && err.contains("UNAVAILABLE") && err.contains("n4"),
        "{err}"
    );
    assert!(took < Duration::from_secs(90), "the ingest took {took:?}");
    assert_eq!(
        c.etcd
            .ctl(&[
                "get",
                "--prefix",
                "--keys-only",
                "/storaged/default/ingests/"
            ])
            .trim(),
        "",
        "a failed ingest left its intent"
    );
    assert!(!nodes[1].ctl_ok(&["ls"]).contains("ds"));
}

#[test]
fn two_nodes_lost_of_ec_2_plus_2_rebuild_from_both_parities() {
    // Guards the client's batched rebuild: with two of four nodes dead a
    // stripe may lack both data chunks (rebuilt from its two parity
    // chunks) or one (rebuilt from one parity chunk and the data chunk
    // that came); every byte must come back, whole objects and ranges.
    let c = Cluster::start();
    let mut nodes = c.nodes(&["n1", "n2", "n3", "n4"]);
    let (files, src) = source(&c, 40);
    nodes[0].ctl_ok(&[
        "ingest",
        "--class",
        "ec:2+2",
        "imagenet",
        src.to_str().unwrap(),
    ]);
    let mut n4 = nodes.pop().unwrap();
    let mut n3 = nodes.pop().unwrap();
    n4.kill9();
    n3.kill9();
    let out_dir = c.data_dir("export");
    nodes[1].ctl_ok(&["export", "imagenet", out_dir.to_str().unwrap()]);
    assert_eq!(read_tree(&out_dir), map(&files));
    let five = &map(&files)["stripes/five"];
    let part = nodes[0].ctl(&[
        "cat",
        "imagenet",
        "stripes/five",
        "--offset",
        "2097000",
        "--length",
        "3000000",
    ]);
    assert!(
        part.status.success(),
        "{}",
        String::from_utf8_lossy(&part.stderr)
    );
    assert_eq!(part.stdout, five[2_097_000..5_097_000]);
}

#[test]
fn a_member_down_too_long_is_rebuilt_elsewhere_and_taken_back_when_it_returns() {
    // Guards against a cluster left one failure from loss after a node
    // dies and nobody drains it: past cluster_rebuild_after_s its shares
    // are rebuilt on another node, so a second node lost later still
    // loses nothing; and the first, when it returns, is placed again.
    let c = Cluster::start_with(&format!(
        "{}cluster_rebuild_after_s = 3\n",
        storaged_tests::cluster::CONFIG
    ));
    let ids = ["n1", "n2", "n3", "n4"];
    let mut nodes: Vec<Option<Daemon>> = c.nodes(&ids).into_iter().map(Some).collect();
    // n1 stays up throughout: the one the test reads through.
    let n1 = nodes[0].take().unwrap();
    let (files, src) = source(&c, 30);
    n1.ctl_ok(&[
        "ingest",
        "--class",
        "ec:2+1",
        "imagenet",
        src.to_str().unwrap(),
    ]);
    let held = |c: &Cluster| -> Vec<String> {
        record(c, "imagenet")["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_str().unwrap().to_owned())
            .collect()
    };
    // One of the other holders dies.
    let victim = held(&c).into_iter().find(|n| n != "n1").unwrap();
    let at = ids.iter().position(|n| *n == victim).unwrap();
    nodes[at].take().unwrap().kill9();
    wait_for(
        "the victim's share rebuilt elsewhere",
        Duration::from_secs(60),
        || !held(&c).contains(&victim),
    );
    let member_state = |d: &Daemon, id: &str| -> String {
        status(d)["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["node_id"] == id)
            .map(|n| n["member_state"].as_str().unwrap_or("").to_owned())
            .unwrap_or_default()
    };
    wait_for("the victim drained", Duration::from_secs(30), || {
        member_state(&n1, &victim) == "drained"
    });

    // A second holder dies: with the first rebuilt, nothing is lost.
    let second = held(&c).into_iter().find(|n| n != "n1").unwrap();
    let at2 = ids.iter().position(|n| *n == second).unwrap();
    nodes[at2].take().unwrap().kill9();
    let out_dir = c.data_dir("export");
    n1.ctl_ok(&["export", "imagenet", out_dir.to_str().unwrap()]);
    assert_eq!(read_tree(&out_dir), map(&files));

    // The first victim returns: active and in the placement map again.
    let _back = c.node(&victim);
    wait_for(
        "the victim active and placed",
        Duration::from_secs(30),
        || {
            let s = status(&n1);
            let placed = s["placement_nodes"]
                .as_array()
                .is_some_and(|p| p.iter().any(|n| n == victim.as_str()));
            placed && member_state(&n1, &victim) == "active"
        },
    );
}

#[test]
fn a_node_that_joins_is_filled_by_rebalancing() {
    // Guards against a joined node that only ever takes new datasets
    // while the old nodes stay full: with cluster_rebalance the cluster
    // moves shares onto it, one at a time, until the nodes hold the same,
    // and every byte still reads back identically.
    let c = Cluster::start_with(
        &storaged_tests::cluster::CONFIG
            .replace("cluster_rebalance = false", "cluster_rebalance = true"),
    );
    let n1 = c.node("n1");
    let _n2 = c.node("n2");
    let (files, src) = source(&c, 20);
    let names = ["a", "b", "c"];
    for name in names {
        n1.ctl_ok(&["ingest", "--class", "ec:1+1", name, src.to_str().unwrap()]);
    }
    let held = |id: &str| {
        names
            .iter()
            .filter(|n| {
                record(&c, n)["nodes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|x| x == id)
            })
            .count()
    };
    assert_eq!((held("n1"), held("n2")), (3, 3));
    let n3 = c.node("n3");
    wait_for(
        "the shares evened out onto n3",
        Duration::from_secs(60),
        || (held("n1"), held("n2"), held("n3")) == (2, 2, 2),
    );
    for name in names {
        let out_dir = c.data_dir(&format!("export-{name}"));
        n3.ctl_ok(&["export", name, out_dir.to_str().unwrap()]);
        assert_eq!(read_tree(&out_dir), map(&files), "{name}");
    }
    // Even: three repair passes (one a second) go by without a move.
    let before: Vec<serde_json::Value> = names
        .iter()
        .map(|n| record(&c, n)["nodes"].clone())
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    let after: Vec<serde_json::Value> = names
        .iter()
        .map(|n| record(&c, n)["nodes"].clone())
        .collect();
    assert_eq!(before, after, "a balanced cluster moves nothing");
}
