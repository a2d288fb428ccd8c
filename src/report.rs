//! Output shared by commands: SVG plots of bits per value against KL divergence.

use std::path::Path;

use plotters::prelude::*;

/// One point of the quality/size plot.
#[derive(Debug, Clone)]
pub struct PlotPoint {
    pub label: String,
    pub bits_per_value: f64,
    pub kld_mean: f64,
    /// Profiles are drawn as filled diamonds, uniform caches as circles.
    pub is_profile: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("drawing {path}: {message}")]
    Draw { path: String, message: String },
    #[error("no points to plot")]
    Empty,
}

/// Bits per value (x) against mean KLD (y, log scale), every point labelled.
pub fn plot_bits_vs_kld(path: &Path, title: &str, points: &[PlotPoint]) -> Result<(), PlotError> {
    if points.is_empty() {
        return Err(PlotError::Empty);
    }
    let err = |e: &dyn std::fmt::Display| PlotError::Draw { path: path.display().to_string(), message: e.to_string() };
    let floor = 1e-5;
    let ys: Vec<f64> = points.iter().map(|p| p.kld_mean.max(floor)).collect();
    let (ymin, ymax) = ys.iter().fold((f64::MAX, f64::MIN), |(a, b), &y| (a.min(y), b.max(y)));
    let (xmin, xmax) =
        points.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.bits_per_value), b.max(p.bits_per_value)));

    let root = SVGBackend::new(path, (900, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(20)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d((xmin - 0.5)..(xmax + 1.0), (ymin / 2.0..ymax * 2.0).log_scale())
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("bits per cached value (block scales included)")
        .y_desc("mean KL divergence to f16 cache")
        .y_label_formatter(&|y| format!("{y:.0e}"))
        .draw()
        .map_err(|e| err(&e))?;

    let mut uniform: Vec<(f64, f64)> =
        points.iter().zip(&ys).filter(|(p, _)| !p.is_profile).map(|(p, &y)| (p.bits_per_value, y)).collect();
    uniform.sort_by(|a, b| a.0.total_cmp(&b.0));
    chart.draw_series(LineSeries::new(uniform, BLUE.mix(0.4))).map_err(|e| err(&e))?;
    for (p, &y) in points.iter().zip(&ys) {
        let at = (p.bits_per_value, y);
        let color = if p.is_profile { RED } else { BLUE };
        if p.is_profile {
            chart
                .draw_series(std::iter::once(Polygon::new(
                    vec![(at.0, y * 1.25), (at.0 + 0.12, y), (at.0, y / 1.25), (at.0 - 0.12, y)],
                    color.filled(),
                )))
                .map_err(|e| err(&e))?;
        } else {
            chart.draw_series(std::iter::once(Circle::new(at, 5, color.filled()))).map_err(|e| err(&e))?;
        }
        // profiles are labelled below their point, uniform caches above, so a profile and the
        // uniform cache of the same size stay readable
        let label_y = if p.is_profile { y / 1.45 } else { y * 1.08 };
        let label =
            if p.kld_mean < floor { format!("{} (KLD 0, drawn at {floor:.0e})", p.label) } else { p.label.clone() };
        chart
            .draw_series(std::iter::once(Text::new(
                label,
                (at.0 + 0.15, label_y),
                ("sans-serif", 14).into_font().color(&color),
            )))
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
