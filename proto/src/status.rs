//! The Status message's groups (reads, read-ahead, regions, scrub,
//! discards, catalog, connections, buffers, faults), reachable without
//! unwrapping: a group a server did not send reads as all zeros.

use crate::pb;

macro_rules! groups {
    ($($field:ident: $ty:ident),* $(,)?) => {
        /// Each group of the status, or an empty one where the server sent
        /// none (an older server).
        impl pb::StatusResponse {
            $(
                pub fn $field(&self) -> &pb::$ty {
                    static EMPTY: std::sync::LazyLock<pb::$ty> =
                        std::sync::LazyLock::new(Default::default);
                    self.$field.as_ref().unwrap_or(&EMPTY)
                }
            )*
        }
    };
}

groups!(
    reads: ReadStats,
    read_ahead: ReadAheadStats,
    regions: RegionStats,
    scrub: ScrubStats,
    discard: DiscardStats,
    catalog: CatalogStatus,
    connections: ConnectionStats,
    buffers: BufferStats,
    faults: FaultStats,
);

#[cfg(test)]
mod tests {
    use super::*;

    /// Guards against a missing group (an older server's answer) being a
    /// panic instead of zeros.
    #[test]
    fn a_missing_group_reads_as_zeros() {
        let s = pb::StatusResponse::default();
        assert_eq!(s.reads().grpc_bytes_served, 0);
        assert!(s.catalog().fault.is_empty());
        let s = pb::StatusResponse {
            scrub: Some(pb::ScrubStats {
                passes: 3,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(s.scrub().passes, 3);
    }
}
