//! The gRPC code of every error the layers below return: the one place
//! where errors become statuses. The store and the regions know nothing of
//! gRPC; their errors are structured, and this maps them.

use tonic::{Code, Status};

use crate::catalog::CatalogError;
use crate::error::{AdminError, IngestError, ReadError, RemoveError, StoreError};
use crate::region::RegionError;

/// An error's gRPC code, and the status it is answered with.
pub trait GrpcCode: std::fmt::Display {
    fn code(&self) -> Code;

    fn to_status(&self) -> Status {
        Status::new(self.code(), self.to_string())
    }
}

impl GrpcCode for ReadError {
    fn code(&self) -> Code {
        match self {
            ReadError::InvalidName(_)
            | ReadError::PageTooLarge { .. }
            | ReadError::RegionOffsetUnaligned { .. } => Code::InvalidArgument,
            ReadError::DatasetNotFound(_)
            | ReadError::DatasetReplaced { .. }
            | ReadError::ObjectNotFound { .. } => Code::NotFound,
            ReadError::OutOfRange { .. } | ReadError::RegionBounds { .. } => Code::OutOfRange,
            ReadError::Store(e) => e.code(),
        }
    }
}

impl GrpcCode for RemoveError {
    fn code(&self) -> Code {
        match self {
            RemoveError::DatasetNotFound(_) => Code::NotFound,
            RemoveError::Store(e) => e.code(),
        }
    }
}

impl GrpcCode for StoreError {
    fn code(&self) -> Code {
        match self {
            StoreError::TaskFailed { .. } => Code::Internal,
            StoreError::NoSpace { .. }
            | StoreError::DeviceFull { .. }
            | StoreError::Limit { .. }
            | StoreError::Buffers(_) => Code::ResourceExhausted,
            StoreError::Checksum { .. } => Code::DataLoss,
            StoreError::DeviceMissing { .. } => Code::Unavailable,
            StoreError::Unrecoverable { missing: true, .. } => Code::Unavailable,
            StoreError::Unrecoverable { missing: false, .. } => Code::DataLoss,
            StoreError::Io { .. } | StoreError::ShuttingDown => Code::Unavailable,
            StoreError::Sync { .. } => Code::Internal,
            StoreError::PoolMeta(crate::poolmeta::PoolMetaError::RootFull { .. }) => {
                Code::ResourceExhausted
            }
            StoreError::PoolMeta(crate::poolmeta::PoolMetaError::Io { .. }) => Code::Unavailable,
            StoreError::PoolMeta(_) => Code::Internal,
            StoreError::Catalog(CatalogError::DatasetExists(_)) => Code::AlreadyExists,
            StoreError::Catalog(CatalogError::Full { .. }) => Code::ResourceExhausted,
            StoreError::Catalog(CatalogError::Failing { .. }) => Code::Unavailable,
            StoreError::Catalog(_) => Code::Internal,
        }
    }
}

impl GrpcCode for AdminError {
    fn code(&self) -> Code {
        match self {
            AdminError::DatasetNotFound(_) => Code::NotFound,
            AdminError::ScrubRunning
            | AdminError::ReplaceRunning
            | AdminError::OtherReplacePending { .. }
            | AdminError::DeviceHealthy(_)
            | AdminError::NewDevice(_)
            | AdminError::NewDeviceEngine(_) => Code::FailedPrecondition,
            AdminError::NoSuchIndex { .. }
            | AdminError::NoSuchDevice(_)
            | AdminError::RelativePath(_)
            | AdminError::AlreadyInPool { .. } => Code::InvalidArgument,
            AdminError::Store(e) => e.code(),
        }
    }
}

impl GrpcCode for IngestError {
    fn code(&self) -> Code {
        match self {
            IngestError::Degraded { .. } => Code::FailedPrecondition,
            IngestError::Class(_)
            | IngestError::TreeConflict { .. }
            | IngestError::ObjectIncomplete { .. }
            | IngestError::DataOutsideObject
            | IngestError::TooMuchData { .. }
            | IngestError::CrcMismatch { .. }
            | IngestError::CommitWhileOpen { .. }
            | IngestError::CommitMismatch { .. } => Code::InvalidArgument,
            IngestError::DatasetExists(_)
            | IngestError::InProgress(_)
            | IngestError::DuplicateObject { .. } => Code::AlreadyExists,
            IngestError::Quota(_) => Code::ResourceExhausted,
            IngestError::TaskFailed(_) => Code::Internal,
            IngestError::Store(e) => e.code(),
        }
    }
}

