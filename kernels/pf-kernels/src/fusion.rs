//! `Fusion<B>` (the default wgpu and CUDA backends): the fused operations as custom operations
//! of the fusion stream, run by the inner backend's kernel. They are never fused with their
//! neighbours; their inputs arrive in whatever layout the stream produced.

use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{Element, Shape};
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{Fusion, FusionBackend, FusionRuntime};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, TensorIr};

use crate::ops::{bn_relu_max_pool_by_reference, gelu_max_pool_gelu_by_reference, FusedOps};
use crate::reference::Pool2d;

#[derive(Clone, Debug)]
struct BnReluMaxPoolOp<B> {
    desc: CustomOpIr,
    pool: Pool2d,
    /// Whether the op has the winners' indices as a second output.
    with_indices: bool,
    _backend: core::marker::PhantomData<B>,
}

impl<B: FusionBackend + FusedOps> Operation<B::FusionRuntime> for BnReluMaxPoolOp<B> {
    fn execute(&self, handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>) {
        let [x, scale, shift] = self.desc.inputs.as_slice() else { unreachable!("registered with three inputs") };
        let (x, scale, shift) = (handles.get_float_tensor::<B>(x), handles.get_float_tensor::<B>(scale), handles.get_float_tensor::<B>(shift));
        if self.with_indices {
            let (y, idx) =
                B::bn_relu_max_pool_with_indices(x, scale, shift, self.pool).expect("registered only for backends with the kernel (FusedOps::HAS_KERNELS)");
            handles.register_float_tensor::<B>(&self.desc.outputs[0].id, y);
            handles.register_int_tensor::<B>(&self.desc.outputs[1].id, idx);
        } else {
            handles.register_float_tensor::<B>(&self.desc.outputs[0].id, B::bn_relu_max_pool(x, scale, shift, self.pool));
        }
    }
}

#[derive(Clone, Debug)]
struct GeluMaxPoolGeluOp<B> {
    desc: CustomOpIr,
    grid: [usize; 2],
    /// Whether the op has the winners' indices as a second output.
    with_indices: bool,
    _backend: core::marker::PhantomData<B>,
}

impl<B: FusionBackend + FusedOps> Operation<B::FusionRuntime> for GeluMaxPoolGeluOp<B> {
    fn execute(&self, handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>) {
        let tokens = handles.get_float_tensor::<B>(&self.desc.inputs[0]);
        if self.with_indices {
            let (y, idx) = B::gelu_max_pool_gelu_with_indices(tokens, self.grid).expect("registered only for backends with the kernel (FusedOps::HAS_KERNELS)");
            handles.register_float_tensor::<B>(&self.desc.outputs[0].id, y);
            handles.register_int_tensor::<B>(&self.desc.outputs[1].id, idx);
        } else {
            handles.register_float_tensor::<B>(&self.desc.outputs[0].id, B::gelu_max_pool_gelu(tokens, self.grid));
        }
    }
}

/// Registers `BN → ReLU → max-pool` on the fusion stream: the output, and the winners'
/// indices when asked.
fn register_bn_relu_max_pool<B: FusionBackend + FusedOps>(
    x: FloatTensor<Fusion<B>>,
    scale: FloatTensor<Fusion<B>>,
    shift: FloatTensor<Fusion<B>>,
    pool: Pool2d,
    with_indices: bool,
) -> Vec<FloatTensor<Fusion<B>>> {
    let client = x.client.clone();
    let [n, c, h, w] = x.shape.dims::<4>();
    let shape = Shape::new([n, c, pool.output_len(h), pool.output_len(w)]);
    let streams = OperationStreams::with_inputs([&x, &scale, &shift]);
    let mut outputs = vec![TensorIr::uninit(client.create_empty_handle(), shape.clone(), x.dtype)];
    if with_indices {
        outputs.push(TensorIr::uninit(client.create_empty_handle(), shape, B::IntElem::dtype()));
    }
    let desc = CustomOpIr::new("pf_bn_relu_max_pool", &[x.into_ir(), scale.into_ir(), shift.into_ir()], &outputs);
    let op = BnReluMaxPoolOp::<B> { desc: desc.clone(), pool, with_indices, _backend: core::marker::PhantomData };
    client.register(streams, OperationIr::Custom(desc), op)
}

/// Registers `GELU → max-pool → GELU` on the fusion stream: the output, and the winners'
/// indices when asked.
fn register_gelu_max_pool_gelu<B: FusionBackend + FusedOps>(
    tokens: FloatTensor<Fusion<B>>,
    grid: [usize; 2],
    with_indices: bool,
) -> Vec<FloatTensor<Fusion<B>>> {
    let client = tokens.client.clone();
    let shape = tokens.shape.clone();
    let streams = OperationStreams::with_inputs([&tokens]);
    let mut outputs = vec![TensorIr::uninit(client.create_empty_handle(), shape.clone(), tokens.dtype)];
    if with_indices {
        outputs.push(TensorIr::uninit(client.create_empty_handle(), shape, B::IntElem::dtype()));
    }
    let desc = CustomOpIr::new("pf_gelu_max_pool_gelu", &[tokens.into_ir()], &outputs);
    let op = GeluMaxPoolGeluOp::<B> { desc: desc.clone(), grid, with_indices, _backend: core::marker::PhantomData };
    client.register(streams, OperationIr::Custom(desc), op)
}

impl<B: FusionBackend + FusedOps> FusedOps for Fusion<B> {
    const HAS_KERNELS: bool = B::HAS_KERNELS;

    fn bn_relu_max_pool_with_indices(
        x: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        shift: FloatTensor<Self>,
        pool: Pool2d,
    ) -> Option<(FloatTensor<Self>, IntTensor<Self>)> {
        if !B::HAS_KERNELS {
            return None;
        }
        let [y, idx]: [_; 2] = register_bn_relu_max_pool::<B>(x, scale, shift, pool, true).try_into().expect("two outputs");
        Some((y, idx))
    }

    fn bn_relu_max_pool(x: FloatTensor<Self>, scale: FloatTensor<Self>, shift: FloatTensor<Self>, pool: Pool2d) -> FloatTensor<Self> {
        if !B::HAS_KERNELS {
            return bn_relu_max_pool_by_reference::<Self>(x, scale, shift, pool);
        }
        register_bn_relu_max_pool::<B>(x, scale, shift, pool, false).remove(0)
    }

    fn gelu_max_pool_gelu_with_indices(tokens: FloatTensor<Self>, grid: [usize; 2]) -> Option<(FloatTensor<Self>, IntTensor<Self>)> {
        if !B::HAS_KERNELS {
            return None;
        }
        let [y, idx]: [_; 2] = register_gelu_max_pool_gelu::<B>(tokens, grid, true).try_into().expect("two outputs");
        Some((y, idx))
    }

    fn gelu_max_pool_gelu(tokens: FloatTensor<Self>, grid: [usize; 2]) -> FloatTensor<Self> {
        if !B::HAS_KERNELS {
            return gelu_max_pool_gelu_by_reference::<Self>(tokens, grid);
        }
        register_gelu_max_pool_gelu::<B>(tokens, grid, false).remove(0)
    }
}
