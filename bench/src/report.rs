//! Where results go: JSON lines for machines, a table for people, an SVG plot for reports.
//!
//! With `--json` stdout carries nothing but JSON lines, so it can be piped straight into
//! `jq`; everything for people moves to stderr.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use plotters::prelude::*;
use serde::Serialize;

use crate::Transport;
use crate::fifo::Throughput;

pub(crate) struct Reporter {
    json: bool,
}

impl Reporter {
    pub(crate) fn new(json: bool) -> Self {
        Self { json }
    }

    /// One result line, printed as soon as it is known so a long run shows progress.
    pub(crate) fn emit(&mut self, line: &impl Serialize) -> anyhow::Result<()> {
        if self.json {
            let mut out = std::io::stdout().lock();
            serde_json::to_writer(&mut out, line)?;
            out.write_all(b"\n")?;
            out.flush()?;
        }
        Ok(())
    }

    /// Text for people: stdout normally, stderr when stdout is JSON.
    pub(crate) fn human(&mut self, text: &str) {
        if self.json {
            eprintln!("{text}");
        } else {
            println!("{text}");
        }
    }

    pub(crate) fn table(&mut self, title: &str, headers: &[&str], rows: &[Vec<String>]) {
        let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
        for row in rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.len());
            }
        }
        let line = |cells: &mut dyn Iterator<Item = &str>| {
            cells
                .zip(&widths)
                .enumerate()
                .map(|(i, (c, w))| {
                    // Names read best left-aligned, numbers right-aligned.
                    if i == 0 {
                        format!("{c:<w$}")
                    } else {
                        format!("{c:>w$}")
                    }
                })
                .collect::<Vec<_>>()
                .join("  ")
        };
        let mut text = format!("\n{title}\n");
        text += &line(&mut headers.iter().copied());
        text.push('\n');
        let total: usize = widths.iter().sum::<usize>() + 2 * widths.len().saturating_sub(1);
        text += &"-".repeat(total);
        for row in rows {
            text.push('\n');
            text += &line(&mut row.iter().map(String::as_str));
        }
        self.human(&text);
    }

    /// A target verdict, loud when missed.
    pub(crate) fn verdict(&mut self, what: &str, measured: f64, target: &str, met: bool) {
        let mark = if met { "met" } else { "TARGET MISSED" };
        self.human(&format!(
            "{what}: {measured:.2} (target {target}) -> {mark}"
        ));
    }
}

pub(crate) fn progress(msg: &str) {
    eprintln!("[shunt-bench] {msg}");
}

/// A byte count for people: 64 B, 16 KiB, 1 MiB, 4 GiB.
pub(crate) fn size_label(n: usize) -> String {
    match n {
        n if n >= 1 << 30 && n % (1 << 30) == 0 => format!("{} GiB", n >> 30),
        n if n >= 1 << 20 && n % (1 << 20) == 0 => format!("{} MiB", n >> 20),
        n if n >= 1 << 10 && n % (1 << 10) == 0 => format!("{} KiB", n >> 10),
        n => format!("{n} B"),
    }
}

/// Gbit/s against write size, log x axis, one line per transport.
pub(crate) fn plot_throughput(path: &Path, results: &[Throughput]) -> anyhow::Result<()> {
    anyhow::ensure!(!results.is_empty(), "nothing to plot");
    let mut sizes: Vec<f64> = results.iter().map(|r| r.msg_size as f64).collect();
    sizes.sort_by(f64::total_cmp);
    sizes.dedup();
    // Some margin keeps the end points off the frame (and a single size off an empty range).
    let lo = sizes[0] / 1.5;
    let hi = sizes[sizes.len() - 1] * 1.5;
    let top = results.iter().map(|r| r.gbps).fold(0.0, f64::max) * 1.1;
    let top = if top > 0.0 { top } else { 1.0 };

    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Streaming throughput by write size", ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(60)
        .build_cartesian_2d((lo..hi).log_scale().with_key_points(sizes), 0.0..top)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc("write size (bytes)")
        .y_desc("Gbit/s")
        .x_label_formatter(&|v| size_label(v.round() as usize))
        .draw()
        .map_err(plot_err)?;

    let transports = [
        Transport::CutThrough,
        Transport::TcpLoopback,
        Transport::Unix,
        Transport::Memcpy,
    ];
    let colors = [RED, BLUE, GREEN, BLACK];
    for (t, color) in transports.into_iter().zip(colors) {
        let mut points: Vec<(f64, f64)> = results
            .iter()
            .filter(|r| r.transport == t)
            .map(|r| (r.msg_size as f64, r.gbps))
            .collect();
        if points.is_empty() {
            continue;
        }
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(plot_err)?
            .label(t.name())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(plot_err)?;
    root.present().map_err(plot_err)?;
    Ok(())
}

// plotters' errors borrow the backend's error type, which is not 'static.
fn plot_err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("plot: {e}")
}

/// What every `*-ratios` line starts with: which bench, what was compared with what, at which
/// message size.
#[derive(Serialize)]
pub(crate) struct RatiosHeader {
    pub(crate) bench: &'static str,
    pub(crate) transport: Transport,
    pub(crate) msg_size: usize,
    pub(crate) baseline: Transport,
}

impl RatiosHeader {
    /// Cut-through against kernel TCP loopback, as every socket benchmark compares them.
    pub(crate) fn cut_through_vs_tcp(bench: &'static str, msg_size: usize) -> Self {
        Self {
            bench,
            transport: Transport::CutThrough,
            msg_size,
            baseline: Transport::TcpLoopback,
        }
    }
}

/// The `q`th percentile of `sorted` (ascending), in microseconds: the sample at index
/// `len * q / 100`, so p50 of an even count is the upper middle.
pub(crate) fn percentile_us(sorted: &[Duration], q: usize) -> f64 {
    sorted[(sorted.len() * q / 100).min(sorted.len() - 1)].as_secs_f64() * 1e6
}

/// The middle of `v` (the upper middle of an even count); `v` must not be empty.
pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Measures each case in turn, saying which one runs, and emits each result as soon as it
/// is known; an error names the case it happened in.
pub(crate) fn measure_each<C, M: Serialize>(
    r: &mut Reporter,
    cases: impl IntoIterator<Item = C>,
    name: impl Fn(&C) -> String,
    mut measure: impl FnMut(&C) -> anyhow::Result<M>,
) -> anyhow::Result<Vec<M>> {
    let mut results = Vec::new();
    for case in cases {
        let label = name(&case);
        progress(&label);
        let m = measure(&case).map_err(|e| e.context(label))?;
        r.emit(&m)?;
        results.push(m);
    }
    Ok(results)
}
