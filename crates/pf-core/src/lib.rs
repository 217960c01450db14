//! Building blocks of "Learning Features with Parameter-Free Layers" (Han et al., ICLR 2022),
//! generic over Burn backends. They mirror `resnet_pf.py`, `vit_pf.py` and `pit_pf.py` of the
//! paper's reference code, with field names that copy the reference's attribute names.
//!
//! Deliberate deviations from the reference:
//! - the eff layer pools over the real token grid (height × width), where the reference assumes a
//!   square grid of `sqrt(tokens)` on each side; for square grids both agree;
//! - batch norm has no `num_batches_tracked` counter (the reference only uses it when
//!   `momentum=None`, which no model of the paper does).

pub mod conv;
pub mod drop;
pub mod exact;
pub mod macs;
pub mod norm;
pub mod resize;
pub mod spatial;
pub mod transformer;

pub use conv::{ConvBn, ConvBnConfig};
pub use drop::DropPath;
pub use macs::Cost;
pub use norm::{BatchNorm2d, BatchNorm2dConfig};
pub use resize::resize_bicubic;
pub use spatial::{SpatialOp, SpatialOpConfig};
pub use transformer::{mixer_kind, AttnType, Block, BlockConfig, MixerKind};
