//! `--plot DIR`: the figures of the runs as SVG pictures, one file per
//! chart, each named for what it shows:
//!
//! - `latency-<scenario>-<payload>.svg`: the latency percentile
//!   distribution of each transport's run, drawn as HdrHistogram's plotter
//!   draws it: the percentile along a log scale of 1/(1-p) (0%, 90%, 99%,
//!   99.9%, ...), so each step right is a tenth as many calls; the latency
//!   on a log scale too, since the transports and the tail differ by
//!   orders of magnitude.
//! - `msgs-per-s-<scenario>-<payload>.svg` (or `gb-per-s-bandwidth-
//!   <payload>.svg`): each transport's throughput (payload bandwidth) as
//!   a bar.
//! - `soak-<scenario>-<payload>.svg` (`--duration` runs): the daemon's
//!   `rss_anon_kb` and fds, sampled every second, and each minute's p99,
//!   over time, one line per transport.
//!
//! plotters draws them with its SVG backend alone (no bitmap or font
//! crates): text is left to whatever shows the SVG, its width estimated.

use std::path::{Path, PathBuf};

use anyhow::Context;
use hdrhistogram::Histogram;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::report::{size, Run};

/// Each transport's colour, alike on every chart.
fn colour(transport: &str) -> RGBColor {
    match transport {
        "shm" => RGBColor(31, 119, 180),
        "uds" => RGBColor(255, 127, 14),
        "tcp" => RGBColor(44, 160, 44),
        _ => RGBColor(127, 127, 127),
    }
}

const FONT: &str = "sans-serif";
const WIDTH: u32 = 860;
const HEIGHT: u32 = 500;

/// Draws every chart `runs` make into `dir` (created if missing); returns
/// the files written, in the order of the runs.
pub fn draw(dir: &Path, runs: &[Run]) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut groups: Vec<(&str, usize)> = Vec::new();
    for r in runs {
        if !groups.contains(&(r.scenario, r.payload_bytes)) {
            groups.push((r.scenario, r.payload_bytes));
        }
    }
    let mut written = Vec::new();
    for (scenario, payload) in groups {
        let group: Vec<&Run> = runs.iter().filter(|r| (r.scenario, r.payload_bytes) == (scenario, payload)).collect();
        let name = |what: &str| dir.join(format!("{what}-{scenario}-{}.svg", size(payload).replace(' ', "")));
        let mut chart = |path: PathBuf, draw: &dyn Fn(&Path, &[&Run]) -> anyhow::Result<()>| {
            draw(&path, &group).with_context(|| format!("cannot draw {}", path.display()))?;
            written.push(path);
            anyhow::Ok(())
        };
        if group.iter().any(|r| !r.latency_ns.is_empty()) {
            chart(name("latency"), &latency)?;
        }
        if scenario == "bandwidth" {
            chart(name("gb-per-s"), &|path, runs| rates(path, runs, Rate::Bandwidth))?;
        } else {
            chart(name("msgs-per-s"), &|path, runs| rates(path, runs, Rate::Calls))?;
        }
        if group.iter().any(|r| r.samples.is_some()) {
            chart(name("soak"), &soak)?;
        }
    }
    Ok(written)
}

/// What a chart of the runs like `r` shows: "throughput, 100 clients x
/// 10,000 calls, 64 B: round trips by percentile".
fn title(what: &str, r: &Run) -> String {
    let clients = if r.clients == 1 { "1 client".to_string() } else { format!("{} clients", r.clients) };
    let calls = if r.soak.is_some() {
        format!("{clients} for {:.0} s", r.duration_s)
    } else {
        format!("{clients} x {} calls", indicatif::HumanCount(r.messages_per_client))
    };
    let window = if r.window > 1 { format!(", window {}", r.window) } else { String::new() };
    format!("{}, {calls}, {}{window}: {what}", r.scenario, size(r.payload_bytes))
}

/// The percentile `1/(1-p) = x` stands for, as a label: 1 is "0%", 10
/// "90%", 1000 "99.9%".
fn percentile_label(x: f64) -> String {
    let p = 100.0 * (1.0 - 1.0 / x);
    let decimals = (x.log10().round() as i32 - 2).max(0) as usize;
    format!("{p:.decimals$}%")
}

/// A latency in microseconds as an axis label.
fn us_label(v: f64) -> String {
    match v {
        v if v >= 10.0 => format!("{v:.0}"),
        v if v >= 1.0 => format!("{v:.1}"),
        v => format!("{v:.2}"),
    }
}

