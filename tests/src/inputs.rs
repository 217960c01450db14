//! Inputs a model cannot take give a clear error; the parameter-free ops behave at the edges.

use burn::prelude::*;
use burn::tensor::Distribution;
use pf_kernels::{gelu, reference_gelu_max_pool_gelu};
use pf_models::{ModelConfig, ModelError};

use crate::common::Cpu;

fn tiny(family: &str) -> ModelConfig {
    let config = match family {
        "hybrid" => serde_json::json!({"family": "resnet", "config": {"block": "hybrid", "layers": [1, 1, 1, 1], "width_mult": 0.25, "num_classes": 3}}),
        "vit" => {
            serde_json::json!({"family": "vit", "config": {"img_size": 32, "patch_size": 16, "embed_dim": 12, "depth": 2, "num_heads": 3, "mlp_ratio": 2, "attn_type": "max", "num_classes": 3}})
        }
        _ => {
            serde_json::json!({"family": "pit", "config": {"image_size": 32, "patch_size": 8, "stride": 4, "base_dims": [4, 4], "depth": [2, 2], "heads": [1, 2], "mlp_ratio": 2, "attn_type": "max", "num_classes": 3}})
        }
    };
    serde_json::from_value(config).expect("config")
}

fn forward(config: &ModelConfig, shape: [usize; 4]) -> Result<Tensor<Cpu, 2>, ModelError> {
    let device = Default::default();
    let model = config.init::<Cpu>(&device).expect("builds");
    model.forward(Tensor::random(shape, Distribution::Default, &device))
}

#[test]
fn hybrid_needs_multiples_of_32() {
    let config = tiny("hybrid");
    assert_eq!(forward(&config, [2, 3, 64, 96]).expect("64x96 works").dims(), [2, 3]);
    for bad in [[1, 3, 48, 64], [1, 3, 64, 65], [1, 1, 64, 64]] {
        let err = forward(&config, bad).unwrap_err();
        assert!(matches!(err, ModelError::InputSize { .. }), "{bad:?}: {err}");
        assert!(err.to_string().contains("multiples of 32"), "{err}");
    }
}

#[test]
fn vit_takes_only_its_size_and_three_channels() {
    let config = tiny("vit");
    assert_eq!(forward(&config, [1, 3, 32, 32]).expect("works").dims(), [1, 3]);
    for bad in [[1, 3, 48, 48], [1, 3, 32, 48], [1, 4, 32, 32]] {
        let err = forward(&config, bad).unwrap_err();
        assert!(err.to_string().contains("[batch, 3, 32, 32]"), "{bad:?}: {err}");
    }
}

#[test]
fn pit_takes_other_and_non_square_sizes() {
    let config = tiny("pit");
    assert_eq!(forward(&config, [1, 3, 40, 56]).expect("non-square works").dims(), [1, 3]);
    assert!(forward(&config, [1, 3, 4, 40]).is_err());
    assert!(forward(&config, [1, 2, 32, 32]).is_err());
}

#[test]
fn bad_configs_are_errors() {
    let mut config = tiny("vit");
    if let ModelConfig::Vit(v) = &mut config {
        v.num_heads = 5;
    }
    assert!(config.init::<Cpu>(&Default::default()).is_err());
    let unknown_field = serde_json::json!({"family": "vit", "config": {"img_size": 32, "patch_size": 16, "embed_dim": 12, "depth": 2, "num_heads": 3, "mlp_ratio": 2, "attn_type": "max", "colour": 1}});
    assert!(serde_json::from_value::<ModelConfig>(unknown_field).is_err(), "unknown fields are rejected");
}

/// The eff layer's pool, written as loops: the specification on a non-square grid.
fn naive_gelu_pool_gelu(x: &[f32], [h, w]: [usize; 2], c: usize) -> Vec<f32> {
    let g = |v: f32| {
        let t = Tensor::<Cpu, 1>::from_floats([v], &Default::default());
        gelu(t).into_scalar()
    };
    let act: Vec<f32> = x.iter().map(|v| g(*v)).collect();
    let mut out = vec![0.0; x.len()];
    for i in 0..h {
        for j in 0..w {
            for ch in 0..c {
                let mut m = f32::NEG_INFINITY;
                for di in -1i64..=1 {
                    for dj in -1i64..=1 {
                        let (y, z) = (i as i64 + di, j as i64 + dj);
                        if y >= 0 && z >= 0 && (y as usize) < h && (z as usize) < w {
                            m = m.max(act[((y as usize) * w + z as usize) * c + ch]);
                        }
                    }
                }
                out[(i * w + j) * c + ch] = g(m);
            }
        }
    }
    out
}

#[test]
fn eff_pool_uses_the_real_grid_and_padding_never_wins() {
    let device = Default::default();
    let (grid, c) = ([3, 5], 4);
    // Strongly negative inputs: GELU of them is negative, so a zero padding would win.
    let x = Tensor::<Cpu, 3>::random([1, 15, c], Distribution::Uniform(-4.0, -0.5), &device);
    let values = x.to_data().to_vec::<f32>().expect("f32");
    let out = reference_gelu_max_pool_gelu(x, grid).into_data().to_vec::<f32>().expect("f32");
    let want = naive_gelu_pool_gelu(&values, grid, c);
    for (a, e) in out.iter().zip(&want) {
        assert!((a - e).abs() < 1e-6, "{a} vs {e}");
    }
    assert!(out.iter().all(|v| *v < 0.0), "padding must never win: {out:?}");
}
