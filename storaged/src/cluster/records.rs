//! What cluster mode keeps in the control plane, key by key (byte layout
//! in docs/FORMAT.md, "Cluster records in etcd"). Every value is a small
//! JSON object with a `format` number; every key is under
//! `/storaged/<cluster name>/`, so several clusters can share one etcd.
//!
//! Nothing here grows with objects or stripes: one key per cluster, one
//! per member, one liveness key per live node, one placement map.

use serde::{Deserialize, Serialize};

use super::control::{ControlError, Entry};

/// The format number every record is written with.
pub const RECORD_FORMAT: u32 = 1;

/// The longest cluster name or node id.
pub const NAME_BYTES_MAX: usize = 63;

/// Why a cluster name or node id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{what} {name:?} must be 1 to 63 characters of a-z, 0-9, '-' and '_', beginning with a letter or digit"
)]
pub struct BadName {
    pub what: &'static str,
    pub name: String,
}

/// Checks a cluster name or node id: it becomes part of etcd keys and of
/// messages, so only a small alphabet is allowed.
pub fn check_name(what: &'static str, name: &str) -> Result<(), BadName> {
    let ok = !name.is_empty()
        && name.len() <= NAME_BYTES_MAX
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(BadName {
            what,
            name: name.to_owned(),
        })
    }
}

/// Whether `s` is HOST:PORT with a port above 0 (an etcd endpoint, an
/// advertised address).
pub fn is_host_port(s: &str) -> bool {
    s.rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0))
        && !s.contains(['/', '@', '?', '#', ' '])
}

/// The keys of one cluster.
#[derive(Debug, Clone)]
pub struct Keys {
    root: String,
}

impl Keys {
    /// The keys of cluster `name` (already checked with [`check_name`]).
    pub fn new(name: &str) -> Self {
        Self {
            root: format!("/storaged/{name}/"),
        }
    }
    /// Every key of the cluster begins with this.
    pub fn root(&self) -> &str {
        &self.root
    }
    /// [`ClusterRecord`]: the cluster's identity.
    pub fn cluster(&self) -> String {
        format!("{}cluster", self.root)
    }
    /// [`MemberRecord`] of a node: it joined (kept while it is down).
    pub fn member(&self, node: &str) -> String {
        format!("{}{}", self.members(), node)
    }
    pub fn members(&self) -> String {
        format!("{}members/", self.root)
    }
    /// [`LiveRecord`] of a node, attached to its lease: it is up.
    pub fn live(&self, node: &str) -> String {
        format!("{}{}", self.lives(), node)
    }
    pub fn lives(&self) -> String {
        format!("{}live/", self.root)
    }
    /// [`Placement`]: the nodes new data may go to, and its epoch.
    pub fn placement(&self) -> String {
        format!("{}placement", self.root)
    }
    /// [`DatasetRecord`] of a committed cluster dataset.
    pub fn dataset(&self, name: &str) -> String {
        format!("{}{}", self.datasets(), name)
    }
    pub fn datasets(&self) -> String {
        format!("{}datasets/", self.root)
    }
    /// [`IngestIntent`] of an ingest under way, on its coordinator's lease.
    pub fn ingest(&self, unit: &str) -> String {
        format!("{}{}", self.ingests(), unit)
    }
    pub fn ingests(&self) -> String {
        format!("{}ingests/", self.root)
    }
    /// [`DownRecord`] of a member seen down (deleted once it is up).
    pub fn down(&self, node: &str) -> String {
        format!("{}{}", self.downs(), node)
    }
    pub fn downs(&self) -> String {
        format!("{}down/", self.root)
    }
    /// [`RepairLock`] of a down member being rebuilt elsewhere, on the
    /// repairing node's lease.
    pub fn repair(&self, node: &str) -> String {
        format!("{}repair/{}", self.root, node)
    }
}

/// `/storaged/<name>/cluster`: written once, by the first node to join.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterRecord {
    pub format: u32,
    /// 32 hex digits, random: two clusters of the same name (another
    /// etcd, or one wiped and remade) are told apart by it.
    pub cluster_id: String,
    pub created_unix_s: u64,
}

/// What a member is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberState {
    /// In the placement map: new data may go to it.
    Active,
    /// Out of the placement map; its shares are being moved elsewhere.
    Draining,
    /// Holds nothing and takes nothing: it may be stopped for good.
    Drained,
}

impl MemberState {
    pub fn name(self) -> &'static str {
        match self {
            MemberState::Active => "active",
            MemberState::Draining => "draining",
            MemberState::Drained => "drained",
        }
    }
}

/// `/storaged/<name>/members/<node>`: a node joined with this pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    pub format: u32,
    pub node_id: String,
    /// The node's device pool (its superblocks' id): the node id belongs
    /// to this pool and no other.
    pub pool_id: String,
    pub joined_unix_s: u64,
    pub state: MemberState,
    /// Drained by the cluster's own repair (it was down too long), not by
    /// an operator: it is taken back in when it returns.
    #[serde(default)]
    pub auto_drained: bool,
}

