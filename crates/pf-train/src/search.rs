//! The paper's architecture search (`pf search`): DARTS, first order. Every block's spatial
//! operation is the softmax(α)-weighted sum of the candidates; the network's weights train on
//! one half of the training split with the recipe's optimizer, α (one vector per block) on the
//! other half with Adam, step by step in turn. The derived network takes each block's strongest
//! candidate. An interrupted search starts again (no resume yet).

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::error::{Error, Result};
use burn::module::AutodiffModule;
use burn::optim::decay::WeightDecayConfig;
use burn::optim::{AdamConfig, Optimizer};
use pf_core::spatial::SpatialKind;
use pf_kernels::FusedAutodiffBackend;
use pf_models::weights::state_dict;
use pf_models::{Model, ModelConfig};
use serde::Serialize;

use crate::checkpoint;
use crate::eval::{evaluate, Verbosity};
use crate::metrics::Meter;
use crate::optim::{GroupedOptimizer, ParamGroups};
use crate::parallel::{DataParallel, HostBatch};
use crate::recipe::{ModelSpec, Recipe};
use crate::study::{check_ops, not_a_resnet, resnet_of};
use pf_data::mix::mix_batch;
use pf_data::{epoch_order, sample_rng, ImageFolder, Loader};

/// DARTS's α optimizer: Adam, lr 3e-4, betas (0.5, 0.999), weight decay 1e-3.
const ALPHA_LR: f64 = 3e-4;

#[derive(Clone, Debug)]
pub struct SearchArgs {
    pub recipe: Recipe,
    pub data: PathBuf,
    pub out: PathBuf,
    pub ops: Vec<SpatialKind>,
    pub progress: bool,
}

