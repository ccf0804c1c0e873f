//! Training curves as pictures: the loss and the learning rate against the optimizer step, read
//! from a training output's `trainer_state.json` and drawn as PNG and SVG side by side with it,
//! for one run or several compared in one picture.
//!
//! Text is drawn with an ASCII subset of DejaVu Sans compiled into the binary (10 KB, made by
//! `scripts/fixtures/make_plot_font.sh`), so a picture looks the same on every machine and no
//! system font library is needed.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::FontStyle;
use tevatron_ir::atomic::AtomicFile;

/// The ASCII subset of DejaVu Sans (license: `assets/DejaVuSans-LICENSE.txt`).
static FONT: &[u8] = include_bytes!("../assets/DejaVuSans-ascii.ttf");

/// Picture size in pixels (SVG units for the SVG).
const SIZE: (u32, u32) = (1200, 450);

/// One logged step of `log_history`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Logged {
    /// Optimizer step.
    pub step: f64,
    /// Mean training loss over the logging window.
    pub loss: f64,
    /// Learning rate at the step.
    pub learning_rate: f64,
}

/// Reads the logged steps (entries with `step`, `loss` and `learning_rate`, as the trainer and
/// Hugging Face's Trainer write them) of `dir/trainer_state.json`.
pub fn read_log(dir: &Path) -> Result<Vec<Logged>> {
    let path = dir.join("trainer_state.json");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!("could not read {} (is it a training output folder?)", path.display())
    })?;
    let state: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: malformed JSON", path.display()))?;
    let Some(history) = state.get("log_history").and_then(|h| h.as_array()) else {
        bail!("{}: field `log_history` must be a list", path.display());
    };
    let number = |e: &serde_json::Value, k: &str| e.get(k).and_then(|v| v.as_f64());
    let log: Vec<Logged> = history
        .iter()
        .filter_map(|e| {
            Some(Logged {
                step: number(e, "step")?,
                loss: number(e, "loss")?,
                learning_rate: number(e, "learning_rate")?,
            })
        })
        .filter(|l| l.step.is_finite() && l.loss.is_finite() && l.learning_rate.is_finite())
        .collect();
    if log.is_empty() {
        bail!(
            "{}: no logged step with `step`, `loss` and `learning_rate` (train with --logging_steps \
             smaller than the number of steps)",
            path.display()
        );
    }
    Ok(log)
}

/// The validation entries of `dir/trainer_state.json` (`eval_*` measures at a `step`, as
/// validation during training logs them): `(measure, [(step, value)])`, measures sorted.
pub fn read_evals(dir: &Path) -> Vec<(String, Vec<(f64, f64)>)> {
    let text = std::fs::read_to_string(dir.join("trainer_state.json")).unwrap_or_default();
    let state: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    let mut by_measure: std::collections::BTreeMap<String, Vec<(f64, f64)>> = Default::default();
    for e in state.get("log_history").and_then(|h| h.as_array()).into_iter().flatten() {
        let Some(step) = e.get("step").and_then(|v| v.as_f64()) else { continue };
        for (k, v) in e.as_object().into_iter().flatten() {
            // Timings Hugging Face logs beside the measures are not measures (`runtime`,
            // `samples_per_second`, `model_preparation_time`).
            let measure = k.strip_prefix("eval_").filter(|m| {
                *m != "runtime" && !m.ends_with("_per_second") && !m.ends_with("_time")
            });
            if let (Some(m), Some(v)) = (measure, v.as_f64().filter(|v| v.is_finite())) {
                by_measure.entry(m.to_string()).or_default().push((step, v));
            }
        }
    }
    by_measure.into_iter().collect()
}

/// Draws `dir/training_curves.png` and `.svg` from `dir/trainer_state.json`; returns their paths.
/// Each file is written under a temporary name and renamed.
pub fn plot_training(dir: &Path) -> Result<Vec<PathBuf>> {
    let log = read_log(dir)?;
    let evals = read_evals(dir);
    let title = dir
        .canonicalize()
        .ok()
        .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default();
    save_pictures(
        &dir.join("training_curves"),
        |svg| draw(svg, &log, &evals, &title),
        |png| draw(png, &log, &evals, &title),
    )
    .with_context(|| format!("drawing the curves of {}", dir.join("trainer_state.json").display()))
}

