//! Fused `BN → ReLU → max-pool` against its reference twin on the R50-max shapes, forward and
//! forward + backward, on every enabled backend.

use burn::prelude::*;
use burn::tensor::Distribution;
use criterion::{criterion_group, criterion_main, Criterion};
use pf_benches::for_each_backend;
use pf_kernels::{fused_bn_relu_max_pool, reference_bn_relu_max_pool};
use pf_train::bench::BN_RELU_POOL_CASES;

fn kernels(c: &mut Criterion) {
    for_each_backend!(|backend, device: B| {
        type I = <B as burn::tensor::backend::AutodiffBackend>::InnerBackend;
        let mut group = c.benchmark_group(format!("bn_relu_max_pool/{backend}"));
        group.sample_size(10);
        for (shape, pool) in BN_RELU_POOL_CASES {
            let x = Tensor::<I, 4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
            let scale = Tensor::<I, 1>::random([shape[1]], Distribution::Normal(0.0, 1.0), &device);
            let shift = Tensor::<I, 1>::random([shape[1]], Distribution::Normal(0.0, 1.0), &device);
            let id = format!("{shape:?}/s{}", pool.stride);
            for fused in [false, true] {
                let which = if fused { "fused" } else { "reference" };
                group.bench_function(format!("forward/{which}/{id}"), |b| {
                    b.iter(|| {
                        let (x, scale, shift) = (x.clone(), scale.clone(), shift.clone());
                        let y = if fused { fused_bn_relu_max_pool(x, scale, shift, pool) } else { reference_bn_relu_max_pool(x, scale, shift, pool) };
                        drop(y);
                        I::sync(&device).expect("device sync");
                    })
                });
                group.bench_function(format!("forward+backward/{which}/{id}"), |b| {
                    b.iter(|| {
                        let xa = Tensor::<B, 4>::from_inner(x.clone()).require_grad();
                        let sa = Tensor::<B, 1>::from_inner(scale.clone()).require_grad();
                        let ta = Tensor::<B, 1>::from_inner(shift.clone()).require_grad();
                        let y = if fused { fused_bn_relu_max_pool(xa.clone(), sa.clone(), ta.clone(), pool) } else { reference_bn_relu_max_pool(xa.clone(), sa.clone(), ta.clone(), pool) };
                        let grads = y.sum().backward();
                        drop((xa.grad(&grads), sa.grad(&grads), ta.grad(&grads)));
                        B::sync(&device).expect("device sync");
                    })
                });
            }
        }
        group.finish();
    });
}

criterion_group!(benches, kernels);
criterion_main!(benches);
