//! Cross-crate tests of pf: parity with the reference fixtures, the full-size presets, weight
//! loading and bad input. One test binary for the whole workspace's integration tests.

#[cfg(test)]
mod agree;
#[cfg(test)]
mod blocks;
#[cfg(test)]
mod common;
#[cfg(test)]
mod conv;
#[cfg(test)]
mod fuzz;
#[cfg(test)]
mod gradcam;
#[cfg(test)]
mod inputs;
#[cfg(test)]
mod parallel;
#[cfg(test)]
mod parity;
#[cfg(test)]
mod presets;
#[cfg(test)]
mod study;
#[cfg(test)]
mod train;
#[cfg(test)]
mod weights;