/// One block's α after the search, as softmax weights by operation name.
#[derive(Clone, Debug, Serialize)]
pub struct BlockAlpha {
    pub stage: usize,
    pub block: usize,
    pub stride: usize,
    pub alpha: BTreeMap<String, f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct SearchResult {
    pub blocks: Vec<BlockAlpha>,
    /// The derived network's model file.
    pub config: PathBuf,
}

/// Every block's softmax(α) of `model` (a search network).
pub fn block_alphas<B: FusedAutodiffBackend>(model: &Model<B>) -> Vec<BlockAlpha> {
    let Model::Resnet(net) = model else { return Vec::new() };
    let mut blocks = Vec::new();
    for (stage, mixed) in net.mixed_ops().into_iter().enumerate() {
        for (block, m) in mixed.into_iter().enumerate() {
            let weights = m.weights().into_data().to_vec::<f32>().unwrap_or_default();
            let stride = if stage > 0 && block == 0 { 2 } else { 1 };
            let alpha = m.kinds.iter().zip(weights).map(|(k, w)| (k.name().to_string(), w as f64)).collect();
            blocks.push(BlockAlpha { stage, block, stride, alpha });
        }
    }
    blocks
}

pub fn search<B: FusedAutodiffBackend>(args: &SearchArgs, device: &B::Device) -> Result<SearchResult> {
    check_ops(&args.ops)?;
    let recipe = &args.recipe;
    let mut config = resnet_of(recipe, "the search")?;
    config.ops = None;
    config.block_ops = None;
    config.search = Some(args.ops.clone());
    // Checked before any image is read (identity alone, for one).
    ModelConfig::Resnet(config.clone()).validate()?;
    let train_set = ImageFolder::split(&args.data, "train")?;
    let val_set = ImageFolder::split(&args.data, "val")?;
    val_set.check_classes(&train_set.classes)?;
    let classes = train_set.classes.len();
    let mut search_recipe = recipe.clone();
    search_recipe.model = ModelSpec::Config(ModelConfig::Resnet(config.clone()));
    let model_config = search_recipe.model_config(classes)?;
    // The two halves: even samples train the weights, odd ones α.
    let halves = [(0..train_set.len()).step_by(2).collect::<Vec<_>>(), (1..train_set.len()).step_by(2).collect::<Vec<_>>()];
    let batch = recipe.batch_size;
    if halves[1].len() < batch {
        return Err(Error::Dataset(format!("{} training images make halves smaller than one batch of {batch}", train_set.len())));
    }
    std::fs::create_dir_all(&args.out).map_err(Error::io("creating", &args.out))?;
    B::seed(device, recipe.seed);
    let mut model = model_config.init::<B>(device)?;
    let alpha_ids: Vec<_> = state_dict(&model).into_iter().filter(|e| !e.buffer && e.path.ends_with("alpha")).map(|e| e.id).collect();
    let mut groups = ParamGroups::new(&model, recipe.no_decay_norm_bias);
    groups.decay.retain(|id| !alpha_ids.contains(id));
    groups.no_decay.retain(|id| !alpha_ids.contains(id));
    let mut optim = GroupedOptimizer::with_groups(recipe, groups.clone());
    let weights_step = DataParallel::<B>::single(device.clone(), groups);
    let alpha_step = DataParallel::<B>::single(device.clone(), ParamGroups { no_decay: alpha_ids, ..Default::default() });
    let mut alpha_optim = AdamConfig::new().with_beta_1(0.5).with_beta_2(0.999).with_weight_decay(Some(WeightDecayConfig::new(1e-3))).init();
    let verbosity = if args.progress { Verbosity::Bar } else { Verbosity::Warnings };
    let mut log = String::from("epoch,stage,block,op,weight\n");
    let mut history: Vec<Vec<BlockAlpha>> = Vec::new();
    for epoch in 0..recipe.epochs {
        let lr = recipe.lr_at(epoch);
        // Batches of the two halves in turn: weights, α, weights, α, ...
        let orders: Vec<Vec<usize>> = halves
            .iter()
            .enumerate()
            .map(|(h, half)| epoch_order(half.len(), recipe.seed.wrapping_add(h as u64), epoch).into_iter().map(|i| half[i]).collect())
            .collect();
        let steps = orders[1].len() / batch;
        let order: Vec<usize> =
            (0..steps).flat_map(|k| orders[0][k * batch..(k + 1) * batch].iter().chain(&orders[1][k * batch..(k + 1) * batch]).copied()).collect();
        let loader = Loader { dataset: &train_set, workers: recipe.workers, prefetch: 2 * recipe.workers };
        let transform = &recipe.train_transform;
        let mut meter = Meter::default();
        let mut slot = Some(model);
        let mut step = 0;
        loader.run(
            &order,
            batch,
            true,
            &|image, position| transform.apply_picture(image, &mut sample_rng(recipe.seed, epoch, position)),
            transform.size,
            |mut b| -> Result<()> {
                step += 1;
                if b.is_empty() {
                    return Ok(());
                }
                let mut images = std::mem::take(&mut b.images);
                let dims = [b.len(), 3, b.size, b.size];
                let mut rng = sample_rng(recipe.seed, epoch, usize::MAX / 2 + step);
                let (targets, _) = mix_batch(&mut images, dims, &b.labels, classes, recipe.label_smoothing, &recipe.mix, &mut rng);
                let host = HostBatch { images, targets, rows: b.len(), size: b.size, classes };
                let current = slot.take().ok_or(Error::ModelLost)?;
                let next = if step % 2 == 1 {
                    let grads = weights_step.grads(&current, host, lr)?;
                    if !grads.loss.is_finite() {
                        return Err(Error::Diverged { loss: grads.loss, epoch: epoch + 1, step, detail: String::new() });
                    }
                    meter.add(grads.loss, &grads.logits, classes, &b.labels);
                    optim.step_grouped(lr, current, grads.grads)
                } else {
                    let grads = alpha_step.grads(&current, host, lr)?;
                    alpha_optim.step(ALPHA_LR, current, grads.grads.no_decay)
                };
                slot = Some(next);
                Ok(())
            },
        )?;
        model = slot.ok_or(Error::ModelLost)?;
        let val = evaluate(&model.valid(), &val_set, &recipe.eval_transform, batch, recipe.workers, device, verbosity)?;
        let alphas = block_alphas(&model);
        for b in &alphas {
            for (op, w) in &b.alpha {
                log += &format!("{},{},{},{op},{w:.6}\n", epoch + 1, b.stage + 1, b.block + 1);
            }
        }
        checkpoint::replace_file(&args.out.join("alpha.csv"), log.as_bytes())?;
        history.push(alphas);
        let svg = args.out.join("alpha.svg");
        draw_alpha_chart(&svg, &history).map_err(|e| Error::Draw { reason: e.to_string(), path: svg })?;
        println!("epoch {:>3}/{}  train loss {:.4}  val top-1 {:.2}%", epoch + 1, recipe.epochs, meter.loss(), val.top1);
    }
    let Model::Resnet(net) = &model else { return Err(not_a_resnet(recipe, "the search", model_config.family())) };
    let mut derived = config.clone();
    derived.search = None;
    derived.block_ops = net.derived_block_ops();
    derived.num_classes = classes;
    let path = args.out.join("derived.json");
    checkpoint::write_json(&path, &ModelConfig::Resnet(derived), "writing the derived model")?;
    Ok(SearchResult { blocks: history.pop().unwrap_or_else(|| block_alphas(&model)), config: path })
}

/// How every block's weights moved, epoch by epoch: one panel per block, a line per candidate
/// (SVG).
pub fn draw_alpha_chart(path: &std::path::Path, history: &[Vec<BlockAlpha>]) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    let Some(last) = history.last() else { return Ok(()) };
    let columns = last.len().clamp(1, 4);
    let rows = last.len().div_ceil(columns).max(1);
    let root = SVGBackend::new(path, (300 * columns as u32, 240 * rows as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let epochs = history.len().max(2) as f64;
    for (area, block) in root.split_evenly((rows, columns)).into_iter().zip(last.iter().enumerate()) {
        let (index, block) = block;
        let top = history.iter().flat_map(|e| e[index].alpha.values().copied()).fold(0.0, f64::max) * 1.1 + 1e-9;
        let bottom = history.iter().flat_map(|e| e[index].alpha.values().copied()).fold(f64::INFINITY, f64::min) * 0.9;
        let mut chart = ChartBuilder::on(&area)
            .caption(format!("stage {} block {} (stride {})", block.stage + 1, block.block + 1, block.stride), ("sans-serif", 14))
            .margin(8)
            .x_label_area_size(24)
            .y_label_area_size(44)
            .build_cartesian_2d(1.0..epochs, bottom..top)?;
        chart.configure_mesh().x_desc("epoch").draw()?;
        for (i, op) in block.alpha.keys().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let points = history.iter().enumerate().map(|(e, blocks)| ((e + 1) as f64, blocks[index].alpha[op]));
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(2)))?
                .label(op.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 12, y)], color.stroke_width(2)));
        }
        chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
    }
    root.present()?;
    Ok(())
}
