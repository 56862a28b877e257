//! The results.json contract: `machine`, `commands`, and `results`, a list
//! of rows, one per (workload, system, concurrency). Figures that do not
//! apply are null.

use serde::Serialize;

/// One measured row (medians over repetitions).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Row {
    pub workload: String,
    pub system: String,
    pub concurrency: u32,
    pub gib_per_s: Option<f64>,
    pub samples_per_s: Option<f64>,
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
    pub p999_us: Option<f64>,
    pub cpu_s_per_gib_server: Option<f64>,
    pub cpu_s_per_gib_client: Option<f64>,
    pub ratio_to_fio: Option<f64>,
    /// The block device under the device files, during the run: mean read
    /// request size (after the kernel's own merging) and utilisation.
    pub disk_read_kib_mean: Option<f64>,
    pub disk_busy_pct: Option<f64>,
    /// Individual repetitions' GiB/s (or samples/s for listing), for drift.
    pub repetitions: Vec<f64>,
}

/// One repetition of one system.
#[derive(Debug, Clone, Default)]
pub struct Measurement {
    pub bytes: u64,
    pub samples: u64,
    pub seconds: f64,
    pub latencies_us: Vec<f64>,
    /// Latency percentiles reported by the tool itself (fio), if any.
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
    pub p999_us: Option<f64>,
    pub cpu_s_server: Option<f64>,
    pub cpu_s_client: Option<f64>,
    /// Latency CDF points `(percentile, us)` reported by the tool (fio).
    pub cdf_points: Vec<(f64, f64)>,
    /// Reads, bytes and busy time of the disk under the device files.
    pub disk: Option<DiskDelta>,
}

/// What the disk did during one repetition.
#[derive(Debug, Clone, Copy, Default)]
pub struct DiskDelta {
    pub reads: u64,
    pub read_bytes: u64,
    pub busy_ms: u64,
}

/// Percentiles at which latency CDFs are sampled.
pub const CDF_PERCENTILES: [f64; 16] = [
    1.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.99,
];

impl Measurement {
    /// Latency CDF as `(percentile, us)` points.
    pub fn cdf(&self) -> Vec<(f64, f64)> {
        if !self.cdf_points.is_empty() {
            return self.cdf_points.clone();
        }
        let mut v = self.latencies_us.clone();
        CDF_PERCENTILES
            .iter()
            .filter_map(|&p| crate::stats::percentile(&mut v, p / 100.0).map(|us| (p, us)))
            .collect()
    }

    pub fn gib_per_s(&self) -> Option<f64> {
        (self.bytes > 0 && self.seconds > 0.0)
            .then(|| self.bytes as f64 / self.seconds / (1u64 << 30) as f64)
    }

    pub fn samples_per_s(&self) -> Option<f64> {
        (self.samples > 0 && self.seconds > 0.0).then(|| self.samples as f64 / self.seconds)
    }

    fn pct(&self, q: f64) -> Option<f64> {
        let mut v = self.latencies_us.clone();
        crate::stats::percentile(&mut v, q)
    }

    pub fn p50(&self) -> Option<f64> {
        self.p50_us.or_else(|| self.pct(0.5))
    }
    pub fn p99(&self) -> Option<f64> {
        self.p99_us.or_else(|| self.pct(0.99))
    }
    pub fn p999(&self) -> Option<f64> {
        self.p999_us.or_else(|| self.pct(0.999))
    }

    fn per_gib(&self, cpu: Option<f64>) -> Option<f64> {
        let gib = self.bytes as f64 / (1u64 << 30) as f64;
        cpu.filter(|_| gib > 0.0).map(|c| c / gib)
    }
}

/// Folds repetitions into one row of medians.
pub fn summarize(workload: &str, system: &str, concurrency: u32, reps: &[Measurement]) -> Row {
    use crate::stats::median;
    let m =
        |f: &dyn Fn(&Measurement) -> Option<f64>| median(&reps.iter().map(f).collect::<Vec<_>>());
    let gib = m(&|r| r.gib_per_s());
    let sps = m(&|r| r.samples_per_s());
    Row {
        workload: workload.into(),
        system: system.into(),
        concurrency,
        gib_per_s: gib,
        samples_per_s: sps,
        p50_us: m(&|r| r.p50()),
        p99_us: m(&|r| r.p99()),
        p999_us: m(&|r| r.p999()),
        cpu_s_per_gib_server: m(&|r| r.per_gib(r.cpu_s_server)),
        cpu_s_per_gib_client: m(&|r| r.per_gib(r.cpu_s_client)),
        ratio_to_fio: None,
        disk_read_kib_mean: m(&|r| {
            r.disk
                .filter(|d| d.reads > 0)
                .map(|d| d.read_bytes as f64 / 1024.0 / d.reads as f64)
        }),
        disk_busy_pct: m(&|r| {
            r.disk
                .filter(|_| r.seconds > 0.0)
                .map(|d| (d.busy_ms as f64 / 10.0 / r.seconds).min(100.0))
        }),
        repetitions: reps
            .iter()
            .filter_map(|r| r.gib_per_s().or(r.samples_per_s()))
            .collect(),
    }
}

/// Fills `ratio_to_fio` from the fio row of the same workload and
/// concurrency: GiB/s where both have it, else samples/s.
pub fn add_ratios(rows: &mut [Row]) {
    let fio: Vec<Row> = rows.iter().filter(|r| r.system == "fio").cloned().collect();
    for r in rows.iter_mut() {
        let Some(f) = fio
            .iter()
            .find(|f| f.workload == r.workload && f.concurrency == r.concurrency)
        else {
            continue;
        };
        r.ratio_to_fio = match (r.gib_per_s, f.gib_per_s) {
            (Some(a), Some(b)) if b > 0.0 => Some(a / b),
            _ => match (r.samples_per_s, f.samples_per_s) {
                (Some(a), Some(b)) if b > 0.0 => Some(a / b),
                _ => None,
            },
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_takes_medians_and_ratios() {
        let rep = |gib: u64, secs: f64| Measurement {
            bytes: gib << 30,
            samples: 10,
            seconds: secs,
            latencies_us: vec![1.0, 2.0, 3.0],
            cpu_s_client: Some(1.0),
            ..Default::default()
        };
        let reps = [rep(1, 1.0), rep(1, 2.0), rep(1, 0.5)];
        let mut rows = vec![
            summarize("w", "storaged_grpc", 4, &reps),
            summarize("w", "fio", 4, &[rep(2, 1.0)]),
        ];
        assert_eq!(rows[0].gib_per_s, Some(1.0));
        assert_eq!(rows[0].p50_us, Some(2.0));
        assert_eq!(rows[0].cpu_s_per_gib_client, Some(1.0));
        assert_eq!(rows[0].cpu_s_per_gib_server, None);
        add_ratios(&mut rows);
        assert_eq!(rows[0].ratio_to_fio, Some(0.5));
        assert_eq!(rows[1].ratio_to_fio, Some(1.0));
        let json = serde_json::to_value(&rows[0]).unwrap();
        for key in [
            "workload",
            "system",
            "concurrency",
            "gib_per_s",
            "samples_per_s",
            "p50_us",
            "p99_us",
            "p999_us",
            "cpu_s_per_gib_server",
            "cpu_s_per_gib_client",
            "ratio_to_fio",
        ] {
            assert!(json.get(key).is_some(), "{key}");
        }
        assert!(json["cpu_s_per_gib_server"].is_null());
    }
}