/// `/storaged/<name>/down/<node>`: since when a member has been seen down
/// (written once by the first node to see it, deleted when it is up).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DownRecord {
    pub format: u32,
    pub node_id: String,
    pub since_unix_s: u64,
}

/// `/storaged/<name>/repair/<node>`, on the repairing node's lease: one
/// node at a time rebuilds `node`'s shares.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepairLock {
    pub format: u32,
    pub node_id: String,
    pub repairer: String,
    pub started_unix_s: u64,
}

/// `/storaged/<name>/live/<node>`, attached to the node's lease: where to
/// reach it and what it holds. Gone when the node stops or its lease
/// expires.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveRecord {
    pub format: u32,
    pub node_id: String,
    pub pool_id: String,
    /// gRPC address clients and other nodes use.
    pub advertise: String,
    /// The TCP bulk channel's address, when it serves one.
    pub bulk_advertise: Option<String>,
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub started_unix_s: u64,
    /// When this record was last written.
    pub updated_unix_s: u64,
    /// storaged's version.
    pub version: String,
}

/// `/storaged/<name>/placement`: the members new data is placed on, in
/// placement order. The epoch grows by one at every change, so a layout
/// records the epoch it was computed under and a stale one is told apart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Placement {
    pub format: u32,
    pub epoch: u64,
    pub nodes: Vec<String>,
}

/// `/storaged/<name>/datasets/<dataset>`: a committed cluster dataset.
/// Written once, by the commit that makes it visible (the one commit
/// point of a cluster ingest); deleting it is what `rm` does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetRecord {
    pub format: u32,
    pub name: String,
    /// Data and parity shards per object.
    pub k: u32,
    pub m: u32,
    pub chunk_bytes: u64,
    /// The unit dataset every node of `nodes` keeps its shards in.
    pub unit: String,
    /// The nodes, in layout order (see `storaged_proto::cluster`).
    pub nodes: Vec<String>,
    /// The placement epoch the nodes were chosen under.
    pub placement_epoch: u64,
    pub object_count: u64,
    pub total_bytes: u64,
    pub created_unix_s: u64,
}

/// `/storaged/<name>/ingests/<unit>`: a cluster ingest under way,
/// attached to its coordinator's lease. Units of an ingest with neither
/// this nor a dataset record are orphans, and their nodes delete them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IngestIntent {
    pub format: u32,
    pub dataset: String,
    pub unit: String,
    pub nodes: Vec<String>,
    pub coordinator: String,
    pub started_unix_s: u64,
}

/// A record's JSON.
pub fn encode<T: Serialize>(record: &T) -> Vec<u8> {
    // Serializing plain structs of strings and numbers cannot fail.
    serde_json::to_vec(record).unwrap_or_default()
}

/// The record an entry holds; `Corrupt` names the key when it is not one
/// (or is of a format this storaged does not know).
pub fn decode<T: for<'de> Deserialize<'de> + HasFormat>(entry: &Entry) -> Result<T, ControlError> {
    let record: T = serde_json::from_slice(&entry.value).map_err(|e| ControlError::Corrupt {
        key: entry.key.clone(),
        why: e.to_string(),
    })?;
    if record.format() != RECORD_FORMAT {
        return Err(ControlError::Corrupt {
            key: entry.key.clone(),
            why: format!(
                "format {} (this storaged reads format {RECORD_FORMAT})",
                record.format()
            ),
        });
    }
    Ok(record)
}

/// Records carry their format number.
pub trait HasFormat {
    fn format(&self) -> u32;
}

macro_rules! has_format {
    ($($t:ty),*) => {$(
        impl HasFormat for $t {
            fn format(&self) -> u32 {
                self.format
            }
        }
    )*};
}
has_format!(
    ClusterRecord,
    MemberRecord,
    LiveRecord,
    Placement,
    DatasetRecord,
    IngestIntent,
    DownRecord,
    RepairLock
);

/// Seconds since the Unix epoch, now.
pub fn unix_now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_small_and_key_safe() {
        for good in ["n1", "a", "node-7_x", "0"] {
            check_name("node id", good).unwrap();
        }
        let long = "a".repeat(64);
        for bad in [
            "",
            "N1",
            "-a",
            "_a",
            "a/b",
            "a b",
            "é",
            "a.b",
            long.as_str(),
        ] {
            assert!(check_name("node id", bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn records_round_trip_and_refuse_other_formats() {
        let p = Placement {
            format: RECORD_FORMAT,
            epoch: 3,
            nodes: vec!["n1".into(), "n2".into()],
        };
        let entry = |value: Vec<u8>| Entry {
            key: "/storaged/c/placement".into(),
            value,
            create_revision: 1,
            mod_revision: 1,
            lease: None,
        };
        assert_eq!(decode::<Placement>(&entry(encode(&p))).unwrap(), p);
        let future = Placement { format: 2, ..p };
        assert!(matches!(
            decode::<Placement>(&entry(encode(&future))),
            Err(ControlError::Corrupt { .. })
        ));
        assert!(matches!(
            decode::<Placement>(&entry(b"{".to_vec())),
            Err(ControlError::Corrupt { .. })
        ));
    }
}
