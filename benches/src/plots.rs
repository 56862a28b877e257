//! PNG plots of a run: throughput against concurrency per workload, and
//! latency CDFs per system. Text is rendered with DejaVu Sans embedded in
//! the binary, so no system fonts are needed.

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::results::Row;

const SYSTEM_COLORS: [(&str, RGBColor); 5] = [
    ("fio", RGBColor(40, 40, 40)),
    ("storaged_grpc", RGBColor(214, 39, 40)),
    ("nginx", RGBColor(31, 119, 180)),
    ("local_odirect", RGBColor(44, 160, 44)),
    ("local_buffered", RGBColor(255, 127, 14)),
];

fn color(system: &str) -> RGBColor {
    SYSTEM_COLORS
        .iter()
        .find(|(s, _)| *s == system)
        .map(|(_, c)| *c)
        .unwrap_or(RGBColor(148, 103, 189))
}

fn fonts() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            dejavu::sans::regular(),
        );
    });
}

type PlotResult = Result<(), Box<dyn std::error::Error>>;

/// GiB/s against items in flight, one line per system.
pub fn throughput(path: &Path, workload: &str, rows: &[Row]) -> PlotResult {
    fonts();
    let rows: Vec<&Row> = rows
        .iter()
        .filter(|r| r.workload == workload && r.gib_per_s.is_some())
        .collect();
    let mut conc: Vec<u32> = rows.iter().map(|r| r.concurrency).collect();
    conc.sort_unstable();
    conc.dedup();
    if conc.is_empty() {
        return Ok(());
    }
    let y_max = rows.iter().filter_map(|r| r.gib_per_s).fold(0.0, f64::max) * 1.15;
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let x_hi = (conc.len() as f64 - 0.5).max(0.5);
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{workload}: throughput against concurrency"),
            ("sans-serif", 24),
        )
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(-0.5f64..x_hi, 0.0..y_max.max(0.01))?;
    let labels = conc.clone();
    chart
        .configure_mesh()
        .x_desc("items (or streams) in flight")
        .y_desc("GiB/s")
        .x_labels(conc.len())
        .x_label_formatter(&|x| {
            let i = x.round() as i64;
            if (x - i as f64).abs() < 0.01 && i >= 0 && (i as usize) < labels.len() {
                labels[i as usize].to_string()
            } else {
                String::new()
            }
        })
        .draw()?;
    let mut systems: Vec<&str> = rows.iter().map(|r| r.system.as_str()).collect();
    systems.dedup();
    systems.sort_unstable();
    systems.dedup();
    for system in systems {
        let c = color(system);
        let pts: Vec<(f64, f64)> = conc
            .iter()
            .enumerate()
            .filter_map(|(i, cc)| {
                rows.iter()
                    .find(|r| r.system == system && r.concurrency == *cc)
                    .and_then(|r| r.gib_per_s)
                    .map(|g| (i as f64, g))
            })
            .collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))?
            .label(system)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
        chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 4, c.filled())))?;
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.9))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    root.present()?;
    Ok(())
}

/// Latency CDFs: percentile against latency (log scale), one line per
/// system.
pub fn latency_cdf(path: &Path, title: &str, series: &[(String, Vec<(f64, f64)>)]) -> PlotResult {
    fonts();
    let all: Vec<f64> = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|x| x.1))
        .filter(|x| *x > 0.0)
        .collect();
    if all.is_empty() {
        return Ok(());
    }
    let lo = all.iter().copied().fold(f64::MAX, f64::min).max(1.0) / 1.5;
    let hi = all.iter().copied().fold(0.0, f64::max) * 1.5;
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d((lo..hi).log_scale(), 0.0f64..100.0)?;
    chart
        .configure_mesh()
        .x_desc("latency per item (us, log scale)")
        .y_desc("percentile")
        .draw()?;
    for (system, pts) in series {
        let c = color(system);
        let pts: Vec<(f64, f64)> = pts
            .iter()
            .filter(|p| p.1 > 0.0)
            .map(|(p, us)| (*us, *p))
            .collect();
        chart
            .draw_series(LineSeries::new(pts, c.stroke_width(2)))?
            .label(system.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.9))
        .position(SeriesLabelPosition::LowerRight)
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_pngs() {
        let d = tempfile::tempdir().unwrap();
        let row = |system: &str, c: u32, g: f64| Row {
            workload: "random_4k".into(),
            system: system.into(),
            concurrency: c,
            gib_per_s: Some(g),
            samples_per_s: None,
            p50_us: None,
            p99_us: None,
            p999_us: None,
            cpu_s_per_gib_server: None,
            cpu_s_per_gib_client: None,
            ratio_to_fio: None,
            disk_read_kib_mean: None,
            disk_busy_pct: None,
            repetitions: vec![],
        };
        let rows = vec![
            row("fio", 1, 0.1),
            row("fio", 16, 0.2),
            row("storaged_grpc", 1, 0.05),
            row("storaged_grpc", 16, 0.15),
        ];
        let p = d.path().join("t.png");
        throughput(&p, "random_4k", &rows).unwrap();
        assert!(std::fs::read(&p).unwrap().starts_with(b"\x89PNG"));
        let c = d.path().join("c.png");
        let series = vec![
            ("fio".to_owned(), vec![(50.0, 100.0), (99.0, 400.0)]),
            ("nginx".to_owned(), vec![(50.0, 300.0), (99.0, 900.0)]),
        ];
        latency_cdf(&c, "cdf", &series).unwrap();
        assert!(std::fs::read(&c).unwrap().starts_with(b"\x89PNG"));
    }
}
