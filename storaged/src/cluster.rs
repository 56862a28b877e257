//! Cluster mode: many storaged nodes as one system, with etcd as the
//! control plane (`storaged serve --cluster etcd://...`).
//!
//! The control plane holds only what is small and changes rarely: the
//! cluster's identity, its members and their pools, which nodes are live
//! (leased keys), and the placement map with its epoch. Data and object
//! metadata stay on the nodes, and the data path runs directly between
//! clients and nodes. `control` is the store seen through a trait, `etcd`
//! its implementation, `records` the keys and values, `binding` the data
//! dir's record of which cluster a pool joined, `member` a node's join,
//! heartbeat, leave and view of the cluster, `ingest` a cluster ingest
//! coordinated by one node, `registry` the cluster's datasets as a node
//! serves them (with its cache for control-plane outages) and the sweep
//! of orphaned units, `peer` how a node calls the others (TLS, token),
//! `repair` the rebuild of a member down too long. ARCHITECTURE.md ("Cluster
//! mode") draws it.

pub mod binding;
pub mod control;
pub mod drain;
pub mod etcd;
pub mod ingest;
pub mod member;
pub mod peer;
pub mod records;
pub mod registry;
pub mod repair;

pub use control::{ControlError, ControlPlane};
pub use etcd::EtcdControl;
pub use member::{ClusterView, JoinError, Member, MemberConfig, NodeView};
