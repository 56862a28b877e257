//! storaged benchmarks.
//!
//! - `storaged-bench` (src/main.rs): one run that measures storaged against
//!   the physical limit (fio on the same device files) and the peers a user
//!   would pick instead (nginx, local files read with pread), on cold
//!   caches, alternating systems, and writes `results.json`.
//! - `benches/engine_read.rs`: criterion micro-benchmarks of the read path.

pub mod datasets;
pub mod machine;
pub mod plots;
pub mod results;
pub mod stats;
pub mod systems;
