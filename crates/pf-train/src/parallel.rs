//! Data-parallel training over several devices of one backend, as PyTorch's
//! `DistributedDataParallel` does it, on Burn's collective engine (`burn-collective`).
//!
//! Every device holds a replica of the model and its own optimizer for the whole run. The first
//! device's replica is the caller's (the one the training loop validates and saves); every other
//! one lives on a worker thread, registered with the first as a peer of one collective. Each step
//! splits the batch into one shard per device, in row order; every device computes the gradient
//! of its shard's mean loss weighted by the shard's share of the batch, and one all-reduce (a sum)
//! over the devices gives every replica the gradient of the whole batch's mean loss. Every replica
//! steps its own optimizer on that same gradient, so the weights stay identical without being
//! copied: they cross devices once, when the run (or a resumed run) starts, and a resumed run's
//! workers read the optimizer state from the checkpoint as the first device does.
//!
//! The gradients travel as one flat bucket (every trainable tensor in module order, zeros for
//! one without a gradient), summed in host memory on the CPU backend: one collective operation per
//! step instead of one per tensor, and the same path for every backend. Burn 0.21's direct
//! `to_device` between two devices of a CubeCL backend goes through the runtime's peer-to-peer
//! transfer, which CubeCL 0.10 implements for CUDA only, through NCCL, and leaves unimplemented (a
//! panic) for wgpu; burn-collective's local strategies move tensors with it.
//!
//! With two devices the sum is the same bits on every run. With three or more, burn-collective
//! adds the buckets in the order of a hash map: every replica of a run still gets the same bits,
//! but two runs agree to float rounding only.
//!
//! Batch normalisation behaves as under DDP without `SyncBatchNorm`: each device normalises with
//! its own shard's statistics, and the running statistics that are validated and saved are the
//! first device's (DDP broadcasts rank 0's buffers before every forward; the other replicas'
//! running statistics are never read). burn-collective keeps one server per process, so one
//! data-parallel run at a time holds it; a second waits for the first to end.

use std::collections::HashSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use crate::error::{Error, Result};
use burn::backend::NdArray;
use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::ElementConversion;
use burn_collective::{CollectiveConfig, PeerId, ReduceOperation};
use pf_kernels::FusedAutodiffBackend;
use pf_models::Model;

use crate::eval::logits_to_vec;
use crate::metrics::soft_target_cross_entropy;
use crate::nodes::NodeGroup;
use crate::optim::{GroupedGrads, GroupedOptimizer, ParamGroups};
use crate::recipe::Recipe;

/// Where the gradients are summed: host memory.
type Host = NdArray<f32>;

/// burn-collective's local server is one per process (per backend type): one run holds it.
static SESSION: Mutex<()> = Mutex::new(());

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

/// One step before the first device's optimizer: the batch's mean loss, its logits in row order
/// (`[rows, classes]` flattened) and the gradient of the mean loss, on the first device.
pub struct StepGrads {
    pub loss: f64,
    pub logits: Vec<f32>,
    pub grads: GroupedGrads,
}

/// What the workers' replicas need besides the weights: the recipe's optimizer over the groups,
/// and the checkpoint folder whose optimizer state a resumed run continues from.
#[derive(Clone, Debug)]
pub struct Replicas {
    pub recipe: Recipe,
    pub groups: ParamGroups,
    pub resume: Option<PathBuf>,
}

/// The devices of a run: the first is the caller's, every other one has a worker.
pub struct DataParallel<B: FusedAutodiffBackend> {
    main: B::Device,
    groups: ParamGroups,
    bucket: Bucket,
    workers: Vec<Worker<B>>,
    registered: bool,
    /// The other machines of the run, if any.
    group: Option<Mutex<NodeGroup>>,
    _session: Option<MutexGuard<'static, ()>>,
}

/// Which trainable tensors the flat gradient holds, and its length.
#[derive(Clone, Default)]
struct Bucket {
    decay: HashSet<ParamId>,
    no_decay: HashSet<ParamId>,
    len: usize,
}

