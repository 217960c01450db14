//! pf's data pipeline, apart from any tensor library: image folders in the ImageNet layout,
//! timm's train and eval transforms, RandAugment, Mixup/CutMix targets, and a loader that
//! decodes and augments in worker threads. It hands out `f32` buffers; pf-train turns them into
//! Burn tensors.

mod images;
pub mod mix;
pub mod picture;
pub mod randaugment;
mod resize;

pub use images::*;
