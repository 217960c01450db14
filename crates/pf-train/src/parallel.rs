//! Data-parallel training over several devices of one backend. Each step splits the batch into
//! one shard per device, in row order; every device computes the gradient of its shard's mean
//! loss weighted by the shard's share of the batch, so their sum, taken on the first device, is
//! the gradient of the whole batch's mean loss; the optimizer then steps once, there.
//!
//! Batch normalisation behaves as under PyTorch's `DistributedDataParallel` without
//! `SyncBatchNorm`: each device normalises with its own shard's statistics, and the running
//! statistics are those of the first device's shards (DDP broadcasts rank 0's buffers before
//! every forward). Every other device has a worker thread for the whole run; each step it gets
//! the main model without its autodiff history (`valid()`), copies it to its device and tracks
//! gradients on that copy, so no autodiff graph is shared between threads.
//!
//! Weights and gradients cross devices through host memory. Burn 0.21's direct `to_device`
//! between two devices of a CubeCL backend goes through the runtime's peer-to-peer transfer,
//! which CubeCL 0.10 implements for CUDA only, through NCCL, and leaves unimplemented (a panic)
//! for wgpu.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::thread::JoinHandle;

use crate::error::{Error, Result};
use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::ElementConversion;
use pf_kernels::FusedAutodiffBackend;
use pf_models::Model;

use crate::eval::logits_to_vec;
use crate::metrics::soft_target_cross_entropy;
use crate::optim::{GroupedGrads, ParamGroups};

/// A batch in host memory: `rows` images `[3, size, size]` and their soft targets over `classes`.
#[derive(Clone)]
pub struct HostBatch {
    pub images: Vec<f32>,
    pub targets: Vec<f32>,
    pub rows: usize,
    pub size: usize,
    pub classes: usize,
}

impl HostBatch {
    /// Rows `start .. start + rows`.
    pub fn shard(&self, start: usize, rows: usize) -> Self {
        let pixels = 3 * self.size * self.size;
        Self {
            images: self.images[start * pixels..(start + rows) * pixels].to_vec(),
            targets: self.targets[start * self.classes..(start + rows) * self.classes].to_vec(),
            rows,
            ..*self
        }
    }
}

/// One step before the optimizer: the batch's mean loss, its logits in row order (`[rows,
/// classes]` flattened) and the gradient of the mean loss, on the main device.
pub struct StepGrads {
    pub loss: f64,
    pub logits: Vec<f32>,
    pub grads: GroupedGrads,
}

/// The devices of a run. The first holds the model and the optimizer and computes its shard on
/// the calling thread; every other one has a worker.
pub struct DataParallel<B: FusedAutodiffBackend> {
    main: B::Device,
    groups: ParamGroups,
    workers: Vec<Worker<B>>,
}

struct Job<B: FusedAutodiffBackend> {
    model: Model<B::InnerBackend>,
    shard: HostBatch,
    weight: f64,
}

struct Worker<B: FusedAutodiffBackend> {
    device: B::Device,
    jobs: Option<Sender<Job<B>>>,
    done: Receiver<Result<StepGrads>>,
    thread: Option<JoinHandle<()>>,
}