/// The distribution as (1/(1-q), latency in us) points: HdrHistogram's
/// quantile steps, and the slowest call at 1/(1-q) = the number of calls
/// (one call in that many).
fn distribution(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    let calls = h.len() as f64;
    let mut points: Vec<(f64, f64)> = h
        .iter_quantiles(8)
        .filter(|v| v.quantile_iterated_to() < 1.0)
        .map(|v| (1.0 / (1.0 - v.quantile_iterated_to()), v.value_iterated_to() as f64 / 1000.0))
        .filter(|&(x, _)| x < calls)
        .collect();
    points.push((calls.max(1.0), h.max() as f64 / 1000.0));
    points
}

/// `latency-*.svg`: every transport's percentile distribution.
fn latency(path: &Path, runs: &[&Run]) -> anyhow::Result<()> {
    let series: Vec<(&Run, Vec<(f64, f64)>)> =
        runs.iter().filter(|r| !r.latency_ns.is_empty()).map(|r| (*r, distribution(&r.latency_ns))).collect();
    let calls = series.iter().map(|(r, _)| r.latency_ns.len()).max().unwrap_or(1).max(10);
    // Whole powers of ten, up to the first at or past the number of calls.
    let decades = (calls as f64).log10().ceil() as i32;
    let x_max = 10f64.powi(decades);
    let values = series.iter().flat_map(|(_, p)| p.iter().map(|&(_, y)| y));
    let (lo, hi) = values.fold((f64::MAX, 0f64), |(lo, hi), y| (lo.min(y), hi.max(y)));
    let (lo, hi) = ((lo * 0.8).max(0.01), (hi * 1.25).max(lo * 2.0).max(0.1));

    let root = SVGBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title("round trips by percentile", runs[0]), (FONT, 20))
        .margin(16)
        .margin_right(40)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(
            (1f64..x_max).log_scale().with_key_points((0..=decades).map(|d| 10f64.powi(d)).collect()),
            (lo..hi).log_scale(),
        )?;
    chart
        .configure_mesh()
        .label_style((FONT, 15))
        .axis_desc_style((FONT, 15))
        .light_line_style(BLACK.mix(0.04))
        .x_desc("percentile (calls at or below that latency)")
        .y_desc("round trip (us)")
        .x_label_formatter(&|x| percentile_label(*x))
        .y_label_formatter(&|y| us_label(*y))
        .draw()?;
    for (r, points) in series {
        let c = colour(r.transport);
        let l = &r.latency_us;
        chart
            .draw_series(LineSeries::new(points, c.stroke_width(2)))?
            .label(format!(
                "{}  p50 {} us, p99 {} us, max {} us",
                r.transport,
                us_label(l.p50),
                us_label(l.p99),
                us_label(l.max)
            ))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
    }
    legend(&mut chart)?;
    root.present()?;
    Ok(())
}

/// The legend of a chart, in its upper left corner.
fn legend<'a, X: Ranged, Y: Ranged>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<X, Y>>,
) -> anyhow::Result<()> {
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font((FONT, 16))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .draw()?;
    Ok(())
}

/// Which rate a bar chart shows.
#[derive(Clone, Copy)]
enum Rate {
    /// Calls that succeeded, per second.
    Calls,
    /// Payload bytes of requests and replies, per second, in GB.
    Bandwidth,
}

/// `msgs-per-s-*.svg` or `gb-per-s-*.svg`: a bar per transport.
fn rates(path: &Path, runs: &[&Run], rate: Rate) -> anyhow::Result<()> {
    let value = |r: &Run| match rate {
        Rate::Calls => r.throughput_msgs_per_s,
        Rate::Bandwidth => r.bytes_per_s.unwrap_or(0.0) / 1e9,
    };
    let (what, unit) = match rate {
        Rate::Calls => ("throughput", "calls answered per second (msg/s)"),
        Rate::Bandwidth => ("bandwidth", "payload GB/s, both directions"),
    };
    let text = |v: f64| match rate {
        Rate::Calls => format!("{} msg/s", indicatif::HumanCount(v.round() as u64)),
        Rate::Bandwidth => format!("{v:.2} GB/s"),
    };
    let top = runs.iter().map(|r| value(r)).fold(0f64, f64::max).max(f64::MIN_POSITIVE) * 1.18;
    let n = runs.len();
    let names: Vec<&str> = runs.iter().map(|r| r.transport).collect();

    let root = SVGBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title(what, runs[0]), (FONT, 20))
        .margin(16)
        .x_label_area_size(36)
        .y_label_area_size(84)
        // Segments 0..=n-1: one per transport.
        .build_cartesian_2d((0..n.saturating_sub(1)).into_segmented(), 0f64..top)?;
    chart
        .configure_mesh()
        .label_style((FONT, 15))
        .axis_desc_style((FONT, 15))
        .disable_x_mesh()
        .light_line_style(WHITE)
        .y_desc(unit)
        .x_label_formatter(&|x| match x {
            SegmentValue::CenterOf(i) => names.get(*i).copied().unwrap_or("").to_string(),
            _ => String::new(),
        })
        .y_label_formatter(&|y| match rate {
            Rate::Calls => indicatif::HumanCount(y.round() as u64).to_string(),
            Rate::Bandwidth => format!("{y:.1}"),
        })
        .draw()?;
    let above = TextStyle::from((FONT, 15).into_font()).pos(Pos::new(HPos::Center, VPos::Bottom));
    for (i, r) in runs.iter().enumerate() {
        let v = value(r);
        let mut bar = Rectangle::new(
            [(SegmentValue::Exact(i), 0.0), (SegmentValue::Exact(i + 1), v)],
            colour(r.transport).filled(),
        );
        // A gap between bars: a fifth of the width each side.
        let gap = WIDTH / (5 * n.max(1) as u32);
        bar.set_margin(0, 0, gap, gap);
        chart.draw_series(std::iter::once(bar))?;
        chart.draw_series(std::iter::once(Text::new(
            text(v),
            (SegmentValue::CenterOf(i), v + top * 0.01),
            above.clone(),
        )))?;
    }
    root.present()?;
    Ok(())
}

