//! Inference latency (batch 1) and a training step (batch 8) of the paper's table models, on
//! every enabled backend.

use burn::module::AutodiffModule;
use burn::prelude::*;
use burn::tensor::Distribution;
use criterion::{criterion_group, criterion_main, Criterion};
use pf_kernels::FusedAutodiffBackend;
use pf_models::ModelName;
use pf_train::backend::{dispatch, BackendKind, Job};
use pf_train::bench::TrainStep;

const MODELS: [ModelName; 5] = [ModelName::Resnet50, ModelName::Resnet50Max, ModelName::Resnet50Hybrid, ModelName::VitSMax, ModelName::PitSMax];
const TRAIN_BATCH: usize = 8;

struct ModelBenches<'a>(&'a mut Criterion, BackendKind);

impl Job for ModelBenches<'_> {
    type Output = ();
    type Error = pf_train::Error;

    fn run<B: FusedAutodiffBackend>(self, device: B::Device) -> pf_train::Result<()> {
        let mut group = self.0.benchmark_group(format!("models/{}", self.1.name()));
        group.sample_size(10);
        for name in MODELS {
            let config = name.config();
            let s = config.image_size();
            let model = config.init::<B>(&device)?;
            let eval = model.valid();
            let one = Tensor::random([1, 3, s, s], Distribution::Normal(0.0, 1.0), &device);
            group.bench_function(format!("latency/{name}"), |b| {
                b.iter(|| {
                    drop(eval.forward(one.clone()).expect("forward"));
                    B::sync(&device).expect("device sync");
                })
            });
            let images = Tensor::<B, 4>::random([TRAIN_BATCH, 3, s, s], Distribution::Normal(0.0, 1.0), &device);
            let mut step = TrainStep::new(model, TRAIN_BATCH, &device);
            group.bench_function(format!("train-step-{TRAIN_BATCH}/{name}"), |b| {
                b.iter(|| {
                    step.run(images.clone()).expect("training step");
                    B::sync(&device).expect("device sync");
                })
            });
        }
        group.finish();
        Ok(())
    }
}

fn models(c: &mut Criterion) {
    for kind in BackendKind::compiled() {
        dispatch(kind, ModelBenches(c, kind)).expect("model benches");
    }
}

criterion_group!(benches, models);
criterion_main!(benches);
