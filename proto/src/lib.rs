//! The wire protocol of storaged, shared by the daemon and every client.
//!
//! `pb` holds the code prost and tonic generate from `proto/storaged/v1`, with
//! every `bytes` field as `bytes::Bytes` so decoding a payload does not copy
//! it. `model` holds the validated domain types the server works with: a
//! request is converted with `TryFrom` once, at the edge, and everything past
//! that point can rely on names and ranges being well formed.

pub mod auth;
pub mod bulk;
pub mod cluster;
pub mod json;
pub mod model;
pub mod status;

/// Generated protobuf and gRPC code for package `storaged.v1`.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("storaged.v1");
}

/// Generated clients of etcd's v3 API (the subset in `proto/etcd`), for
/// the cluster control plane. Only with the `etcd` feature.
#[cfg(feature = "etcd")]
#[allow(clippy::all, missing_docs)]
pub mod etcd {
    pub mod mvccpb {
        tonic::include_proto!("mvccpb");
    }
    pub mod etcdserverpb {
        tonic::include_proto!("etcdserverpb");
    }
}

/// Encoded `FileDescriptorSet` of the storaged protos, for gRPC reflection.
pub mod http2;

pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("storaged_descriptor");

pub use model::{DatasetName, NameError, ObjectPath};
