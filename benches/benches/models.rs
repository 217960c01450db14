//! Inference latency (batch 1) and a training step (batch 8) of the paper's table models, on
//! every enabled backend.

use burn::module::AutodiffModule;
use burn::optim::{GradientsParams, Optimizer, SgdConfig};
use burn::prelude::*;
use burn::tensor::Distribution;
use criterion::{criterion_group, criterion_main, Criterion};
use pf_benches::for_each_backend;
use pf_models::ModelName;

const MODELS: [ModelName; 5] = [ModelName::Resnet50, ModelName::Resnet50Max, ModelName::Resnet50Hybrid, ModelName::VitSMax, ModelName::PitSMax];

fn models(c: &mut Criterion) {
    for_each_backend!(|backend, device: B| {
        let mut group = c.benchmark_group(format!("models/{backend}"));
        group.sample_size(10);
        for name in MODELS {
            let config = name.config();
            let s = config.image_size();
            let model = config.init::<B>(&device).expect("preset");
            let eval = model.valid();
            let one = Tensor::random([1, 3, s, s], Distribution::Normal(0.0, 1.0), &device);
            group.bench_function(format!("latency/{name}"), |b| {
                b.iter(|| {
                    drop(eval.forward(one.clone()).expect("forward"));
                    <B as burn::tensor::backend::AutodiffBackend>::InnerBackend::sync(&device).expect("device sync");
                })
            });
            let batch = Tensor::<B, 4>::random([8, 3, s, s], Distribution::Normal(0.0, 1.0), &device);
            let targets = Tensor::<B, 1, Int>::zeros([8], &device);
            let loss = burn::nn::loss::CrossEntropyLossConfig::new().init(&device);
            let mut optim = SgdConfig::new().init::<B, pf_models::Model<B>>();
            let mut slot = Some(model);
            group.bench_function(format!("train-step-8/{name}"), |b| {
                b.iter(|| {
                    let model = slot.take().expect("model");
                    let logits = model.forward(batch.clone()).expect("forward");
                    let grads = GradientsParams::from_grads(loss.forward(logits, targets.clone()).backward(), &model);
                    slot = Some(optim.step(1e-3, model, grads));
                    B::sync(&device).expect("device sync");
                })
            });
        }
        group.finish();
    });
}

criterion_group!(benches, models);
criterion_main!(benches);