enum Order {
    /// Compute the shard (none: this device sits the step out), sum, step at `lr`.
    Step { shard: Option<HostBatch>, weight: f64, lr: f64, place: Option<Place> },
    /// Send the replica's weights back.
    Weights,
}

/// Where a shard's rows lie in a batch spread over several machines: the summed bucket then
/// carries, after the gradients, the batch's loss and logits (each device writes its weighted
/// loss and its rows' logits, zeros elsewhere), so that every node logs the whole batch.
#[derive(Clone, Copy, Debug)]
struct Place {
    /// The shard's first row in the batch.
    row: usize,
    /// The batch's rows and classes.
    rows: usize,
    classes: usize,
}

impl Place {
    /// The values after the gradients: the loss and the logits.
    fn width(self) -> usize {
        1 + self.rows * self.classes
    }

    /// Appends the loss (times the shard's weight) and the logits at the shard's rows.
    fn append(self, flat: &mut Vec<f32>, weighted_loss: f64, logits: &[f32]) {
        let at = flat.len() + 1 + self.row * self.classes;
        flat.push(weighted_loss as f32);
        flat.resize(flat.len() + self.rows * self.classes, 0.0);
        flat[at..at + logits.len()].copy_from_slice(logits);
    }
}

/// A worker's shard: its mean loss and logits.
struct Part {
    loss: f64,
    logits: Vec<f32>,
}

enum Answer<B: FusedAutodiffBackend> {
    Step(Result<Part>),
    Weights(Result<Box<Model<B::InnerBackend>>>),
}

struct Worker<B: FusedAutodiffBackend> {
    device: B::Device,
    orders: Option<Sender<Order>>,
    /// Across machines: the whole run's sum, after this node's (none: it failed).
    global: Option<Sender<Option<Arc<Vec<f32>>>>>,
    answers: Receiver<Answer<B>>,
    thread: Option<JoinHandle<()>>,
}

impl<B: FusedAutodiffBackend> DataParallel<B> {
    /// One device: the gradients of `groups` for the caller's model, no worker, no collective.
    pub fn single(device: B::Device, groups: ParamGroups) -> Self {
        Self { main: device, groups, bucket: Bucket::default(), workers: Vec::new(), registered: false, group: None, _session: None }
    }

    /// `devices[0]` is the caller's, where `model` is; every other device gets a worker with a
    /// copy of `model` and an optimizer as `replicas` says. Returns once every peer has joined
    /// the collective.
    pub fn new(devices: &[B::Device], model: &Model<B>, replicas: Replicas) -> Result<Self> {
        Self::across(devices, model, replicas, None)
    }

    /// [`Self::new`] on one node of a run over several machines (`group`, see [`crate::nodes`]):
    /// every node passes the same whole batch to [`Self::grads`] and computes its own rows.
    pub fn across(devices: &[B::Device], model: &Model<B>, replicas: Replicas, group: Option<NodeGroup>) -> Result<Self> {
        let (main, others) = devices.split_first().ok_or_else(|| Error::flag("--devices", "names no device; training needs at least one"))?;
        if others.is_empty() {
            let mut this = Self::single(main.clone(), replicas.groups);
            if group.is_some() {
                this.bucket = Bucket::new(model, &this.groups);
            }
            this.group = group.map(Mutex::new);
            return Ok(this);
        }
        let session = SESSION.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        // Whatever an earlier run left behind (a run that failed while joining) is forgotten.
        burn_collective::reset_collective::<Host>();
        let bucket = Bucket::new(model, &replicas.groups);
        let across = group.is_some();
        let mut this = Self {
            main: main.clone(),
            groups: replicas.groups.clone(),
            bucket,
            workers: Vec::new(),
            registered: false,
            group: group.map(Mutex::new),
            _session: Some(session),
        };
        let mut gates = Vec::new();
        let mut readies = Vec::new();
        for (i, device) in others.iter().enumerate() {
            let rank = i + 1;
            let (orders, inbox) = channel::<Order>();
            let (outbox, answers) = channel();
            let (gate, go) = channel::<bool>();
            let (ready, is_ready) = channel::<Result<()>>();
            let (global, global_inbox) = if across {
                let (tx, rx) = channel();
                (Some(tx), Some(rx))
            } else {
                (None, None)
            };
            // A `valid()` per worker, not clones of one: cloning an inner-backend `Param` forgets
            // that it tracks gradients, and the worker's copy would then have none.
            let setup =
                Setup { rank, devices: devices.len(), device: device.clone(), weights: model.valid(), replicas: replicas.clone(), bucket: this.bucket.clone() };
            let thread = std::thread::Builder::new()
                .name(format!("pf-device-{device:?}"))
                .spawn(move || work::<B>(setup, ready, go, inbox, outbox, global_inbox))
                .map_err(|e| Error::Device { device: format!("{device:?}"), reason: format!("starting its worker thread: {e}") })?;
            this.workers.push(Worker { device: device.clone(), orders: Some(orders), global, answers, thread: Some(thread) });
            gates.push(gate);
            readies.push(is_ready);
        }
        // Every replica set up before any peer joins: joining blocks until all have.
        for (worker, ready) in this.workers.iter().zip(&readies) {
            ready.recv().map_err(|_| stopped(&worker.device)).and_then(|r| r)?;
        }
        for gate in &gates {
            gate.send(true).map_err(|_| Error::Device { device: "worker".into(), reason: "its worker stopped before joining".into() })?;
        }
        join(0, devices.len(), main)?;
        this.registered = true;
        Ok(this)
    }