/// What a panel of a soak chart draws of a run: (seconds, value) points.
type Panel = fn(&Run) -> Vec<(f64, f64)>;

fn memory(r: &Run) -> Vec<(f64, f64)> {
    r.samples.iter().flatten().map(|s| (s.t_s, s.rss_anon_kb as f64)).collect()
}

fn fds(r: &Run) -> Vec<(f64, f64)> {
    r.samples.iter().flatten().map(|s| (s.t_s, s.fds as f64)).collect()
}

/// Each minute's p99 at the minute's end (the run's end, for the last).
fn p99_per_minute(r: &Run) -> Vec<(f64, f64)> {
    let per_minute = r.soak.as_ref().map_or(&[][..], |k| &k.p99_us_per_minute[..]);
    per_minute.iter().enumerate().map(|(i, &p)| ((60.0 * (i + 1) as f64).min(r.duration_s), p)).collect()
}

/// `soak-*.svg`: three panels over the seconds of the runs: the daemon's
/// anonymous memory, its fds, and each minute's p99.
fn soak(path: &Path, runs: &[&Run]) -> anyhow::Result<()> {
    let runs: Vec<&Run> = runs.iter().copied().filter(|r| r.samples.is_some()).collect();
    let t_max = runs.iter().map(|r| r.duration_s).fold(1f64, f64::max);
    let root = SVGBackend::new(path, (WIDTH, 3 * HEIGHT * 3 / 5)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(&title("the daemon over time", runs[0]), (FONT, 20))?;
    let panels = root.split_evenly((3, 1));
    let panel_specs: [(&str, Panel); 3] =
        [("daemon rss_anon (kB)", memory), ("daemon fds", fds), ("p99 of each minute (us)", p99_per_minute)];
    for (area, (desc, data)) in panels.iter().zip(panel_specs) {
        let series: Vec<(&Run, Vec<(f64, f64)>)> = runs.iter().map(|r| (*r, data(r))).collect();
        let top = series.iter().flat_map(|(_, s)| s.iter().map(|p| p.1)).fold(1f64, f64::max) * 1.2;
        let mut chart = ChartBuilder::on(area)
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(72)
            .build_cartesian_2d(0f64..t_max, 0f64..top)?;
        chart
            .configure_mesh()
            .label_style((FONT, 15))
            .axis_desc_style((FONT, 15))
            .light_line_style(BLACK.mix(0.04))
            .x_desc("seconds since the calls started")
            .y_desc(desc)
            .y_label_formatter(&|y| format!("{y:.0}"))
            .draw()?;
        for (r, points) in series {
            let c = colour(r.transport);
            chart
                .draw_series(LineSeries::new(points, c.stroke_width(2)).point_size(2))?
                .label(r.transport)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        }
        legend(&mut chart)?;
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_labelled_by_their_nines() {
        let labels: Vec<String> = [1.0, 10.0, 100.0, 1000.0, 10_000.0].into_iter().map(percentile_label).collect();
        assert_eq!(labels, ["0%", "90%", "99%", "99.9%", "99.99%"]);
    }

    #[test]
    fn the_distribution_rises_to_the_slowest_call() {
        let mut h = crate::workload::new_histogram();
        for ns in 1..=1000u64 {
            h.record(ns * 1000).unwrap();
        }
        let points = distribution(&h);
        assert!(points.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1), "{points:?}");
        assert_eq!(points.last().map(|p| p.0), Some(1000.0));
        // The slowest call: 1000 us, to the histogram's precision.
        assert!((points.last().unwrap().1 - 1000.0).abs() < 1.0, "{points:?}");
        assert!(points[0].0 == 1.0 && points[0].1 <= 2.0, "{points:?}");
    }
}
