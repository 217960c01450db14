//! `Fusion<B>` (the default wgpu and CUDA backends): the fused operations as custom operations
//! of the fusion stream, run by the inner backend's kernel. They are never fused with their
//! neighbours; their inputs arrive in whatever layout the stream produced.

use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{Element, Shape};
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{Fusion, FusionBackend, FusionRuntime};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, OperationOutput, TensorIr};

use crate::ops::FusedOps;
use crate::reference::Pool2d;

#[derive(Clone, Debug)]
struct BnReluMaxPoolOp<B> {
    desc: CustomOpIr,
    pool: Pool2d,
    _backend: core::marker::PhantomData<B>,
}

impl<B: FusionBackend + FusedOps> Operation<B::FusionRuntime> for BnReluMaxPoolOp<B> {
    fn execute(&self, handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>) {
        let ([x, scale, shift], [out, indices]) = self.desc.as_fixed();
        let (y, idx) = B::bn_relu_max_pool_with_indices(
            handles.get_float_tensor::<B>(x),
            handles.get_float_tensor::<B>(scale),
            handles.get_float_tensor::<B>(shift),
            self.pool,
        )
        .expect("registered only for backends with the kernel (FusedOps::HAS_KERNELS)");
        handles.register_float_tensor::<B>(&out.id, y);
        handles.register_int_tensor::<B>(&indices.id, idx);
    }
}

#[derive(Clone, Debug)]
struct GeluMaxPoolGeluOp<B> {
    desc: CustomOpIr,
    grid: [usize; 2],
    _backend: core::marker::PhantomData<B>,
}

impl<B: FusionBackend + FusedOps> Operation<B::FusionRuntime> for GeluMaxPoolGeluOp<B> {
    fn execute(&self, handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>) {
        let ([tokens], [out, indices]) = self.desc.as_fixed();
        let (y, idx) = B::gelu_max_pool_gelu_with_indices(handles.get_float_tensor::<B>(tokens), self.grid)
            .expect("registered only for backends with the kernel (FusedOps::HAS_KERNELS)");
        handles.register_float_tensor::<B>(&out.id, y);
        handles.register_int_tensor::<B>(&indices.id, idx);
    }
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
        let client = x.client.clone();
        let [n, c, h, w] = x.shape.dims::<4>();
        let shape = Shape::new([n, c, pool.output_len(h), pool.output_len(w)]);
        let streams = OperationStreams::with_inputs([&x, &scale, &shift]);
        let out = TensorIr::uninit(client.create_empty_handle(), shape.clone(), x.dtype);
        let indices = TensorIr::uninit(client.create_empty_handle(), shape, B::IntElem::dtype());
        let desc = CustomOpIr::new("pf_bn_relu_max_pool", &[x.into_ir(), scale.into_ir(), shift.into_ir()], &[out, indices]);
        let op = BnReluMaxPoolOp::<B> { desc: desc.clone(), pool, _backend: core::marker::PhantomData };
        let [y, idx] = client.register(streams, OperationIr::Custom(desc), op).outputs();
        Some((y, idx))
    }

    fn gelu_max_pool_gelu_with_indices(tokens: FloatTensor<Self>, grid: [usize; 2]) -> Option<(FloatTensor<Self>, IntTensor<Self>)> {
        if !B::HAS_KERNELS {
            return None;
        }
        let client = tokens.client.clone();
        let shape = tokens.shape.clone();
        let streams = OperationStreams::with_inputs([&tokens]);
        let out = TensorIr::uninit(client.create_empty_handle(), shape.clone(), tokens.dtype);
        let indices = TensorIr::uninit(client.create_empty_handle(), shape, B::IntElem::dtype());
        let desc = CustomOpIr::new("pf_gelu_max_pool_gelu", &[tokens.into_ir()], &[out, indices]);
        let op = GeluMaxPoolGeluOp::<B> { desc: desc.clone(), grid, _backend: core::marker::PhantomData };
        let [y, idx] = client.register(streams, OperationIr::Custom(desc), op).outputs();
        Some((y, idx))
    }
}