    pub fn main_device(&self) -> &B::Device {
        &self.main
    }

    pub fn devices(&self) -> usize {
        1 + self.workers.len()
    }

    /// `(exchanges, mean time of one, bytes each way per node)` of the exchanges between
    /// machines so far; `None` on one machine.
    pub fn node_figures(&self) -> Option<(usize, std::time::Duration, usize)> {
        self.group.as_ref().map(|g| g.lock().unwrap_or_else(|p| p.into_inner()).figures())
    }

    /// The loss, logits and gradients of `batch` for the caller's `model` (on the first device),
    /// computed over the devices; every worker's replica steps at `lr` on the same gradients (the
    /// caller steps its own). A batch with fewer rows than devices leaves the last ones idle.
    pub fn grads(&self, model: &Model<B>, batch: HostBatch, lr: f64) -> Result<StepGrads> {
        let n = batch.rows;
        if n == 0 {
            return Err(Error::Dataset("an empty batch has no gradient".into()));
        }
        if let Some(group) = &self.group {
            return self.grads_across(group, model, batch, lr);
        }
        if self.workers.is_empty() {
            return shard_grads(model, batch, 1.0, &self.groups, &self.main);
        }
        let devices = self.devices();
        let rows: Vec<usize> = (0..devices).map(|i| n / devices + usize::from(i < n % devices)).collect();
        let weight = |rows: usize| rows as f64 / n as f64;
        // The workers' shards first, so that they run while the first device computes its own.
        let mut start = rows[0];
        for (worker, &r) in self.workers.iter().zip(&rows[1..]) {
            let order = Order::Step { shard: (r > 0).then(|| batch.shard(start, r)), weight: weight(r), lr, place: None };
            worker.send(order)?;
            start += r;
        }
        let own = guarded("computing its shard", || shard_grads(model, batch.shard(0, rows[0]), weight(rows[0]), &self.groups, &self.main));
        // Every peer takes part in the sum, failed or not, or the others would wait for it.
        let (own, flat) = match own {
            Ok(mut step) => match self.bucket.flatten(model, &mut step.grads) {
                Ok(flat) => (Ok(step), flat),
                Err(e) => (Err(e), vec![0.0; self.bucket.len]),
            },
            Err(e) => (Err(e), vec![0.0; self.bucket.len]),
        };
        let summed = all_reduce(0, flat, &self.main);
        // Collect every answer before any error returns, so that none is left for the next step.
        let answers = self.step_answers();
        let mut total = own?;
        total.loss *= weight(rows[0]);
        for (answer, &r) in answers.into_iter().zip(&rows[1..]) {
            let part = answer?;
            total.loss += part.loss * weight(r);
            total.logits.extend(part.logits);
        }
        total.grads = self.bucket.unflatten(model, &summed?, &self.main)?;
        Ok(total)
    }

