//! The figures, drawn with plotters' bitmap backend and an embedded font (DejaVu Sans from the
//! `dejavu` crate through plotters' ab_glyph text renderer), so nothing depends on system fonts.
use std::{path::Path, sync::Once};

use anyhow::{Result, anyhow};
use plotters::{
    coord::{
        Shift,
        combinators::LogCoord,
        ranged1d::ValueFormatter,
        types::{RangedCoordf64, RangedCoordi32},
    },
    prelude::*,
    style::{FontStyle, register_font},
};

use super::{
    report::{med, sizes},
    results::{ConnSample, Mode, Results},
};

static FONT: Once = Once::new();

fn font() {
    FONT.call_once(|| {
        // Only fails on a malformed font, which the crate's fixed bytes are not.
        let _ = register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular());
    });
}

fn color(m: Mode) -> RGBColor {
    match m {
        Mode::None => RGBColor(120, 120, 120),
        Mode::DirectToProxy => RGBColor(31, 119, 180),
        Mode::Iptables => RGBColor(214, 39, 40),
        Mode::Ebpf => RGBColor(44, 160, 44),
    }
}

const MODES: [Mode; 4] = [Mode::None, Mode::DirectToProxy, Mode::Iptables, Mode::Ebpf];

fn err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("drawing a plot: {e}")
}

/// Bounds around the finite positive values, with air below and room for the legend above.
fn bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let v: Vec<f64> = values.filter(|x| x.is_finite() && *x > 0.0).collect();
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(0.0, f64::max);
    if v.is_empty() {
        (1.0, 10.0)
    } else {
        (lo / 1.6, hi * 4.0)
    }
}

/// One panel: `metric` against N (categorical axis), one line per mode.
fn panel(
    area: &DrawingArea<BitMapBackend, Shift>,
    r: &Results,
    title: &str,
    y_desc: &str,
    threads: usize,
    metric: fn(&ConnSample) -> f64,
) -> Result<()> {
    let ns = sizes(r);
    let series: Vec<(Mode, Vec<(usize, f64)>)> = MODES
        .iter()
        .map(|&m| {
            let pts = ns
                .iter()
                .enumerate()
                .map(|(i, &n)| (i, med(r, n, threads, m, metric)))
                .filter(|(_, y)| y.is_finite() && *y > 0.0)
                .collect();
            (m, pts)
        })
        .collect();
    let (lo, hi) = bounds(series.iter().flat_map(|(_, p)| p.iter().map(|x| x.1)));
    let labels = Labels {
        title,
        y_desc,
        ns: &ns,
    };
    // A linear axis from 0 while the values stay within a factor of 20; a log axis beyond (it
    // takes iptables at large N, or tail latencies, to need one).
    if hi / lo < 20.0 * 4.0 * 1.6 {
        let y: RangedCoordf64 = (0.0..hi / 4.0 * 1.5).into();
        draw(area, &labels, y, &series)
    } else {
        let y: LogCoord<f64> = (lo..hi).log_scale().into();
        draw(area, &labels, y, &series)
    }
}

struct Labels<'a> {
    title: &'a str,
    y_desc: &'a str,
    ns: &'a [usize],
}

fn draw<Y>(
    area: &DrawingArea<BitMapBackend, Shift>,
    labels: &Labels,
    y: Y,
    series: &[(Mode, Vec<(usize, f64)>)],
) -> Result<()>
where
    Y: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    let ns = labels.ns;
    let x: RangedCoordi32 = (0..ns.len().max(2) as i32 - 1).into();
    let mut chart = ChartBuilder::on(area)
        .caption(labels.title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(42)
        .y_label_area_size(72)
        .build_cartesian_2d(x.into_segmented(), y)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("exclusion-list size N")
        .y_desc(labels.y_desc)
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => {
                ns.get(*i as usize).map_or(String::new(), |n| n.to_string())
            }
            _ => String::new(),
        })
        .y_label_formatter(&|y| format!("{y:.0}"))
        .y_labels(6)
        .max_light_lines(4)
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(err)?;
    for (m, pts) in series {
        if pts.is_empty() {
            continue;
        }
        let c = color(*m);
        // Wider, so that ebpf drawn on top of it at the same values leaves it visible.
        let width = if *m == Mode::DirectToProxy { 6 } else { 2 };
        let at = |i: usize| SegmentValue::CenterOf(i as i32);
        chart
            .draw_series(LineSeries::new(
                pts.iter().map(|&(i, y)| (at(i), y)),
                c.stroke_width(width),
            ))
            .map_err(err)?
            .label(m.name())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(width))
            });
        chart
            .draw_series(
                pts.iter()
                    .map(|&(i, y)| Circle::new((at(i), y), 4, c.filled())),
            )
            .map_err(err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(err)?;
    Ok(())
}

/// conn/s against N, one panel per client thread count.
pub fn conn_per_s(r: &Results, path: &Path) -> Result<()> {
    font();
    let threads = &r.params.threads;
    let root = BitMapBackend::new(path, (560 * threads.len() as u32, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    for (area, &t) in root.split_evenly((1, threads.len())).iter().zip(threads) {
        let title = format!(
            "new connections/s, {t} client thread{}",
            if t == 1 { "" } else { "s" }
        );
        panel(area, r, &title, "connections per second", t, |s| {
            s.conns_per_s
        })?;
    }
    root.present().map_err(err)?;
    Ok(())
}

/// Connect latency p50 and p99 against N (1 client thread).
pub fn latency(r: &Results, path: &Path) -> Result<()> {
    font();
    let root = BitMapBackend::new(path, (1120, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let areas = root.split_evenly((1, 2));
    panel(
        &areas[0],
        r,
        "connect() latency p50, 1 thread",
        "µs",
        1,
        |s| s.connect_p50_us,
    )?;
    panel(
        &areas[1],
        r,
        "connect() latency p99, 1 thread",
        "µs",
        1,
        |s| s.connect_p99_us,
    )?;
    root.present().map_err(err)?;
    Ok(())
}
