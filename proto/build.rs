//! Compiles `proto/storaged/v1/*.proto` with protox (pure Rust, so no system
//! protoc is needed) and writes a file descriptor set for gRPC reflection;
//! with the `etcd` feature, also the client half of the trimmed etcd v3 API
//! in `proto/etcd` (the cluster control plane's wire protocol).

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/storaged/v1/storaged.proto"];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let file_descriptors = protox::compile(protos, ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptor_path = out_dir.join("storaged_descriptor.bin");
    std::fs::write(
        &descriptor_path,
        prost::Message::encode_to_vec(&file_descriptors),
    )?;
    // The status, as `storagectl status --json` prints it: the proto's
    // field names, the storage class by its name.
    let mut config = tonic_prost_build::configure();
    for message in [
        "StatusResponse",
        "DeviceStatus",
        "DatasetInfo",
        "RebuildStatus",
        "ReadStats",
        "ReadAheadStats",
        "RegionStats",
        "ScrubStats",
        "DiscardStats",
        "CatalogStatus",
        "ConnectionStats",
        "BufferStats",
        "FaultStats",
        "ClusterStatusResponse",
        "ClusterNode",
        "DatasetAtRisk",
    ] {
        config = config.type_attribute(
            format!("storaged.v1.{message}"),
            "#[derive(serde::Serialize)]",
        );
    }
    config
        .field_attribute(
            "storaged.v1.DatasetInfo.storage_class",
            "#[serde(serialize_with = \"crate::json::storage_class\")]",
        )
        .bytes(".")
        .skip_protoc_run()
        .file_descriptor_set_path(&descriptor_path)
        .compile_fds(file_descriptors)?;
    if std::env::var_os("CARGO_FEATURE_ETCD").is_some() {
        compile_etcd()?;
    }
    Ok(())
}

/// etcd's KV and Lease clients (no servers: storaged only talks to etcd).
fn compile_etcd() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/etcd/rpc.proto", "proto/etcd/kv.proto"];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let file_descriptors = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .build_server(false)
        .skip_protoc_run()
        .compile_fds(file_descriptors)?;
    Ok(())
}
