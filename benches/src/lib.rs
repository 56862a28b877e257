//! storaged benchmarks. `benches/engine_read.rs` holds the criterion
//! micro-benchmarks of the engine and store read paths; the end-to-end
//! harness against fio and the peers comes with the benchmark issue.
