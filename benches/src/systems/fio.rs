//! fio with io_uring and O_DIRECT on the storaged device files: the
//! physical limit. Each job reads the device region that holds the dataset,
//! with the same block sizes and the same queue depth as storaged's in-flight
//! device reads.

use std::process::Command;

use anyhow::{Context, bail};

use crate::results::Measurement;

/// One fio invocation.
#[derive(Debug, Clone)]
pub struct FioJob {
    /// `read` or `randread`.
    pub rw: &'static str,
    /// `--bs=` value, or a `--bssplit=` value when `bssplit` is set.
    pub bs: String,
    pub bssplit: bool,
    pub iodepth: u32,
    pub numjobs: u32,
    /// Per device file: where the dataset's region starts and how long it is.
    pub offset_bytes: u64,
    pub size_bytes: u64,
    /// Stop after this many I/Os per job (random reads).
    pub number_ios: Option<u64>,
    pub filenames: Vec<String>,
}

impl FioJob {
    pub fn args(&self) -> Vec<String> {
        let files = self.filenames.len() as u64;
        let per_job = self.size_bytes / u64::from(self.numjobs);
        let mut a = vec![
            "--name=bench".to_owned(),
            "--ioengine=io_uring".into(),
            "--direct=1".into(),
            format!("--rw={}", self.rw),
            if self.bssplit {
                format!("--bssplit={}", self.bs)
            } else {
                format!("--bs={}", self.bs)
            },
            format!("--iodepth={}", self.iodepth),
            format!("--numjobs={}", self.numjobs),
            "--group_reporting".into(),
            format!("--filename={}", self.filenames.join(":")),
            format!("--offset={}", self.offset_bytes),
            // fio divides `size` among the files of a job.
            format!("--size={}", per_job * files),
            format!(
                "--percentile_list={}",
                crate::results::CDF_PERCENTILES
                    .iter()
                    .map(|p| p.to_string())
                    .collect::<Vec<_>>()
                    .join(":")
            ),
            "--randrepeat=1".into(),
            "--norandommap".into(),
            "--output-format=json".into(),
        ];
        if self.numjobs > 1 {
            a.push(format!("--offset_increment={per_job}"));
        }
        if let Some(n) = self.number_ios {
            a.push(format!("--number_ios={n}"));
        }
        a
    }

    pub fn command_line(&self) -> String {
        format!("fio {}", self.args().join(" "))
    }

    /// One job section per device file (each reading its own file's
    /// region with `numjobs` jobs at `iodepth`), reported as one group:
    /// the files' queues fill independently, as storaged's per-device
    /// reads do.
    pub fn args_per_file(&self) -> Vec<String> {
        let mut a = Vec::new();
        for (i, file) in self.filenames.iter().enumerate() {
            let one = FioJob {
                filenames: vec![file.clone()],
                ..self.clone()
            };
            let args = one.args();
            if i > 0 {
                // Options given once for the whole command line.
                a.extend(args.into_iter().filter(|x| {
                    !x.starts_with("--output-format") && !x.starts_with("--group_reporting")
                }));
            } else {
                a.extend(args);
            }
            if let Some(name) = a.iter_mut().rev().find(|x| x.starts_with("--name=")) {
                *name = format!("--name=dev{i}");
            }
        }
        a
    }

    pub fn command_line_per_file(&self) -> String {
        format!("fio {}", self.args_per_file().join(" "))
    }

    pub fn run(&self) -> anyhow::Result<Measurement> {
        self.run_with(self.args())
    }

    pub fn run_per_file(&self) -> anyhow::Result<Measurement> {
        self.run_with(self.args_per_file())
    }