/// Draws one picture as `<stem>.svg` and `<stem>.png` (`draw_svg` and `draw_png` draw the same
/// thing on the two backends), each written under a temporary name and renamed; returns the
/// PNG's and the SVG's paths.
fn save_pictures(
    stem: &Path,
    draw_svg: impl FnOnce(DrawingArea<SVGBackend, Shift>) -> Result<()>,
    draw_png: impl FnOnce(DrawingArea<BitMapBackend, Shift>) -> Result<()>,
) -> Result<Vec<PathBuf>> {
    register_font()?;
    let svg_path = stem.with_extension("svg");
    let mut svg = String::new();
    draw_svg(SVGBackend::with_string(&mut svg, SIZE).into_drawing_area())?;
    let mut file = AtomicFile::create(&svg_path)?;
    std::io::Write::write_all(&mut file, svg.as_bytes()).map_err(|e| file.err(e))?;
    file.commit()?;
    let png_path = stem.with_extension("png");
    let mut rgb = vec![0u8; (SIZE.0 * SIZE.1 * 3) as usize];
    draw_png(BitMapBackend::with_buffer(&mut rgb, SIZE).into_drawing_area())?;
    write_png(&png_path, &rgb, SIZE)?;
    Ok(vec![png_path, svg_path])
}

/// Draws the training curves of several runs in one picture, `training_curves_compared.png` and
/// `.svg` in the first run's folder: each run's training loss (its moving mean, the points
/// faint) and learning rate in its own colour (six, then again), named in the legend by
/// `labels` (one per run).
/// Returns the files' paths.
pub fn plot_comparison(runs: &[PathBuf], labels: &[String]) -> Result<Vec<PathBuf>> {
    if runs.len() < 2 || labels.len() != runs.len() {
        bail!("a comparison needs two runs or more, one label each");
    }
    let logs: Vec<(String, Vec<Logged>)> = runs
        .iter()
        .zip(labels)
        .map(|(dir, label)| Ok((label.clone(), read_log(dir)?)))
        .collect::<Result<_>>()?;
    save_pictures(
        &runs[0].join("training_curves_compared"),
        |svg| draw_comparison(svg, &logs),
        |png| draw_comparison(png, &logs),
    )
}

/// Encodes an RGB buffer as PNG (the png crate) and writes it via temp + rename.
fn write_png(path: &Path, rgb: &[u8], size: (u32, u32)) -> Result<()> {
    let mut file = AtomicFile::create(path)?;
    {
        let mut encoder = png::Encoder::new(&mut file, size.0, size.1);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        encoder.set_compression(png::Compression::Best);
        let mut writer = encoder
            .write_header()
            .with_context(|| format!("could not write {}", path.display()))?;
        writer
            .write_image_data(rgb)
            .with_context(|| format!("could not write {}", path.display()))?;
    }
    file.commit()?;
    Ok(())
}

/// The histogram of where the positives ranked in `tevatron mine`'s search, one bar per rank
/// bucket (`(label, count)`, the last counting positives beyond `depth`), as a PNG at `path`.
pub fn plot_rank_histogram(path: &Path, buckets: &[(String, usize)], depth: usize) -> Result<()> {
    const HIST: (u32, u32) = (800, 400);
    register_font()?;
    let mut rgb = vec![0u8; (HIST.0 * HIST.1 * 3) as usize];
    {
        let area = BitMapBackend::with_buffer(&mut rgb, HIST).into_drawing_area();
        let fail = |e: &dyn std::fmt::Display| anyhow::anyhow!("drawing {}: {e}", path.display());
        area.fill(&WHITE).map_err(|e| fail(&e))?;
        let top = buckets.iter().map(|b| b.1).max().unwrap_or(0).max(1) as f64 * 1.1;
        let labels: Vec<String> = buckets.iter().map(|b| b.0.clone()).collect();
        let mut chart = ChartBuilder::on(&area)
            .caption(
                format!("where the positives rank (exact search, depth {depth})"),
                ("sans-serif", 20),
            )
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(60)
            // A segmented integer range holds its end too: 0..len-1 is one segment a bucket.
            .build_cartesian_2d((0..buckets.len().max(1) - 1).into_segmented(), 0f64..top)
            .map_err(|e| fail(&e))?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_desc("rank")
            .y_desc("positives")
            .x_label_formatter(&|x| match x {
                SegmentValue::CenterOf(i) => labels.get(*i).cloned().unwrap_or_default(),
                _ => String::new(),
            })
            .y_label_formatter(&whole)
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(|e| fail(&e))?;
        chart
            .draw_series(buckets.iter().enumerate().map(|(i, (_, n))| {
                let style = RGBColor(31, 119, 180).filled();
                let right = if i + 1 < buckets.len() {
                    SegmentValue::Exact(i + 1)
                } else {
                    SegmentValue::Last
                };
                Rectangle::new([(SegmentValue::Exact(i), 0.0), (right, *n as f64)], style)
            }))
            .map_err(|e| fail(&e))?;
        area.present().map_err(|e| fail(&e))?;
    }
    write_png(path, &rgb, HIST)
}

