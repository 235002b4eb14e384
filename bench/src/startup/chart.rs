//! Bar charts in SVG: panels, a group of bars per image in each, one bar
//! per arm (its median, a whisker up to its p95 or maximum), drawn by
//! `plotters` (SVG text needs no fonts on this side: the viewer renders
//! it). [`draw`] is `startup`'s time-to-ready chart (a panel per network);
//! [`draw_panels`] takes any panels (`mirror`: bytes and seconds).

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

/// One bar.
#[derive(Debug, Clone)]
pub struct Row {
    pub image: String,
    /// The [`Panel::key`] of the panel it is drawn in (`startup`: the network).
    pub panel: String,
    pub arm: String,
    pub median: f64,
    pub p95: f64,
}

/// One panel of the chart.
#[derive(Debug, Clone)]
pub struct Panel {
    /// The rows whose [`Row::panel`] is this.
    pub key: String,
    pub caption: String,
    /// The y axis' name.
    pub y_desc: String,
}

/// `startup`'s arms have colours of their own; others take the palette's
/// in the order they come.
fn color(arm: &str, k: usize) -> RGBColor {
    const PALETTE: [RGBColor; 4] = [
        RGBColor(127, 127, 127),
        RGBColor(31, 119, 180),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
    ];
    match arm {
        "A" => RGBColor(214, 39, 40),
        "B" => RGBColor(31, 119, 180),
        "C" => RGBColor(44, 160, 44),
        "D-A" => RGBColor(240, 150, 150),
        "D-B" => RGBColor(150, 190, 230),
        _ => PALETTE[k % PALETTE.len()],
    }
}

/// Draws `rows` into the SVG file `path`, a panel per network of
/// `networks` (in that order): time to ready.
pub fn draw(path: &Path, rows: &[Row], networks: &[String]) -> Result<()> {
    let panels: Vec<Panel> = networks
        .iter()
        .map(|net| Panel {
            key: net.clone(),
            caption: format!("Time to ready (s), network {net}: median, whisker to p95"),
            y_desc: "seconds".into(),
        })
        .collect();
    draw_panels(path, rows, &panels)
}

/// Draws `rows` into the SVG file `path`, one panel of `panels` under the
/// other.
pub fn draw_panels(path: &Path, rows: &[Row], panels: &[Panel]) -> Result<()> {
    let e = |e: &dyn std::fmt::Display| anyhow!("drawing {}: {e}", path.display());
    let panels_n = panels.len().max(1);
    let root = SVGBackend::new(path, (960, 380 * panels_n as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let areas = root.split_evenly((panels_n, 1));
    for (area, spec) in areas.iter().zip(panels) {
        let rows: Vec<&Row> = rows.iter().filter(|r| r.panel == spec.key).collect();
        let mut images: Vec<&str> = Vec::new();
        let mut arms: Vec<&str> = Vec::new();
        for r in &rows {
            if !images.contains(&r.image.as_str()) {
                images.push(&r.image);
            }
            if !arms.contains(&r.arm.as_str()) {
                arms.push(&r.arm);
            }
        }
        let ymax = rows
            .iter()
            .map(|r| r.p95.max(r.median))
            .fold(0.0f64, f64::max)
            .max(0.1)
            * 1.2;
        let mut chart = ChartBuilder::on(area)
            .caption(&spec.caption, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(10)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..images.len().max(1) as f64, 0f64..ymax)
            .map_err(|x| e(&x))?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .y_desc(&spec.y_desc)
            .draw()
            .map_err(|x| e(&x))?;
        let width = 0.8 / arms.len().max(1) as f64;
        for (k, arm) in arms.iter().enumerate() {
            let c = color(arm, k);
            let bars: Vec<(f64, &Row)> = rows
                .iter()
                .filter(|r| r.arm == *arm)
                .filter_map(|r| {
                    let i = images.iter().position(|x| *x == r.image)?;
                    Some((i as f64 + 0.1 + k as f64 * width, *r))
                })
                .collect();
            chart
                .draw_series(bars.iter().map(|(x, r)| {
                    Rectangle::new([(*x, 0.0), (*x + width * 0.9, r.median)], c.filled())
                }))
                .map_err(|x| e(&x))?
                .label(arm.to_string())
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], c.filled()));
            chart
                .draw_series(bars.iter().map(|(x, r)| {
                    let mid = *x + width * 0.45;
                    PathElement::new(vec![(mid, r.median), (mid, r.p95)], BLACK)
                }))
                .map_err(|x| e(&x))?;
            chart
                .draw_series(bars.iter().map(|(x, r)| {
                    Text::new(
                        format!("{:.2}", r.median),
                        (*x, r.p95.max(r.median) + ymax * 0.01),
                        ("sans-serif", 10).into_font().color(&BLACK),
                    )
                }))
                .map_err(|x| e(&x))?;
        }
        chart
            .draw_series(images.iter().enumerate().map(|(i, name)| {
                Text::new(
                    name.to_string(),
                    (i as f64 + 0.1, ymax * 0.97),
                    ("sans-serif", 14).into_font().color(&BLACK),
                )
            }))
            .map_err(|x| e(&x))?;
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|x| e(&x))?;
    }
    root.present().map_err(|x| e(&x))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_every_bar_and_label() {
        let dir = std::env::temp_dir().join(format!("lpb-chart-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.svg");
        let row = |image: &str, arm: &str, median| Row {
            image: image.into(),
            panel: "1g".into(),
            arm: arm.into(),
            median,
            p95: median * 1.1,
        };
        let rows = vec![
            row("python", "A", 4.25),
            row("python", "B", 1.5),
            row("gcc", "A", 3.0),
        ];
        draw(&path, &rows, &["1g".to_string()]).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        for text in ["python", "gcc", "4.25", "1.50", "network 1g"] {
            assert!(svg.contains(text), "{text} not in the SVG");
        }
        assert!(svg.matches("<rect").count() >= 3, "{svg}");
    }
}
