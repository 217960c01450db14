//! The fused `BN → ReLU → max-pool` inside a training step of a conv block, against the plain
//! composition (`conv → BN → ReLU`, then max-pool): output, gradients of the conv and BN
//! parameters, and the running statistics the step leaves behind.

use burn::module::Module;
use burn::prelude::*;
use burn::tensor::Distribution;
use pf_core::conv::{ConvBn, ConvBnConfig};
use pf_kernels::{FusedAutodiffBackend, Pool2d};

use crate::common::{assert_close, backend_tests};

/// One training step of a 1×1 and a 3×3 `ConvBN-ReLU` followed by the stride-1 and stride-2
/// pools of R50-max, fused against plain.
fn fused_step_matches_plain<B: FusedAutodiffBackend>(device: B::Device) {
    for (kernel, pool) in [(1, Pool2d::new(3, 1, 1)), (3, Pool2d::new(3, 2, 1))] {
        B::seed(&device, 7);
        let config = ConvBnConfig::new([3, 6], kernel);
        // Same weights, each its own running statistics. (Not a clone: a clone shares the
        // running statistics, and clones a not yet initialised parameter's random draw.)
        let plain: ConvBn<B> = config.init(&device).load_record(config.init::<B>(&device).into_record());
        let fused: ConvBn<B> = config.init(&device).load_record(plain.clone().into_record());
        // An offset and spread per channel, so that batch statistics move the running ones.
        let x = Tensor::<B, 4>::random([2, 3, 11, 9], Distribution::Normal(0.0, 1.0), &device) * 1.5 + 0.7;
        let out_f = fused.forward_max_pool(x.clone(), pool);
        let out_p = pool.max_pool(plain.forward(x));
        let weights = Tensor::<B, 4>::random(out_f.dims(), Distribution::Normal(0.0, 1.0), &device);
        assert_close("output", out_f.clone().inner(), out_p.clone().inner(), 1e-5);
        let gf = (out_f * weights.clone()).sum().backward();
        let gp = (out_p * weights).sum().backward();
        let grad = |block: &ConvBn<B>, grads: &B::Gradients| {
            (block.conv.weight.grad(grads).unwrap(), block.bn.weight.grad(grads).unwrap(), block.bn.bias.grad(grads).unwrap())
        };
        let ((wf, gammaf, betaf), (wp, gammap, betap)) = (grad(&fused, &gf), grad(&plain, &gp));
        assert_close("conv weight gradient", wf, wp, 1e-4);
        assert_close("BN weight gradient", gammaf, gammap, 1e-4);
        assert_close("BN bias gradient", betaf, betap, 1e-4);

        let (mean_f, var_f) = (fused.bn.running_mean.value_sync(), fused.bn.running_var.value_sync());
        let (mean_p, var_p) = (plain.bn.running_mean.value_sync(), plain.bn.running_var.value_sync());
        // The step moved them off their initial zeros and ones.
        assert!(mean_f.clone().abs().max().into_scalar().elem::<f32>() > 1e-3, "running mean did not move");
        assert!((var_f.clone() - 1.0).abs().max().into_scalar().elem::<f32>() > 1e-3, "running variance did not move");
        assert_close("running mean", mean_f.inner(), mean_p.inner(), 1e-5);
        assert_close("running variance", var_f.inner(), var_p.inner(), 1e-5);
    }
}

backend_tests!(fused_step_matches_plain);