fn register_font() -> Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_ok()
    });
    if !ok {
        bail!("the plot font compiled into this binary is not a valid font");
    }
    Ok(())
}

/// The label of a tick on an axis of whole numbers (steps, counts): the number where the tick
/// is one, nothing between (rounded, a short range's ticks at 0.5 read "0" and "2").
fn whole(v: &f64) -> String {
    if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        String::new()
    }
}

/// A range with a margin, never empty (a constant learning rate still gets an axis). Values
/// whose range is beyond an `f64` (a loss of 1e308 beside one of -1e308) are refused: the axis
/// would be infinite, and drawing its ticks never ended.
fn padded(values: impl Iterator<Item = f64> + Clone, from_zero: bool) -> Result<Range<f64>> {
    let lo = values.clone().fold(f64::INFINITY, f64::min);
    let hi = values.fold(f64::NEG_INFINITY, f64::max);
    let lo = if from_zero { lo.min(0.0) } else { lo };
    let span = if hi > lo { hi - lo } else { hi.abs().max(1e-12) };
    let range = if from_zero { lo } else { lo - 0.05 * span }..hi + 0.05 * span;
    if !(range.start.is_finite() && range.end.is_finite()) {
        bail!("logged values from {lo:e} to {hi:e} are too far apart to draw");
    }
    Ok(range)
}

/// One panel of the picture: what it shows and how.
struct Panel {
    caption: &'static str,
    color: RGBColor,
    value: fn(&Logged) -> f64,
    /// Whether the axis starts at zero (the learning rate warms up from it).
    from_zero: bool,
    /// Whether a moving mean is drawn over the points (a batch loss is noisy).
    smooth: bool,
    /// Whether the validation loss (`eval_loss`) is drawn here too, on the same scale.
    eval_loss: bool,
}

const PANELS: [Panel; 2] = [
    Panel {
        caption: "training loss",
        color: RGBColor(31, 119, 180),
        value: |l| l.loss,
        from_zero: false,
        smooth: true,
        eval_loss: true,
    },
    Panel {
        caption: "learning rate",
        color: RGBColor(214, 39, 40),
        value: |l| l.learning_rate,
        from_zero: true,
        smooth: false,
        eval_loss: false,
    },
];

/// Colours of the validation measures, in order.
const EVAL_COLORS: [RGBColor; 4] = [
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(23, 190, 207),
];

