//! The report's SVG plots: latency CDF and timeline per profile, throughput against loss.

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::prelude::*;

use crate::model::{BenchReport, Row};

pub(super) const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

pub(super) fn color(transport: &str, all: &[String]) -> RGBColor {
    let i = all.iter().position(|t| t == transport).unwrap_or(0);
    COLORS[i % COLORS.len()]
}

pub(super) fn plot_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("plotting: {e:?}")
}

pub(super) fn cdf_plot(path: &Path, profile: &str, rows: &[&Row]) -> Result<()> {
    let all: Vec<String> = rows.iter().map(|r| r.transport.clone()).collect();
    let max_ms = rows
        .iter()
        .flat_map(|r| r.cdf.iter().map(|(_, us)| *us as f64 / 1000.0))
        .fold(1.0f64, f64::max);
    let min_ms = rows
        .iter()
        .flat_map(|r| r.cdf.iter().map(|(_, us)| *us as f64 / 1000.0))
        .fold(f64::MAX, f64::min)
        .max(0.01);
    let root = SVGBackend::new(path, (720, 440)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("latency CDF, profile {profile}"),
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d((min_ms * 0.8..max_ms * 1.2).log_scale(), 0.0..1.0f64)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc("latency (ms, log scale)")
        .y_desc("share of messages")
        .draw()
        .map_err(plot_err)?;
    for r in rows {
        let c = color(&r.transport, &all);
        chart
            .draw_series(LineSeries::new(
                r.cdf
                    .iter()
                    .map(|(q, us)| ((*us as f64 / 1000.0).max(min_ms), *q)),
                c.stroke_width(2),
            ))
            .map_err(plot_err)?
            .label(r.transport.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(plot_err)?;
    root.present().map_err(plot_err)?;
    Ok(())
}

/// p99 (solid) and p50 (dashed) per 100 ms of send time, per transport, log latency.
pub(super) fn timeline_plot(path: &Path, profile: &str, rows: &[&Row]) -> Result<()> {
    let all: Vec<String> = rows.iter().map(|r| r.transport.clone()).collect();
    let points = || rows.iter().flat_map(|r| r.timeline.iter());
    let max_ms = points()
        .map(|p| p.p99_us as f64 / 1000.0)
        .fold(1.0f64, f64::max);
    let min_ms = points()
        .map(|p| p.p50_us as f64 / 1000.0)
        .fold(f64::MAX, f64::min)
        .max(0.01);
    let max_s = points()
        .map(|p| (p.t_ms + crate::stages::BUCKET_MS) as f64 / 1000.0)
        .fold(0.1f64, f64::max);
    let root = SVGBackend::new(path, (720, 440)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("latency over the run, profile {profile}"),
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..max_s, (min_ms * 0.8..max_ms * 1.2).log_scale())
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc("send time (s from the phase's first send; 100 ms buckets)")
        .y_desc("latency (ms, log scale)")
        .draw()
        .map_err(plot_err)?;
    for r in rows {
        let c = color(&r.transport, &all);
        let at = |p: &crate::model::TimelinePoint| (p.t_ms as f64 + 50.0) / 1000.0;
        chart
            .draw_series(LineSeries::new(
                r.timeline
                    .iter()
                    .map(|p| (at(p), (p.p99_us as f64 / 1000.0).max(min_ms))),
                c.stroke_width(2),
            ))
            .map_err(plot_err)?
            .label(format!("{} p99", r.transport))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
        chart
            .draw_series(DashedLineSeries::new(
                r.timeline
                    .iter()
                    .map(|p| (at(p), (p.p50_us as f64 / 1000.0).max(min_ms))),
                4,
                3,
                c.stroke_width(1),
            ))
            .map_err(plot_err)?
            .label(format!("{} p50 (dashed)", r.transport))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(1)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(plot_err)?;
    root.present().map_err(plot_err)?;
    Ok(())
}

pub(super) fn throughput_plot(path: &Path, report: &BenchReport) -> Result<()> {
    let loss_of = |name: &str| {
        report
            .profiles
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.loss * 100.0)
            .unwrap_or(0.0)
    };
    let mut all: Vec<String> = Vec::new();
    for r in &report.rows {
        if r.status == "ok" && !all.contains(&r.transport) {
            all.push(r.transport.clone());
        }
    }
    let max_loss = report
        .profiles
        .iter()
        .map(|p| p.loss * 100.0)
        .fold(1.0f64, f64::max);
    let max_rate = report
        .rows
        .iter()
        .filter_map(|r| r.msgs_per_s)
        .fold(1.0f64, f64::max);
    let root = SVGBackend::new(path, (720, 440)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "delivered messages/s against packet loss",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..max_loss * 1.1, 0.0..max_rate * 1.15)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc("packet loss per direction (%)")
        .y_desc("msgs/s")
        .draw()
        .map_err(plot_err)?;
    for t in &all {
        let c = color(t, &all);
        // One point per profile; profiles with the same loss (lan, wan) differ in RTT, so the
        // line joins them in the order of the run.
        let pts: Vec<(f64, f64)> = report
            .rows
            .iter()
            .filter(|r| &r.transport == t && r.status == "ok")
            .filter_map(|r| Some((loss_of(&r.profile), r.msgs_per_s?)))
            .collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))
            .map_err(plot_err)?
            .label(t.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
        chart
            .draw_series(pts.into_iter().map(|p| Circle::new(p, 3, c.filled())))
            .map_err(plot_err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(plot_err)?;
    root.present().map_err(plot_err)?;
    Ok(())
}
