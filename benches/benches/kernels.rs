//! The fused kernels against their reference twins, forward and forward + backward, on every
//! enabled backend: `BN → ReLU → max-pool` on the R50-max shapes, `GELU → max-pool → GELU` on the
//! ViT-S-max and PiT-S-max eff-layer shapes.

use burn::prelude::*;
use burn::tensor::Distribution;
use criterion::{criterion_group, criterion_main, Criterion};
use pf_benches::for_each_backend;
use pf_kernels::{fused_bn_relu_max_pool, fused_gelu_max_pool_gelu, reference_bn_relu_max_pool, reference_gelu_max_pool_gelu};
use pf_train::bench::{BN_RELU_POOL_CASES, GELU_POOL_CASES};

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

fn eff_layer(c: &mut Criterion) {
    for_each_backend!(|backend, device: B| {
        type I = <B as burn::tensor::backend::AutodiffBackend>::InnerBackend;
        let mut group = c.benchmark_group(format!("gelu_max_pool_gelu/{backend}"));
        group.sample_size(10);
        for (shape, grid) in GELU_POOL_CASES {
            let tokens = Tensor::<I, 3>::random(shape, Distribution::Normal(0.0, 1.0), &device);
            for fused in [false, true] {
                let which = if fused { "fused" } else { "reference" };
                group.bench_function(format!("forward/{which}/{shape:?}"), |b| {
                    b.iter(|| {
                        let t = tokens.clone();
                        drop(if fused { fused_gelu_max_pool_gelu(t, grid) } else { reference_gelu_max_pool_gelu(t, grid) });
                        I::sync(&device).expect("device sync");
                    })
                });
                group.bench_function(format!("forward+backward/{which}/{shape:?}"), |b| {
                    b.iter(|| {
                        let t = Tensor::<B, 3>::from_inner(tokens.clone()).require_grad();
                        let y = if fused { fused_gelu_max_pool_gelu(t.clone(), grid) } else { reference_gelu_max_pool_gelu(t.clone(), grid) };
                        drop(t.grad(&y.sum().backward()));
                        B::sync(&device).expect("device sync");
                    })
                });
            }
        }
        group.finish();
    });
}

criterion_group!(benches, kernels, eff_layer);
criterion_main!(benches);