fn draw<B: DrawingBackend>(
    area: DrawingArea<B, Shift>,
    log: &[Logged],
    evals: &[(String, Vec<(f64, f64)>)],
    title: &str,
) -> Result<()>
where
    B::ErrorType: 'static,
{
    let fail = |e: DrawingAreaErrorKind<B::ErrorType>| anyhow::anyhow!("drawing the plot: {e}");
    area.fill(&WHITE).map_err(fail)?;
    let heading =
        if title.is_empty() { "training".to_string() } else { format!("training: {title}") };
    let area = area.titled(&heading, ("sans-serif", 24)).map_err(fail)?;
    // The validation loss shares the training loss's panel; the retrieval measures (all in
    // [0, 1]) have their own.
    let eval_loss = evals.iter().find(|(m, _)| m == "loss").map(|(_, p)| p.as_slice());
    let evals: Vec<&(String, Vec<(f64, f64)>)> =
        evals.iter().filter(|(m, _)| m != "loss").collect();
    let panels = if evals.is_empty() { 2 } else { 3 };
    let areas = area.split_evenly((1, panels));
    let steps = {
        let eval_steps = evals
            .iter()
            .flat_map(|(_, p)| p.iter().map(|p| p.0))
            .chain(eval_loss.unwrap_or_default().iter().map(|p| p.0));
        let last = log.iter().map(|l| l.step).chain(eval_steps).fold(0.0, f64::max);
        0.0..last.max(1.0) * 1.02
    };
    if let Some(area) = areas.get(2) {
        // Zoomed to the measures' own range, so that a change of 0.02 shows.
        let values = padded(evals.iter().flat_map(|(_, p)| p.iter().map(|p| p.1)), false)?;
        let mut chart = panel_chart(area, "validation", steps.clone(), values, None)?;
        for ((measure, points), color) in evals.iter().zip(EVAL_COLORS.iter().cycle()) {
            let color = *color;
            chart
                .draw_series(LineSeries::new(points.iter().copied(), color.stroke_width(2)))
                .map_err(fail)?
                .label(measure.as_str())
                .legend(swatch(color));
            chart
                .draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(fail)?;
        }
        draw_legend(&mut chart, SeriesLabelPosition::MiddleRight)?;
    }
    for (area, panel) in areas.iter().zip(PANELS) {
        let (value, color) = (panel.value, panel.color);
        let eval_values =
            eval_loss.filter(|_| panel.eval_loss).unwrap_or_default().iter().map(|p| p.1);
        let values = padded(log.iter().map(value).chain(eval_values), panel.from_zero)?;
        let caption = panel.caption;
        let mut chart = panel_chart(area, caption, steps.clone(), values, Some(caption))?;
        let points: Vec<(f64, f64)> = log.iter().map(|l| (l.step, value(l))).collect();
        let smoothed = if panel.smooth { moving_mean(&points, SMOOTH_WINDOW) } else { None };
        // With a smoothed line on top, the raw points are drawn lighter.
        let raw = if smoothed.is_some() { color.mix(0.35) } else { color.to_rgba() };
        chart
            .draw_series(LineSeries::new(points.iter().copied(), raw.stroke_width(2)))
            .map_err(fail)?;
        chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, raw.filled()))).map_err(fail)?;
        let mut legend = false;
        if let Some(line) = smoothed {
            chart
                .draw_series(LineSeries::new(line, color.stroke_width(3)))
                .map_err(fail)?
                .label(format!("mean of {SMOOTH_WINDOW} logged steps"))
                .legend(swatch(color));
            legend = true;
        }
        if let Some(points) = eval_loss.filter(|_| panel.eval_loss) {
            let color = EVAL_COLORS[0];
            chart
                .draw_series(LineSeries::new(points.iter().copied(), color.stroke_width(2)))
                .map_err(fail)?
                .label("eval_loss")
                .legend(swatch(color));
            chart
                .draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(fail)?;
            legend = true;
        }
        if legend {
            draw_legend(&mut chart, SeriesLabelPosition::UpperRight)?;
        }
    }
    area.present().map_err(fail)?;
    Ok(())
}

