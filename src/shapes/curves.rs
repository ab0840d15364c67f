//! The study's results: one point per (arm, seed, step), written as CSV, drawn as
//! learning curves with seed bands (PNG), and summed up as a markdown table of final
//! accuracy and the steps each arm needs to reach its baseline's final accuracy.

use anyhow::{Context, Result};
use plotters::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// One evaluation of one run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Point {
    /// `class` or `caption`.
    pub condition: String,
    /// `sit`, `repa` or `reg`.
    pub method: String,
    pub seed: u64,
    pub step: i64,
    /// Images whose every asked attribute was read back (class: the shape; caption: the
    /// attributes the caption mentions).
    pub accuracy: f64,
    /// Shape read back right (asked by both conditions: the comparable number).
    pub shape_accuracy: f64,
    /// Per attribute a caption asked for: the share read back right (empty where no
    /// image was asked for it, as in the class condition).
    pub colour_accuracy: Option<f64>,
    pub size_accuracy: Option<f64>,
    pub position_accuracy: Option<f64>,
    /// Images the scorer found an object in.
    pub readable: f64,
    /// Total variation between generated and real attribute distributions (joint).
    pub distance: f64,
    /// The same per attribute, averaged over the four (the joint one needs many more
    /// images than an evaluation draws before it leaves 1).
    pub marginal_distance: f64,
}

pub fn write_csv(path: &Path, points: &[Point]) -> Result<()> {
    let mut w = csv_writer(path)?;
    for p in points {
        w.serialize(p)?;
    }
    w.flush()?;
    Ok(())
}

fn csv_writer(path: &Path) -> Result<csv::Writer<std::fs::File>> {
    csv::Writer::from_path(path).with_context(|| format!("{}: cannot write", path.display()))
}

/// (condition, method) -> step -> values over seeds.
type Curves = BTreeMap<(String, String), BTreeMap<i64, Vec<f64>>>;

fn curves(points: &[Point], value: impl Fn(&Point) -> f64) -> Curves {
    let mut c: Curves = BTreeMap::new();
    for p in points {
        c.entry((p.condition.clone(), p.method.clone())).or_default().entry(p.step).or_default().push(value(p));
    }
    c
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

const METHODS: [&str; 3] = ["sit", "repa", "reg"];

fn label(method: &str) -> &'static str {
    match method {
        "sit" => "SiT",
        "repa" => "SiT + REPA",
        "reg" => "SiT + REG",
        _ => "?",
    }
}

fn colour(method: &str) -> RGBColor {
    match method {
        "sit" => RGBColor(120, 120, 120),
        "repa" => RGBColor(31, 119, 180),
        _ => RGBColor(214, 39, 40),
    }
}

/// Registers a sans-serif face for the labels: DejaVu Sans where the system has it
/// (`launch/setup.sh` installs `fonts-dejavu-core`). Without one the plot has no text.
fn register_font() -> bool {
    for p in ["/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "/usr/share/fonts/TTF/DejaVuSans.ttf"] {
        if let Ok(bytes) = std::fs::read(p) {
            // The font lives as long as the process: plotters keeps a `'static` reference.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                return true;
            }
        }
    }
    false
}

/// One panel per condition: accuracy against steps, the mean over seeds as a line and
/// the seeds' range as a band, one colour per method.
pub fn plot(path: &Path, points: &[Point]) -> Result<()> {
    let text = register_font();
    let c = curves(points, |p| p.accuracy);
    let conditions: Vec<String> =
        points.iter().map(|p| p.condition.clone()).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
    let max_step = points.iter().map(|p| p.step).max().unwrap_or(1).max(1);
    // Drawn into memory and written by `image`: plotters' own PNG encoder would build a
    // second, older `image` crate into the binary.
    let (w, h) = (560 * conditions.len().max(1) as u32, 420);
    let mut pixels = vec![0u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let panels = root.split_evenly((1, conditions.len().max(1)));
        for (panel, cond) in panels.iter().zip(&conditions) {
            let mut b = ChartBuilder::on(panel);
            b.margin(12).x_label_area_size(36).y_label_area_size(44);
            if text {
                b.caption(format!("{cond} condition"), ("sans-serif", 20));
            }
            let mut chart = b.build_cartesian_2d(0i64..max_step, 0f64..1f64).map_err(|e| anyhow::anyhow!("plot: {e}"))?;
            let mut mesh = chart.configure_mesh();
            if text {
                mesh.x_desc("training step").y_desc("attribute accuracy (asked)");
            } else {
                mesh.disable_x_mesh().disable_y_mesh();
            }
            mesh.draw().map_err(|e| anyhow::anyhow!("plot: {e}"))?;
            for m in METHODS {
                let Some(curve) = c.get(&(cond.clone(), m.to_string())) else { continue };
                let col = colour(m);
                let lo: Vec<(i64, f64)> = curve.iter().map(|(s, v)| (*s, v.iter().cloned().fold(f64::INFINITY, f64::min))).collect();
                let hi: Vec<(i64, f64)> = curve.iter().map(|(s, v)| (*s, v.iter().cloned().fold(f64::NEG_INFINITY, f64::max))).collect();
                let band: Vec<(i64, f64)> = hi.iter().cloned().chain(lo.iter().rev().cloned()).collect();
                chart.draw_series(std::iter::once(Polygon::new(band, col.mix(0.2)))).map_err(|e| anyhow::anyhow!("plot: {e}"))?;
                let line: Vec<(i64, f64)> = curve.iter().map(|(s, v)| (*s, mean(v))).collect();
                let series = chart.draw_series(LineSeries::new(line, col.stroke_width(2))).map_err(|e| anyhow::anyhow!("plot: {e}"))?;
                if text {
                    series.label(label(m)).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], col.stroke_width(2)));
                }
            }
            if text {
                chart
                    .configure_series_labels()
                    .background_style(WHITE.mix(0.8))
                    .border_style(BLACK)
                    .position(SeriesLabelPosition::LowerRight)
                    .draw()
                    .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
            }
        }
        root.present().map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    }
    let img = image::RgbImage::from_raw(w, h, pixels).expect("the buffer holds w x h RGB pixels");
    img.save(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(())
}

