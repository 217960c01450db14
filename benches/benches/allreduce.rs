//! The all-reduce of a data-parallel step: the gradients of the paper's models as one flat bucket
//! of f32, summed over 2 and 4 peers of this process on burn-collective (what `--devices` does
//! every step, besides the forward and backward).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use pf_models::ModelName;
use pf_train::parallel::time_all_reduce;

fn all_reduce(c: &mut Criterion) {
    let mut group = c.benchmark_group("all-reduce");
    group.sample_size(10);
    for name in [ModelName::Resnet50Hybrid, ModelName::VitSMax] {
        let params = name.info().expect("preset").params;
        group.throughput(Throughput::Bytes(4 * params as u64));
        for peers in [2, 4] {
            group.bench_function(format!("{name}/{peers}-peers"), |b| {
                b.iter_custom(|rounds| time_all_reduce(params, peers, rounds as usize).expect("all-reduce"))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, all_reduce);
criterion_main!(benches);