    fn run_with(&self, args: Vec<String>) -> anyhow::Result<Measurement> {
        let out = Command::new("fio")
            .args(args)
            .output()
            .context("running fio")?;
        if !out.status.success() {
            bail!("fio failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        parse(&out.stdout)
    }
}

/// Reads fio's JSON output (group reporting: one job).
pub fn parse(json: &[u8]) -> anyhow::Result<Measurement> {
    // fio may print warnings before the JSON document.
    let start = json
        .iter()
        .position(|&b| b == b'{')
        .context("no JSON in fio output")?;
    let v: serde_json::Value =
        serde_json::from_slice(&json[start..]).context("parsing fio JSON")?;
    let job = &v["jobs"][0];
    let read = &job["read"];
    let f = |x: &serde_json::Value| x.as_f64().unwrap_or(0.0);
    let runtime_s = f(&read["runtime"]) / 1000.0;
    let pct = |k: &str| {
        read["clat_ns"]["percentile"][k]
            .as_f64()
            .map(|ns| ns / 1000.0)
    };
    let cdf_points = crate::results::CDF_PERCENTILES
        .iter()
        .filter_map(|&p| pct(&format!("{p:.6}")).map(|us| (p, us)))
        .collect();
    Ok(Measurement {
        bytes: read["io_bytes"].as_u64().unwrap_or(0),
        samples: read["total_ios"].as_u64().unwrap_or(0),
        seconds: runtime_s,
        latencies_us: Vec::new(),
        p50_us: pct("50.000000"),
        p99_us: pct("99.000000"),
        p999_us: pct("99.900000"),
        cpu_s_server: None,
        cpu_s_client: Some((f(&job["usr_cpu"]) + f(&job["sys_cpu"])) / 100.0 * runtime_s),
        cdf_points,
        disk: None,
    })
}

/// Buckets of a `--bssplit`; fio accepts at most 64 (`BSSPLIT_MAX`).
const BSSPLIT_BUCKETS: usize = 50;

/// A `--bssplit` approximating `sizes`: 50 buckets of 2% each, each the
/// size at its bucket's middle percentile, rounded up to 4 KiB (O_DIRECT)
/// and merged where equal. Ten decile buckets were too coarse: their top
/// bucket (the 95th percentile) left out the large samples that make the
/// latency tail, so fio's p99 was not measured on the same mix.
pub fn bssplit(sizes: &[u64]) -> String {
    let mut s: Vec<u64> = sizes.to_vec();
    s.sort_unstable();
    let share = (100 / BSSPLIT_BUCKETS) as u32;
    let mut buckets: Vec<(u64, u32)> = Vec::new();
    for d in 0..BSSPLIT_BUCKETS {
        let idx = ((d * 2 + 1) * s.len() / (2 * BSSPLIT_BUCKETS)).min(s.len().saturating_sub(1));
        let bs = s.get(idx).copied().unwrap_or(4096).next_multiple_of(4096);
        match buckets.last_mut() {
            Some((b, p)) if *b == bs => *p += share,
            _ => buckets.push((bs, share)),
        }
    }
    buckets
        .iter()
        .map(|(b, p)| format!("{}k/{p}", b / 1024))
        .collect::<Vec<_>>()
        .join(":")
}

pub fn available() -> bool {
    Command::new("fio")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fio_json() {
        let json = br#"warning: something
{"jobs":[{"usr_cpu":10.0,"sys_cpu":30.0,"read":{"io_bytes":1073741824,"runtime":500,"total_ios":1024,
"clat_ns":{"percentile":{"50.000000":1000,"99.000000":5000,"99.900000":9000}}}}]}"#;
        let m = parse(json).unwrap();
        assert_eq!(m.gib_per_s(), Some(2.0));
        assert_eq!(m.p99_us, Some(5.0));
        assert_eq!(m.cpu_s_client, Some(0.2));
        assert!(parse(b"nope").is_err());
    }

    #[test]
    fn bssplit_covers_100_percent() {
        let s = bssplit(&crate::datasets::imagenet_sizes(1000, 3));
        let total: u32 = s
            .split(':')
            .map(|p| p.split('/').nth(1).unwrap().parse::<u32>().unwrap())
            .sum();
        assert_eq!(total, 100, "{s}");
        assert!(s.split(':').count() <= 64, "fio's BSSPLIT_MAX: {s}");
        // Guards against dropping the tail: the largest bucket must reach
        // past the 95th percentile.
        let largest: u64 = s
            .split(':')
            .map(|p| p.split('k').next().unwrap().parse::<u64>().unwrap())
            .max()
            .unwrap();
        let mut sorted = crate::datasets::imagenet_sizes(1000, 3);
        sorted.sort_unstable();
        assert!(largest * 1024 > sorted[960], "{s}");
        assert!(
            s.split(':')
                .all(|p| p.split('/').next().unwrap().ends_with('k'))
        );
    }

    #[test]
    fn command_line_names_the_essentials() {
        let j = FioJob {
            rw: "randread",
            bs: "4k".into(),
            bssplit: false,
            iodepth: 16,
            numjobs: 1,
            offset_bytes: 1 << 20,
            size_bytes: 64 << 20,
            number_ios: Some(100),
            filenames: vec!["/a".into(), "/b".into()],
        };
        let c = j.command_line();
        for want in [
            "--ioengine=io_uring",
            "--direct=1",
            "--iodepth=16",
            "--filename=/a:/b",
            "--size=134217728",
            "--number_ios=100",
        ] {
            assert!(c.contains(want), "{c}");
        }
    }

    #[test]
    fn a_job_per_device_file_names_each_file_once_and_reports_once() {
        // Guards the sweep's per-file shape: one section per file, each on
        // its file alone, and the output options given once.
        let job = FioJob {
            rw: "read",
            bs: "1M".into(),
            bssplit: false,
            iodepth: 16,
            numjobs: 2,
            offset_bytes: 4096,
            size_bytes: 1 << 30,
            number_ios: None,
            filenames: vec!["/d/a".into(), "/d/b".into()],
        };
        let args = job.args_per_file();
        let names: Vec<&String> = args.iter().filter(|a| a.starts_with("--name=")).collect();
        assert_eq!(names, ["--name=dev0", "--name=dev1"]);
        let files: Vec<&String> = args
            .iter()
            .filter(|a| a.starts_with("--filename="))
            .collect();
        assert_eq!(files, ["--filename=/d/a", "--filename=/d/b"]);
        let once = |prefix: &str| args.iter().filter(|a| a.starts_with(prefix)).count();
        assert_eq!(once("--output-format"), 1);
        assert_eq!(once("--group_reporting"), 1);
        assert_eq!(once("--numjobs=2"), 2);
    }
}