    /// Every worker's answer to a step order, in device order.
    fn step_answers(&self) -> Vec<Result<Part>> {
        self.workers
            .iter()
            .map(|w| match w.answers.recv() {
                Ok(Answer::Step(part)) => part,
                Ok(Answer::Weights(_)) => Err(Error::Device { device: format!("{:?}", w.device), reason: "answered out of turn".into() }),
                Err(_) => Err(stopped(&w.device)),
            })
            .collect()
    }

    /// [`Self::grads`] on one node of several: `batch` is the whole batch, the same on every
    /// node; this node computes the rows of its devices (devices of all nodes in node order), sums
    /// them with burn-collective, then over the nodes; the loss and logits are the whole batch's.
    fn grads_across(&self, group: &Mutex<NodeGroup>, model: &Model<B>, batch: HostBatch, lr: f64) -> Result<StepGrads> {
        let mut group = group.lock().unwrap_or_else(|p| p.into_inner());
        let (n, classes) = (batch.rows, batch.classes);
        let local = self.devices();
        let all = local * group.nodes();
        let rows: Vec<usize> = (0..all).map(|i| n / all + usize::from(i < n % all)).collect();
        let first = group.rank() * local;
        let weight = |rows: usize| rows as f64 / n as f64;
        let mut start = rows[..first].iter().sum::<usize>();
        let own_start = start;
        start += rows[first];
        for (worker, &r) in self.workers.iter().zip(&rows[first + 1..]) {
            let place = Some(Place { row: start, rows: n, classes });
            worker.send(Order::Step { shard: (r > 0).then(|| batch.shard(start, r)), weight: weight(r), lr, place })?;
            start += r;
        }
        let place = Place { row: own_start, rows: n, classes };
        let width = self.bucket.len + place.width();
        let r = rows[first];
        let own = guarded("computing its shard", || {
            if r == 0 {
                return Ok(None);
            }
            let mut step = shard_grads(model, batch.shard(own_start, r), weight(r), &self.groups, &self.main)?;
            let mut flat = self.bucket.flatten(model, &mut step.grads)?;
            place.append(&mut flat, step.loss * weight(r), &step.logits);
            Ok(Some(flat))
        });
        let (own, flat) = match own {
            Ok(Some(flat)) => (Ok(()), flat),
            Ok(None) => (Ok(()), vec![0.0; width]),
            Err(e) => (Err(e), vec![0.0; width]),
        };
        let node_sum = if self.workers.is_empty() { Ok(flat) } else { all_reduce(0, flat, &self.main) };
        let total = node_sum.and_then(|sum| group.sum(sum)).map(Arc::new);
        for worker in &self.workers {
            if let Some(global) = &worker.global {
                let _ = global.send(total.as_ref().ok().cloned());
            }
        }
        let answers = self.step_answers();
        let total = total?;
        own?;
        answers.into_iter().try_for_each(|a| a.map(|_| ()))?;
        let len = self.bucket.len;
        let grads = self.bucket.unflatten(model, &total[..len], &self.main)?;
        Ok(StepGrads { loss: f64::from(total[len]), logits: total[len + 1..].to_vec(), grads })
    }

    /// The weights of every worker's replica, in device order (the first device's is the
    /// caller's own model): they must equal the caller's bit for bit.
    pub fn replicas(&self) -> Result<Vec<Model<B::InnerBackend>>> {
        self.workers.iter().try_for_each(|w| w.send(Order::Weights))?;
        self.workers
            .iter()
            .map(|w| match w.answers.recv() {
                Ok(Answer::Weights(weights)) => weights.map(|w| *w),
                Ok(Answer::Step(_)) => Err(Error::Device { device: format!("{:?}", w.device), reason: "answered out of turn".into() }),
                Err(_) => Err(stopped(&w.device)),
            })
            .collect()
    }
}

