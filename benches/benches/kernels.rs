//! The fused kernels against their reference twins, forward and forward + backward, on every
//! enabled backend: `BN → ReLU → max-pool` on the R50-max shapes, `GELU → max-pool → GELU` on the
//! ViT-S-max and PiT-S-max eff-layer shapes.

use criterion::{criterion_group, criterion_main, Criterion};
use pf_kernels::FusedAutodiffBackend;
use pf_train::backend::{dispatch, BackendKind, Job};
use pf_train::bench::{KernelCase, Pass};

struct KernelBenches<'a>(&'a mut Criterion, BackendKind);

impl Job for KernelBenches<'_> {
    type Output = ();
    type Error = pf_train::Error;

    fn run<B: FusedAutodiffBackend>(self, device: B::Device) -> pf_train::Result<()> {
        let mut group = self.0.benchmark_group(format!("kernels/{}", self.1.name()));
        group.sample_size(10);
        for case in KernelCase::<B>::all(usize::MAX, &device) {
            for pass in Pass::BOTH {
                for (fused, which) in [(false, "reference"), (true, "fused")] {
                    group.bench_function(format!("{}/{}/{which}/{:?}", case.op(), pass.name(), case.shape()), |b| {
                        b.iter(|| {
                            case.run(fused, pass);
                            B::sync(&device).expect("device sync");
                        })
                    });
                }
            }
        }
        group.finish();
        Ok(())
    }
}

fn kernels(c: &mut Criterion) {
    for kind in BackendKind::compiled() {
        dispatch(kind, KernelBenches(c, kind)).expect("kernel benches");
    }
}

criterion_group!(benches, kernels);
criterion_main!(benches);