impl<B: FusedAutodiffBackend> DataParallel<B> {
    /// `devices[0]` is the main device.
    pub fn new(devices: &[B::Device], groups: ParamGroups) -> Result<Self> {
        let (main, others) = devices.split_first().ok_or_else(|| Error::flag("--devices", "names no device; training needs at least one"))?;
        let workers = others
            .iter()
            .map(|device| {
                let (jobs, inbox) = channel::<Job<B>>();
                let (outbox, done) = channel();
                let (device_, main_, groups_) = (device.clone(), main.clone(), groups.clone());
                let thread = std::thread::Builder::new()
                    .name(format!("pf-device-{device:?}"))
                    .spawn(move || work(device_, main_, groups_, inbox, outbox))
                    .map_err(|e| Error::Device { device: format!("{device:?}"), reason: format!("starting its worker thread: {e}") })?;
                Ok(Worker { device: device.clone(), jobs: Some(jobs), done, thread: Some(thread) })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { main: main.clone(), groups, workers })
    }

    pub fn main_device(&self) -> &B::Device {
        &self.main
    }

    pub fn devices(&self) -> usize {
        1 + self.workers.len()
    }

    /// The loss, logits and gradients of `batch` for `model` (on the main device), computed
    /// over the devices. A batch with fewer rows than devices leaves the last ones idle.
    pub fn grads(&self, model: &Model<B>, batch: HostBatch) -> Result<StepGrads> {
        let n = batch.rows;
        if n == 0 {
            return Err(Error::Dataset("an empty batch has no gradient".into()));
        }
        let shards = self.devices().min(n);
        let rows: Vec<usize> = (0..shards).map(|i| n / shards + usize::from(i < n % shards)).collect();
        let weight = |rows: usize| rows as f64 / n as f64;
        if shards == 1 {
            return shard_grads(model, batch, 1.0, &self.groups, &self.main);
        }
        // The workers' shards first, so that they run while the main device computes its own.
        let mut start = rows[0];
        let mut sent = Vec::new();
        for (worker, &r) in self.workers.iter().zip(&rows[1..]) {
            // A `valid()` per worker, not clones of one: cloning an inner-backend `Param` forgets
            // that it tracks gradients, and the worker's copy would then have none.
            let job = Job { model: model.valid(), shard: batch.shard(start, r), weight: weight(r) };
            let jobs =
                worker.jobs.as_ref().ok_or_else(|| Error::Device { device: format!("{:?}", worker.device), reason: "its worker was shut down".into() })?;
            jobs.send(job).map_err(|_| stopped(&worker.device))?;
            sent.push(worker);
            start += r;
        }
        let own = shard_grads(model, batch.shard(0, rows[0]), weight(rows[0]), &self.groups, &self.main);
        // Collect every answer before any error returns, so that none is left for the next step.
        let answers: Vec<Result<StepGrads>> = sent.iter().map(|w| w.done.recv().map_err(|_| stopped(&w.device)).and_then(|r| r)).collect();
        let mut total = own?;
        total.loss *= weight(rows[0]);
        for (answer, &r) in answers.into_iter().zip(&rows[1..]) {
            let part = answer?;
            total.loss += part.loss * weight(r);
            total.logits.extend(part.logits);
            total.grads = total.grads.add(part.grads, model);
        }
        Ok(total)
    }
}

impl<B: FusedAutodiffBackend> Drop for DataParallel<B> {
    fn drop(&mut self) {
        for worker in &mut self.workers {
            worker.jobs = None;
        }
        for worker in &mut self.workers {
            if let Some(thread) = worker.thread.take() {
                let _ = thread.join();
            }
        }
    }
}

/// A worker: for each job, the model on `device` with fresh autodiff leaves; its gradients go
/// back on the main device.
fn stopped(device: &impl std::fmt::Debug) -> Error {
    Error::Device { device: format!("{device:?}"), reason: "its worker stopped (see the message above)".into() }
}

fn work<B: FusedAutodiffBackend>(device: B::Device, main: B::Device, groups: ParamGroups, jobs: Receiver<Job<B>>, done: Sender<Result<StepGrads>>) {
    for job in jobs {
        let model = Model::<B>::from_inner(job.model).map(&mut ToDevice::<B>(&device));
        let result = shard_grads(&model, job.shard, job.weight, &groups, &device).map(|mut part| {
            let back = |grads: GradientsParams| {
                let mut visitor = GradsToDevice::<B> { device: &main, grads };
                model.visit(&mut visitor);
                visitor.grads
            };
            part.grads = GroupedGrads { decay: back(part.grads.decay), no_decay: back(part.grads.no_decay) };
            part
        });
        if done.send(result).is_err() {
            break;
        }
    }
}

/// `tensor` on `device`, copied through host memory when it is elsewhere.
fn by_host<I: Backend, const D: usize>(tensor: Tensor<I, D>, device: &I::Device) -> Tensor<I, D> {
    if &tensor.device() == device {
        tensor
    } else {
        Tensor::from_data(tensor.into_data(), device)
    }
}

/// Copies every tensor of a model to a device, keeping which ones track gradients.
struct ToDevice<'a, B: Backend>(&'a B::Device);

impl<B: AutodiffBackend> ModuleMapper<B> for ToDevice<'_, B> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let tracked = tensor.is_require_grad();
        let moved = Tensor::from_inner(by_host(tensor.inner(), self.0));
        Param::from_mapped_value(id, if tracked { moved.require_grad() } else { moved }, mapper)
    }
}

/// Copies the gradients of a model's parameters to a device.
struct GradsToDevice<'a, B: Backend> {
    device: &'a B::Device,
    grads: GradientsParams,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for GradsToDevice<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(grad) = self.grads.remove::<B::InnerBackend, D>(param.id) {
            self.grads.register::<B::InnerBackend, D>(param.id, by_host(grad, self.device));
        }
    }
}

/// The mean loss and logits of one shard, and the gradient of `weight` times its mean loss.
fn shard_grads<B: FusedAutodiffBackend>(model: &Model<B>, shard: HostBatch, weight: f64, groups: &ParamGroups, device: &B::Device) -> Result<StepGrads> {
    let HostBatch { images, targets, rows, size, classes } = shard;
    let logits = model.forward(Tensor::from_data(TensorData::new(images, [rows, 3, size, size]), device))?;
    let targets = Tensor::<B, 2>::from_data(TensorData::new(targets, [rows, classes]), device);
    let loss = soft_target_cross_entropy(logits.clone(), targets);
    let value = loss.clone().into_scalar().elem::<f64>();
    let logits = logits_to_vec(logits.detach())?;
    let loss = if weight == 1.0 { loss } else { loss.mul_scalar(weight) };
    Ok(StepGrads { loss: value, logits, grads: groups.split(loss.backward(), model) })
}