impl<B: FusedAutodiffBackend> Worker<B> {
    fn send(&self, order: Order) -> Result<()> {
        let orders = self.orders.as_ref().ok_or_else(|| Error::Device { device: format!("{:?}", self.device), reason: "its worker was shut down".into() })?;
        orders.send(order).map_err(|_| stopped(&self.device))
    }
}

impl<B: FusedAutodiffBackend> Drop for DataParallel<B> {
    fn drop(&mut self) {
        for worker in &mut self.workers {
            worker.orders = None;
        }
        for worker in &mut self.workers {
            if let Some(thread) = worker.thread.take() {
                let _ = thread.join();
            }
        }
        if self.registered {
            let _ = burn_collective::finish_collective::<Host>(PeerId::from(0usize));
        }
    }
}

fn stopped(device: &impl std::fmt::Debug) -> Error {
    Error::Device { device: format!("{device:?}"), reason: "its worker stopped (see the message above)".into() }
}

/// Joins the collective of `devices` peers as `rank`; returns once all have joined.
fn join<D: std::fmt::Debug>(rank: usize, devices: usize, device: &D) -> Result<()> {
    let config = CollectiveConfig::default().with_num_devices(devices);
    burn_collective::register::<Host>(PeerId::from(rank), Default::default(), config)
        .map_err(|e| Error::Device { device: format!("{device:?}"), reason: format!("joining the data-parallel collective: {e:?}") })
}

/// The sum over every peer of `flat`.
fn all_reduce<D: std::fmt::Debug>(rank: usize, flat: Vec<f32>, device: &D) -> Result<Vec<f32>> {
    let len = flat.len();
    let failed = |reason: String| Error::Device { device: format!("{device:?}"), reason };
    let tensor = Tensor::<Host, 1>::from_data(TensorData::new(flat, [len]), &Default::default());
    let summed = burn_collective::all_reduce::<Host>(PeerId::from(rank), tensor.into_primitive().tensor(), ReduceOperation::Sum)
        .map_err(|e| failed(format!("all-reducing the gradients: {e:?}")))?;
    pf_kernels::cpu::f32_values(&summed).ok_or_else(|| failed("the summed gradients are not f32".into()))
}

/// `f`, with a panic turned into an error that says what was being done.
fn guarded<T>(doing: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let message = panic.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| panic.downcast_ref::<String>().cloned()).unwrap_or_default();
        Err(Error::Device { device: std::thread::current().name().unwrap_or("main").to_string(), reason: format!("panicked {doing}: {message}") })
    })
}

/// What a worker is started with.
struct Setup<B: FusedAutodiffBackend> {
    rank: usize,
    devices: usize,
    device: B::Device,
    weights: Model<B::InnerBackend>,
    replicas: Replicas,
    bucket: Bucket,
}

