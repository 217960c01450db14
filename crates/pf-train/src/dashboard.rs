//! Burn's training dashboard (burn-train's terminal UI), fed by pf's own training loop.
//!
//! Burn's `Learner` drives its dashboard through a `MetricsRenderer`; pf has its own loop (exact
//! resume, data-parallel steps, parameter groups), so it feeds the same renderer itself: loss,
//! top-1, top-5 and learning rate after every step, the validation numbers after every epoch,
//! and the progress of the epoch and of the run. The dashboard's "stop the training" key ends
//! the run after the current step; the checkpoint of the last finished epoch stays resumable.
//!
//! While the dashboard owns the terminal nothing else may print, so the lines pf would print
//! (epoch summaries, warnings) are kept and printed once it has closed.

use std::io::IsTerminal;
use std::sync::Arc;

use crate::error::{Error, Result};
use burn::data::dataloader::Progress;
use burn_train::metric::{MetricAttributes, MetricDefinition, MetricEntry, MetricId, NumericAttributes, NumericEntry, SerializedEntry};
use burn_train::renderer::tui::TuiMetricsRendererWrapper;
use burn_train::renderer::{MetricState, MetricsRenderer, TrainingProgress};
use burn_train::Interrupter;

use crate::eval::EvalResult;
use crate::metrics::Meter;

/// The dashboard's metrics: name, unit, and whether higher is better.
pub const METRICS: [(&str, Option<&str>, bool); 4] =
    [("Loss", None, false), ("Top-1 accuracy", Some("%"), true), ("Top-5 accuracy", Some("%"), true), ("Learning rate", None, false)];

/// Why a run ended early: the user pressed the dashboard's stop key.
#[derive(Debug, thiserror::Error)]
#[error("training stopped from the dashboard during epoch {epoch}, after step {step}")]
pub struct StoppedByUser {
    pub epoch: usize,
    pub step: usize,
}

pub struct Dashboard {
    /// `None` once closed.
    renderer: Option<Box<dyn MetricsRenderer>>,
    interrupter: Interrupter,
    ids: Vec<MetricId>,
    epochs: usize,
    /// Lines to print once the dashboard has left the terminal.
    deferred: Vec<String>,
}

impl Dashboard {
    /// Fails unless standard output is a terminal, which the dashboard needs.
    pub fn check_terminal() -> Result<()> {
        if !std::io::stdout().is_terminal() {
            return Err(Error::flag("--dashboard", "needs a terminal on standard output (without it, pf prints a progress bar and one line per epoch)"));
        }
        Ok(())
    }

    /// Burn's terminal dashboard on standard output, which must be a terminal.
    pub fn open(epochs: usize) -> Result<Self> {
        Self::check_terminal()?;
        let interrupter = Interrupter::new();
        Ok(Self::with_renderer(Box::new(TuiMetricsRendererWrapper::new(interrupter.clone(), None)), interrupter, epochs))
    }

    /// The dashboard logic on any renderer; `interrupter` is the one the renderer stops.
    pub fn with_renderer(mut renderer: Box<dyn MetricsRenderer>, interrupter: Interrupter, epochs: usize) -> Self {
        let ids = METRICS
            .iter()
            .map(|&(name, unit, higher_is_better)| {
                let id = MetricId::new(Arc::new(name.to_string()));
                renderer.register_metric(MetricDefinition {
                    metric_id: id.clone(),
                    name: name.to_string(),
                    description: None,
                    attributes: MetricAttributes::Numeric(NumericAttributes { unit: unit.map(str::to_string), higher_is_better }),
                });
                id
            })
            .collect();
        Self { renderer: Some(renderer), interrupter, ids, epochs, deferred: Vec::new() }
    }

    /// After training step `step` (1-based) of `steps` in epoch `epoch` (0-based): the epoch's
    /// running loss and accuracies so far, and the step's learning rate.
    pub fn step(&mut self, epoch: usize, step: usize, steps: usize, meter: &Meter, lr: f64) {
        let progress = Progress { items_processed: step, items_total: steps };
        self.send(false, [meter.loss(), meter.top1(), meter.top5(), lr], epoch, progress, Some(epoch * steps + step));
    }

    /// After validating epoch `epoch` (0-based).
    pub fn validated(&mut self, epoch: usize, val: &EvalResult, lr: f64) {
        self.send(true, [val.loss, val.top1, val.top5, lr], epoch, Progress { items_processed: 1, items_total: 1 }, None);
    }

    /// The four metrics (in the order of [`METRICS`]) and the progress, to the train or the
    /// validation side of the renderer.
    fn send(&mut self, valid: bool, values: [f64; 4], epoch: usize, progress: Progress, iteration: Option<usize>) {
        let Some(renderer) = self.renderer.as_mut() else { return };
        for ((id, (_, unit, _)), value) in self.ids.iter().zip(METRICS).zip(values) {
            let formatted = match unit {
                Some(unit) => format!("{value:.2}{unit}"),
                None if value != 0.0 && value.abs() < 1e-2 => format!("{value:.3e}"),
                None => format!("{value:.4}"),
            };
            let entry = MetricEntry::new(id.clone(), SerializedEntry { formatted, serialized: value.to_string() });
            let state = MetricState::Numeric(entry, NumericEntry::Value(value));
            if valid {
                renderer.update_valid(state)
            } else {
                renderer.update_train(state)
            }
        }
        let progress =
            TrainingProgress { progress: Some(progress), global_progress: Progress { items_processed: epoch + 1, items_total: self.epochs }, iteration };
        if valid {
            renderer.render_valid(progress, Vec::new())
        } else {
            renderer.render_train(progress, Vec::new())
        }
    }

    /// Whether the user asked the run to stop.
    pub fn stop_requested(&self) -> bool {
        self.interrupter.should_stop()
    }

    /// Keeps `line` for printing once the dashboard has closed.
    pub fn defer(&mut self, line: String) {
        self.deferred.push(line);
    }

    /// Leaves the terminal to the shell and prints the kept lines.
    pub fn close(&mut self) {
        if let Some(mut renderer) = self.renderer.take() {
            // The default summary action prints nothing without a summary.
            let _ = renderer.on_train_end(None);
            drop(renderer);
            for line in self.deferred.drain(..) {
                println!("{line}");
            }
        }
    }
}

impl Drop for Dashboard {
    fn drop(&mut self) {
        self.close();
    }
}