/// Colours of the runs of a comparison, in order.
const RUN_COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// [`plot_comparison`]'s picture: the two panels of [`draw`], a line per run.
fn draw_comparison<B: DrawingBackend>(
    area: DrawingArea<B, Shift>,
    runs: &[(String, Vec<Logged>)],
) -> Result<()>
where
    B::ErrorType: 'static,
{
    let fail = |e: DrawingAreaErrorKind<B::ErrorType>| anyhow::anyhow!("drawing the plot: {e}");
    area.fill(&WHITE).map_err(fail)?;
    let area = area.titled("training: compared", ("sans-serif", 24)).map_err(fail)?;
    let last = runs.iter().flat_map(|(_, log)| log.iter().map(|l| l.step)).fold(0.0, f64::max);
    let steps = 0.0..last.max(1.0) * 1.02;
    for (area, panel) in area.split_evenly((1, 2)).iter().zip(PANELS) {
        let value = panel.value;
        let values =
            padded(runs.iter().flat_map(|(_, log)| log.iter().map(value)), panel.from_zero)?;
        let caption = panel.caption;
        let mut chart = panel_chart(area, caption, steps.clone(), values, Some(caption))?;
        for ((label, log), &color) in runs.iter().zip(RUN_COLORS.iter().cycle()) {
            let points: Vec<(f64, f64)> = log.iter().map(|l| (l.step, value(l))).collect();
            let smoothed = if panel.smooth { moving_mean(&points, SMOOTH_WINDOW) } else { None };
            if smoothed.is_some() {
                let faint = color.mix(0.3);
                chart
                    .draw_series(points.iter().map(|&p| Circle::new(p, 2, faint.filled())))
                    .map_err(fail)?;
            }
            chart
                .draw_series(LineSeries::new(smoothed.unwrap_or(points), color.stroke_width(2)))
                .map_err(fail)?
                .label(label.as_str())
                .legend(swatch(color));
        }
        draw_legend(&mut chart, SeriesLabelPosition::UpperRight)?;
    }
    area.present().map_err(fail)?;
    Ok(())
}

/// The legend's mark of a series drawn in `color`: a short thick line.
fn swatch(color: RGBColor) -> impl Fn((i32, i32)) -> PathElement<(i32, i32)> {
    move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(3))
}

/// A panel's chart over `steps` and `values`, with its caption and the light grid every panel
/// shares; `y_desc` names the value axis (whose numbers are then kept short).
fn panel_chart<'a, B: DrawingBackend>(
    area: &'a DrawingArea<B, Shift>,
    caption: &str,
    steps: Range<f64>,
    values: Range<f64>,
    y_desc: Option<&str>,
) -> Result<Chart<'a, B>>
where
    B::ErrorType: 'static,
{
    let fail = |e: DrawingAreaErrorKind<B::ErrorType>| anyhow::anyhow!("drawing the plot: {e}");
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(steps, values)
        .map_err(fail)?;
    let short = |v: &f64| format_number(*v);
    let mut mesh = chart.configure_mesh();
    mesh.light_line_style(RGBColor(240, 240, 240))
        .bold_line_style(RGBColor(215, 215, 215))
        .x_desc("step")
        .label_style(("sans-serif", 13))
        .axis_desc_style(("sans-serif", 15))
        .x_label_formatter(&whole);
    if let Some(desc) = y_desc {
        mesh.y_desc(desc).y_label_formatter(&short);
    }
    mesh.draw().map_err(fail)?;
    Ok(chart)
}

/// A chart of a training picture: steps against values.
type Chart<'a, B> = ChartContext<'a, B, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// The legend of a panel's labelled series, at `position`.
fn draw_legend<'a, B: DrawingBackend + 'a>(
    chart: &mut Chart<'a, B>,
    position: SeriesLabelPosition,
) -> Result<()>
where
    B::ErrorType: 'static,
{
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.8))
        .border_style(RGBColor(215, 215, 215))
        .label_font(("sans-serif", 13))
        .draw()
        .map_err(|e| anyhow::anyhow!("drawing the plot: {e}"))
}

/// Logged steps averaged by the loss panel's smoothed line.
const SMOOTH_WINDOW: usize = 5;

/// The centred moving mean of `points` over `window` points (shorter at the ends), or `None`
/// when there are too few points for it to say more than the points themselves.
fn moving_mean(points: &[(f64, f64)], window: usize) -> Option<Vec<(f64, f64)>> {
    if points.len() < 2 * window {
        return None;
    }
    let half = window / 2;
    Some(
        (0..points.len())
            .map(|i| {
                let span = &points[i.saturating_sub(half)..(i + half + 1).min(points.len())];
                (points[i].0, span.iter().map(|p| p.1).sum::<f64>() / span.len() as f64)
            })
            .collect(),
    )
}