/// A worker: its replica and optimizer on its device for the whole run; per order, its shard,
/// its share of the sum and a step.
fn work<B: FusedAutodiffBackend>(
    setup: Setup<B>,
    ready: Sender<Result<()>>,
    go: Receiver<bool>,
    orders: Receiver<Order>,
    answers: Sender<Answer<B>>,
    global: Option<Receiver<Option<Arc<Vec<f32>>>>>,
) {
    let Setup { rank, devices, device, weights, replicas, bucket } = setup;
    let replica = guarded("setting up its replica", || {
        let model = Model::<B>::from_inner(weights).map(&mut ToDevice::<B>(&device));
        let mut optim = GroupedOptimizer::<B>::with_groups(&replicas.recipe, replicas.groups.clone());
        if let Some(dir) = &replicas.resume {
            optim = optim.load(dir, &device)?;
        }
        Ok((model, optim))
    });
    let mut replica = match replica {
        Ok(r) => {
            let _ = ready.send(Ok(()));
            Some(r)
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    if !matches!(go.recv(), Ok(true)) || join(rank, devices, &device).is_err() {
        return;
    }
    for order in orders {
        let answer = match order {
            Order::Weights => Answer::Weights(replica.as_ref().map(|(m, _)| Box::new(m.valid())).ok_or_else(|| lost(&device))),
            Order::Step { shard, weight, lr, place } => {
                let width = bucket.len + place.map_or(0, Place::width);
                let part = match (&replica, shard) {
                    (None, _) => Err(lost(&device)),
                    (Some(_), None) => Ok((Part { loss: 0.0, logits: Vec::new() }, vec![0.0; width])),
                    (Some((model, _)), Some(shard)) => guarded("computing its shard", || {
                        let mut step = shard_grads(model, shard, weight, &replicas.groups, &device)?;
                        let mut flat = bucket.flatten(model, &mut step.grads)?;
                        if let Some(place) = place {
                            place.append(&mut flat, step.loss * weight, &step.logits);
                        }
                        Ok((Part { loss: step.loss, logits: step.logits }, flat))
                    }),
                };
                let (part, flat) = match part {
                    Ok((part, flat)) => (Ok(part), flat),
                    Err(e) => (Err(e), vec![0.0; width]),
                };
                let mut summed = all_reduce(rank, flat, &device).map(Arc::new);
                // Across machines the step waits for the whole run's sum, which the first
                // device's thread gets.
                if let Some(global) = &global {
                    summed = match global.recv() {
                        Ok(Some(total)) => Ok(total),
                        _ => Err(Error::Device { device: format!("{device:?}"), reason: "the sum over the machines failed (see the message above)".into() }),
                    };
                }
                Answer::Step(part.and_then(|part| {
                    let (model, mut optim) = replica.take().ok_or_else(|| lost(&device))?;
                    let stepped = guarded("stepping its optimizer", || {
                        let summed = summed?;
                        let grads = bucket.unflatten(&model, summed.get(..bucket.len).unwrap_or(&summed), &device)?;
                        Ok(optim.step_grouped(lr, model, grads))
                    })?;
                    replica = Some((stepped, optim));
                    Ok(part)
                }))
            }
        };
        if answers.send(answer).is_err() {
            break;
        }
    }
    let _ = burn_collective::finish_collective::<Host>(PeerId::from(rank));
}

fn lost(device: &impl std::fmt::Debug) -> Error {
    Error::Device { device: format!("{device:?}"), reason: "its replica was lost in an earlier step (see the message above)".into() }
}

impl Bucket {
    fn new<B: FusedAutodiffBackend>(model: &Model<B>, groups: &ParamGroups) -> Self {
        struct Count<'a>(&'a Bucket, usize);
        impl<B: Backend> ModuleVisitor<B> for Count<'_> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
                if self.0.holds(param.id) {
                    self.1 += param.val().shape().num_elements();
                }
            }
        }
        let mut bucket = Self { decay: groups.decay.iter().copied().collect(), no_decay: groups.no_decay.iter().copied().collect(), len: 0 };
        let mut count = Count(&bucket, 0);
        model.visit(&mut count);
        bucket.len = count.1;
        bucket
    }

    fn holds(&self, id: ParamId) -> bool {
        self.decay.contains(&id) || self.no_decay.contains(&id)
    }

    /// Every gradient of the bucket, in module order, as one vector (taken out of `grads`).
    fn flatten<B: FusedAutodiffBackend>(&self, model: &Model<B>, grads: &mut GroupedGrads) -> Result<Vec<f32>> {
        struct Flatten<'a> {
            bucket: &'a Bucket,
            grads: &'a mut GroupedGrads,
            flat: Vec<f32>,
            failed: Option<String>,
        }
        impl<B: AutodiffBackend> ModuleVisitor<B> for Flatten<'_> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
                let grads = if self.bucket.decay.contains(&param.id) {
                    &mut self.grads.decay
                } else if self.bucket.no_decay.contains(&param.id) {
                    &mut self.grads.no_decay
                } else {
                    return;
                };
                match grads.remove::<B::InnerBackend, D>(param.id) {
                    Some(grad) => match grad.into_data().convert::<f32>().into_vec::<f32>() {
                        Ok(values) => self.flat.extend(values),
                        Err(e) => self.failed = Some(format!("{e:?}")),
                    },
                    None => self.flat.resize(self.flat.len() + param.val().shape().num_elements(), 0.0),
                }
            }
        }
        let mut visitor = Flatten { bucket: self, grads, flat: Vec::with_capacity(self.len), failed: None };
        model.visit(&mut visitor);
        let Flatten { flat, failed, .. } = visitor;
        match failed {
            Some(reason) => Err(Error::Device { device: "gradients".into(), reason: format!("reading a gradient: {reason}") }),
            None if flat.len() != self.len => {
                Err(Error::Device { device: "gradients".into(), reason: format!("{} gradient values where the model has {}", flat.len(), self.len) })
            }
            None => Ok(flat),
        }
    }

    /// The gradients of `flatten`'s layout, on `device`, split into the groups.
    fn unflatten<B: FusedAutodiffBackend>(&self, model: &Model<B>, flat: &[f32], device: &B::Device) -> Result<GroupedGrads> {
        struct Unflatten<'a, B: Backend> {
            bucket: &'a Bucket,
            flat: &'a [f32],
            at: usize,
            device: &'a B::Device,
            grads: GroupedGrads,
        }
        impl<B: AutodiffBackend> ModuleVisitor<B> for Unflatten<'_, B> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
                let decay = self.bucket.decay.contains(&param.id);
                if !decay && !self.bucket.no_decay.contains(&param.id) {
                    return;
                }
                let dims = param.val().dims();
                let end = self.at + dims.iter().product::<usize>();
                // The layout is `flatten`'s over the same model, and the length was checked.
                let Some(values) = self.flat.get(self.at..end) else { return };
                self.at = end;
                let values = TensorData::new(values.to_vec(), dims);
                let grad = Tensor::<B::InnerBackend, D>::from_data(values, self.device);
                let group = if decay { &mut self.grads.decay } else { &mut self.grads.no_decay };
                group.register::<B::InnerBackend, D>(param.id, grad);
            }
        }
        if flat.len() != self.len {
            return Err(Error::Device {
                device: format!("{device:?}"),
                reason: format!("{} summed gradient values where the model has {}", flat.len(), self.len),
            });
        }
        let grads = GroupedGrads { decay: GradientsParams::new(), no_decay: GradientsParams::new() };
        let mut visitor = Unflatten::<B> { bucket: self, flat, at: 0, device, grads };
        model.visit(&mut visitor);
        Ok(visitor.grads)
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