/// `?` from an operation's error to the status it is answered with.
macro_rules! status_from {
    ($($error:ty),*) => {
        $(impl From<$error> for Status {
            fn from(e: $error) -> Self {
                e.to_status()
            }
        })*
    };
}

status_from!(IngestError, StoreError, ReadError, RemoveError);

impl GrpcCode for RegionError {
    fn code(&self) -> Code {
        match self {
            RegionError::NotLocal | RegionError::NoPeerPid => Code::FailedPrecondition,
            RegionError::ByPath | RegionError::NotSealed { .. } => Code::InvalidArgument,
            RegionError::Open { source, .. } => match source.kind() {
                std::io::ErrorKind::NotFound => Code::NotFound,
                std::io::ErrorKind::PermissionDenied => Code::PermissionDenied,
                _ => Code::InvalidArgument,
            },
            RegionError::NotOwner { .. } => Code::PermissionDenied,
            RegionError::NotTmpfs { .. }
            | RegionError::BadSize { .. }
            | RegionError::SizeMismatch { .. } => Code::InvalidArgument,
            RegionError::Map { .. } => Code::Internal,
            RegionError::Limit(_) => Code::ResourceExhausted,
            RegionError::NotFound { .. } => Code::NotFound,
        }
    }
}

impl From<RegionError> for Status {
    fn from(e: RegionError) -> Self {
        let mut status = Status::new(e.code(), e.to_string());
        if let RegionError::NotFound { id } = e
            && let Ok(v) = format!("{id:x}").parse()
        {
            status
                .metadata_mut()
                .insert(storaged_proto::model::REGION_UNKNOWN_METADATA_KEY, v);
        }
        status
    }
}

impl GrpcCode for crate::cluster::ControlError {
    fn code(&self) -> Code {
        use crate::cluster::ControlError;
        match self {
            ControlError::Unreachable { .. } => Code::Unavailable,
            ControlError::Refused { .. } | ControlError::Corrupt { .. } => Code::Internal,
        }
    }
}

impl GrpcCode for crate::cluster::ingest::ClusterIngestError {
    fn code(&self) -> Code {
        use crate::cluster::ingest::ClusterIngestError as E;
        match self {
            E::Control(e) => e.code(),
            E::Exists(_) => Code::AlreadyExists,
            E::NotEnoughNodes { .. } => Code::FailedPrecondition,
            E::Class(_) | E::Input(_) => Code::InvalidArgument,
            E::Node { .. } => Code::Unavailable,
            E::IntentLost(_) | E::PlacementChanged { .. } => Code::Aborted,
            E::ManifestTooLarge => Code::ResourceExhausted,
        }
    }
}

impl GrpcCode for crate::cluster::registry::RegistryError {
    fn code(&self) -> Code {
        use crate::cluster::registry::RegistryError as E;
        match self {
            E::Control(e) => e.code(),
            E::NotFound(_) => Code::NotFound,
        }
    }
}

impl GrpcCode for crate::cluster::drain::DrainError {
    fn code(&self) -> Code {
        use crate::cluster::drain::DrainError as E;
        match self {
            E::Control(e) => e.code(),
            E::Copy(e) => e.code(),
            E::NoSuchNode(_) => Code::NotFound,
            E::TooFewSurvivors { .. } | E::NowhereToGo { .. } => Code::FailedPrecondition,
            E::Read { .. } => Code::Unavailable,
            E::Contended { .. } => Code::Aborted,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes() {
        assert_eq!(
            StoreError::from_io(1, 0, std::io::Error::from_raw_os_error(libc::ENOSPC)).code(),
            Code::ResourceExhausted
        );
        assert_eq!(
            StoreError::from_io(1, 0, std::io::Error::from_raw_os_error(libc::EIO)).code(),
            Code::Unavailable
        );
        let s: Status = ReadError::DatasetNotFound("x".into()).into();
        assert_eq!(s.code(), Code::NotFound);
        assert!(s.message().contains("\"x\""));
    }
}