/// The step at which a curve's seed mean reaches `target`: linear between the two
/// evaluations around the crossing (evaluations are hundreds of steps apart), or the
/// first evaluation if that is already there.
fn steps_to(curve: &BTreeMap<i64, Vec<f64>>, target: f64) -> Option<f64> {
    let pts: Vec<(f64, f64)> = curve.iter().map(|(s, v)| (*s as f64, mean(v))).collect();
    let i = pts.iter().position(|(_, m)| *m >= target)?;
    if i == 0 {
        return Some(pts[0].0);
    }
    let ((s0, m0), (s1, m1)) = (pts[i - 1], pts[i]);
    Some(s0 + (target - m0) / (m1 - m0) * (s1 - s0))
}

/// Markdown: per condition and method, the final accuracy (mean and the seeds' range),
/// the final shape accuracy and distance, and the steps to reach SiT's final accuracy
/// with the speed-up over SiT's own step count.
pub fn table(points: &[Point]) -> String {
    let acc = curves(points, |p| p.accuracy);
    let shape = curves(points, |p| p.shape_accuracy);
    let dist = curves(points, |p| p.marginal_distance);
    let mut out = String::from(
        "| condition | method | seeds | final accuracy (mean, min-max) | final shape accuracy | attribute distance (marginals) | steps to SiT's final accuracy (interpolated) | speed-up |\n| --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    let conditions: std::collections::BTreeSet<&String> = acc.keys().map(|(c, _)| c).collect();
    for cond in conditions {
        let base = acc.get(&(cond.clone(), "sit".into()));
        let base_final = base.and_then(|c| c.iter().next_back()).map(|(s, v)| (*s, mean(v)));
        for m in METHODS {
            let key = (cond.clone(), m.to_string());
            let Some(curve) = acc.get(&key) else { continue };
            let Some((_, last)) = curve.iter().next_back() else { continue };
            let (lo, hi) = (last.iter().cloned().fold(f64::INFINITY, f64::min), last.iter().cloned().fold(f64::NEG_INFINITY, f64::max));
            let last_of = |c: &Curves| c.get(&key).and_then(|c| c.iter().next_back()).map(|(_, v)| mean(v)).unwrap_or(f64::NAN);
            let (reach, speed) = match base_final {
                Some((base_step, target)) => match steps_to(curve, target) {
                    Some(s) => (format!("{s:.0}"), format!("{:.2}x", base_step as f64 / s.max(1.0))),
                    None => ("not reached".into(), "-".into()),
                },
                None => ("-".into(), "-".into()),
            };
            out += &format!(
                "| {cond} | {} | {} | {:.3} ({lo:.3}-{hi:.3}) | {:.3} | {:.3} | {reach} | {speed} |\n",
                label(m),
                last.len(),
                mean(last),
                last_of(&shape),
                last_of(&dist),
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(method: &str, seed: u64, step: i64, accuracy: f64) -> Point {
        Point {
            condition: "class".into(),
            method: method.into(),
            seed,
            step,
            accuracy,
            shape_accuracy: accuracy,
            colour_accuracy: None,
            size_accuracy: None,
            position_accuracy: None,
            readable: 1.0,
            distance: 0.5,
            marginal_distance: 0.1,
        }
    }

    #[test]
    fn the_table_counts_steps_to_the_baselines_final_accuracy() {
        let mut pts = Vec::new();
        for seed in 0..2 {
            for (step, sit, reg) in [(100, 0.1, 0.3), (200, 0.2, 0.5), (400, 0.4, 0.6)] {
                pts.push(p("sit", seed, step, sit));
                pts.push(p("reg", seed, step, reg + seed as f64 * 0.01));
            }
        }
        let t = table(&pts);
        // SiT ends at 0.4 after 400 steps; REG's mean (0.305, 0.505 at steps 100, 200)
        // passes 0.4 at step 147.5: 2.71x.
        assert!(t.contains("| class | SiT + REG | 2 | 0.605 (0.600-0.610) | 0.605 | 0.100 | 148 | 2.71x |"), "{t}");
        assert!(t.contains("| class | SiT | 2 | 0.400 (0.400-0.400) | 0.400 | 0.100 | 400 | 1.00x |"), "{t}");
    }
}