/// The time of `rounds` all-reduces of a bucket of `len` values between `peers` threads of this
/// process, as a data-parallel step does them (the bench's measurement; registering the peers is
/// not counted).
pub fn time_all_reduce(len: usize, peers: usize, rounds: usize) -> Result<std::time::Duration> {
    if peers < 2 {
        return Err(Error::flag("--devices", "an all-reduce needs at least two peers"));
    }
    let _session = SESSION.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    burn_collective::reset_collective::<Host>();
    let others: Vec<JoinHandle<Result<()>>> = (1..peers)
        .map(|rank| {
            std::thread::spawn(move || {
                join(rank, peers, &rank)?;
                for _ in 0..rounds {
                    all_reduce(rank, vec![1.0; len], &rank)?;
                }
                let _ = burn_collective::finish_collective::<Host>(PeerId::from(rank));
                Ok(())
            })
        })
        .collect();
    join(0, peers, &0)?;
    let bucket = vec![1.0f32; len];
    let started = std::time::Instant::now();
    for _ in 0..rounds {
        let summed = all_reduce(0, bucket.clone(), &0)?;
        if summed.first().is_some_and(|&v| v != peers as f32) {
            return Err(Error::Device { device: "0".into(), reason: format!("the all-reduce summed to {} over {peers} peers", summed[0]) });
        }
    }
    let elapsed = started.elapsed();
    let _ = burn_collective::finish_collective::<Host>(PeerId::from(0usize));
    for other in others {
        other.join().map_err(|_| Error::Device { device: "peer".into(), reason: "its thread panicked".into() })??;
    }
    Ok(elapsed)
}