/// Axis labels short enough for the label area: `2e-5` rather than `0.00002`.
fn format_number(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() < 1e-3 || v.abs() >= 1e5 {
        let s = format!("{v:.1e}");
        s.replace(".0e", "e")
    } else {
        let s = format!("{v:.4}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_state(dir: &Path, history: serde_json::Value) {
        let state = serde_json::json!({"global_step": 30, "log_history": history});
        std::fs::write(dir.join("trainer_state.json"), state.to_string()).unwrap();
    }

    /// Losses beyond any axis (1e308 and -1e308: their span is infinite) are refused, where
    /// drawing them never ended; no picture is left behind.
    #[test]
    fn values_too_far_apart_to_draw_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        write_state(
            dir.path(),
            serde_json::json!([
                {"step": 1, "loss": 1e308, "learning_rate": 2e-5},
                {"step": 2, "loss": -1e308, "learning_rate": 1e-5}
            ]),
        );
        let e = format!("{:#}", plot_training(dir.path()).unwrap_err());
        assert!(e.contains("too far apart to draw"), "{e}");
        assert!(e.contains("trainer_state.json"), "the file is named: {e}");
        assert!(!dir.path().join("training_curves.png").exists());
        assert_eq!(padded([0.5, 1.5].into_iter(), true).unwrap(), 0.0..1.575);
    }

    /// Axes of whole numbers label their whole ticks only (rounded, 0.5 read "0").
    #[test]
    fn whole_number_axes_label_whole_ticks() {
        let labels: Vec<String> = [0.0, 0.5, 1.0, 1.5, 2.0, 1e6].iter().map(whole).collect();
        assert_eq!(labels, ["0", "", "1", "", "2", "1000000"]);
    }

    #[test]
    fn reads_logged_steps_and_skips_the_summary() {
        let dir = tempfile::tempdir().unwrap();
        write_state(
            dir.path(),
            serde_json::json!([
                {"step": 10, "epoch": 0.5, "loss": 0.9, "grad_norm": 3.0, "learning_rate": 2e-5},
                {"step": 20, "epoch": 1.0, "loss": 0.5, "grad_norm": 2.0, "learning_rate": 1e-5},
                {"step": 20, "train_loss": 0.7, "train_runtime": 12.0}
            ]),
        );
        let log = read_log(dir.path()).unwrap();
        assert_eq!(
            log,
            [
                Logged { step: 10.0, loss: 0.9, learning_rate: 2e-5 },
                Logged { step: 20.0, loss: 0.5, learning_rate: 1e-5 }
            ]
        );
    }

    #[test]
    fn validation_entries_are_read_by_measure_and_drawn_in_a_third_panel() {
        let dir = tempfile::tempdir().unwrap();
        let mut history: Vec<_> = (1..=6)
            .map(|s| serde_json::json!({"step": s, "loss": 1.0 / s as f64, "learning_rate": 2e-5}))
            .collect();
        for s in [2, 4, 6] {
            history.push(serde_json::json!({"step": s, "eval_ndcg@10": s as f64 / 10.0,
                                            "eval_mrr@10": 0.1, "eval_runtime": 3.5,
                                            "eval_model_preparation_time": 0.002,
                                            "eval_samples_per_second": 9.0}));
        }
        write_state(dir.path(), serde_json::Value::Array(history));
        let evals = read_evals(dir.path());
        let names: Vec<&str> = evals.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(names, ["mrr@10", "ndcg@10"], "timings are not measures");
        assert_eq!(evals[1].1, [(2.0, 0.2), (4.0, 0.4), (6.0, 0.6)]);
        let files = plot_training(dir.path()).unwrap();
        let svg = std::fs::read_to_string(&files[1]).unwrap();
        assert!(svg.contains("validation") && svg.contains("ndcg@10"), "the third panel is drawn");
    }

    #[test]
    fn the_validation_loss_is_drawn_beside_the_training_loss() {
        let dir = tempfile::tempdir().unwrap();
        let mut history: Vec<_> = (1..=6)
            .map(|s| serde_json::json!({"step": s, "loss": 1.0 / s as f64, "learning_rate": 2e-5}))
            .collect();
        history.push(serde_json::json!({"step": 3, "eval_loss": 7.5, "eval_runtime": 1.0}));
        write_state(dir.path(), serde_json::Value::Array(history));
        assert_eq!(read_evals(dir.path()), [("loss".to_string(), vec![(3.0, 7.5)])]);
        let files = plot_training(dir.path()).unwrap();
        let svg = std::fs::read_to_string(&files[1]).unwrap();
        assert!(svg.contains("eval_loss"), "the loss panel names the validation loss");
        assert!(!svg.contains("validation"), "no retrieval panel without retrieval measures");
    }

    #[test]
    fn draws_png_and_svg_with_the_curves() {
        let dir = tempfile::tempdir().unwrap();
        let history: Vec<_> = (1..=30)
            .map(|s| serde_json::json!({"step": s, "loss": 1.0 / s as f64, "learning_rate": 2e-5}))
            .collect();
        write_state(dir.path(), serde_json::Value::Array(history));
        let files = plot_training(dir.path()).unwrap();
        let png = std::fs::read(&files[0]).unwrap();
        assert_eq!(&png[1..4], b"PNG");
        // Width and height from the IHDR chunk.
        let dims = (
            u32::from_be_bytes(png[16..20].try_into().unwrap()),
            u32::from_be_bytes(png[20..24].try_into().unwrap()),
        );
        assert_eq!(dims, SIZE);
        let svg = std::fs::read_to_string(&files[1]).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..60]);
        assert!(svg.contains("training loss") && svg.contains("learning rate"));
        // One marker per logged step in each panel.
        assert_eq!(svg.matches("<circle").count(), 60);
        // No temporary file is left behind.
        let mut names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["trainer_state.json", "training_curves.png", "training_curves.svg"]);
    }

    #[test]
    fn runs_are_compared_in_one_picture_with_a_legend() {
        let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        for (k, dir) in dirs.iter().enumerate() {
            let history: Vec<_> = (1..=20)
                .map(|s| {
                    let loss = (k + 1) as f64 / s as f64;
                    serde_json::json!({"step": s, "loss": loss, "learning_rate": 2e-5})
                })
                .collect();
            write_state(dir.path(), serde_json::Value::Array(history));
        }
        let runs: Vec<PathBuf> = dirs.iter().map(|d| d.path().to_path_buf()).collect();
        let labels = ["f32 run".to_string(), "bf16 run".to_string()];
        let files = plot_comparison(&runs, &labels).unwrap();
        assert!(files[0].ends_with("training_curves_compared.png"));
        let png = std::fs::read(&files[0]).unwrap();
        assert_eq!(&png[1..4], b"PNG");
        let svg = std::fs::read_to_string(&files[1]).unwrap();
        assert!(svg.contains("f32 run") && svg.contains("bf16 run"), "the legend names the runs");
        // The loss panel's faint points: 20 a run (the learning rate has lines only).
        assert_eq!(svg.matches("<circle").count(), 40);
        assert!(plot_comparison(&runs[..1], &labels[..1]).is_err(), "one run is no comparison");
        let err = plot_comparison(&[runs[0].clone(), PathBuf::from("/nonexistent")], &labels)
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent"), "{err}");
    }

    #[test]
    fn a_state_without_logged_steps_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = read_log(dir.path()).unwrap_err().to_string();
        assert!(err.contains("trainer_state.json"), "{err}");
        write_state(dir.path(), serde_json::json!([{"step": 5, "train_loss": 0.7}]));
        let err = read_log(dir.path()).unwrap_err().to_string();
        assert!(err.contains("--logging_steps"), "{err}");
    }

    #[test]
    fn the_moving_mean_is_centred_and_needs_enough_points() {
        let points: Vec<(f64, f64)> = (0..10).map(|i| (i as f64, i as f64)).collect();
        let m = moving_mean(&points, 5).unwrap();
        assert_eq!(m[5], (5.0, 5.0));
        assert_eq!(m[0], (0.0, 1.0)); // mean of 0, 1, 2
        assert!(moving_mean(&points[..9], 5).is_none());
    }

    #[test]
    fn axis_numbers_stay_short() {
        assert_eq!(format_number(2e-5), "2e-5");
        assert_eq!(format_number(1.5e-5), "1.5e-5");
        assert_eq!(format_number(0.25), "0.25");
        assert_eq!(format_number(0.0), "0");
        assert_eq!(format_number(3.0), "3");
    }
}
