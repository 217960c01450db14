//! The training log in the output folder: `metrics.csv`, `metrics.json` and `curves.svg`.

use std::path::Path;

use crate::error::{Error, Result};
use plotters::prelude::*;

use crate::checkpoint::{replace_file, write_json, EpochRecord};

pub fn write_logs(out: &Path, history: &[EpochRecord]) -> Result<()> {
    let mut csv = String::from("epoch,lr,train_loss,train_top1,train_top5,val_loss,val_top1,val_top5,skipped,seconds,images_per_second\n");
    for r in history {
        csv += &format!(
            "{},{:e},{:.6},{:.4},{:.4},{:.6},{:.4},{:.4},{},{:.2},{:.2}\n",
            r.epoch, r.lr, r.train_loss, r.train_top1, r.train_top5, r.val_loss, r.val_top1, r.val_top5, r.skipped, r.seconds, r.images_per_second
        );
    }
    replace_file(&out.join("metrics.csv"), csv.as_bytes())?;
    write_json(&out.join("metrics.json"), &history, "writing the history")?;
    let svg = out.join("curves.svg");
    draw_curves(&svg, history).map_err(|e| Error::Draw { reason: e.to_string(), path: svg })
}

/// Loss and top-1 per epoch, train and val, side by side.
pub fn draw_curves(path: &Path, history: &[EpochRecord]) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (1000, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(500);
    let last = history.len().max(2) as f64;
    let epochs = |f: fn(&EpochRecord) -> f64| history.iter().map(move |r| (r.epoch as f64, f(r))).collect::<Vec<_>>();
    #[allow(clippy::type_complexity)] // a table of panels, read where it is written
    let panels: [(_, &str, [(fn(&EpochRecord) -> f64, &str, RGBColor); 2]); 2] = [
        (left, "loss", [(|r| r.train_loss, "train", BLUE), (|r| r.val_loss, "val", RED)]),
        (right, "top-1 (%)", [(|r| r.train_top1, "train", BLUE), (|r| r.val_top1, "val", RED)]),
    ];
    for (area, title, series) in panels {
        let values = series.iter().flat_map(|(f, _, _)| history.iter().map(f)).filter(|v| v.is_finite()).collect::<Vec<_>>();
        let lo = values.iter().copied().fold(f64::INFINITY, f64::min).min(0.0);
        let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max).max(lo + 1e-6) * 1.05;
        let mut chart = ChartBuilder::on(&area)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(1f64..last, lo..hi)?;
        chart.configure_mesh().x_desc("epoch").draw()?;
        for (f, name, color) in series {
            chart
                .draw_series(LineSeries::new(epochs(f), color.stroke_width(2)))?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
        }
        chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
    }
    root.present()?;
    Ok(())
}
