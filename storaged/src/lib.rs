//! storaged: a striped storage pool on local devices, served over gRPC.
//!
//! The crate is layered bottom-up: `buf` (aligned, pre-allocated I/O
//! buffers) → `engine` (io_uring or pread threads that own the device files)
//! → `device` (superblocks, pool assembly) and `layout` (logical address →
//! device and offset) → `alloc` and `catalog` (what is stored where, durably)
//! → `store` (ingest sessions and verified reads) → `service` (tonic), `wire`
//! (zero-copy framing of the read responses) and `server` (limits, health, reflection, shutdown). ARCHITECTURE.md draws it.
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod ahead;
pub mod alloc;
pub mod audit;
pub mod auth;
pub mod budget;
pub mod buf;
pub mod catalog;
pub mod cluster;
pub mod config;
pub mod conn;
pub mod crash;
pub mod deadline;
pub mod device;
pub mod dirlock;
pub mod ec;
pub mod engine;
pub mod error;
pub mod jwt;
pub mod layout;
pub mod metrics;
pub mod poolmeta;
pub mod recover;
pub mod region;
pub mod server;
pub mod service;
pub mod size;
pub mod store;
pub mod testkit;
pub mod tls;
pub mod verified;
pub mod wire;
