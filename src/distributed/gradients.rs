//! One optimizer step's gradients and losses, summed over micro-steps and ranks as one process
//! accumulating every micro-batch would sum them.
//!
//! A step has `grad_accum × world size` micro-batches; rank r computes the contiguous share
//! `r·grad_accum .. (r+1)·grad_accum`. On CPU the ranks' micro-gradients are added left to right
//! in global micro-step order ([`World::sum_in_rank_order`]): rank 0 keeps a running sum of its
//! own, every other rank hands over each micro-gradient as a separate term. On GPUs NCCL sums each
//! rank's running sum in its own order. The losses are gathered in global order and summed once.

use super::World;
use crate::model::Params;
use anyhow::{Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor};
use std::ops::Range;
use std::time::Instant;

/// A step's gradients and losses as its micro-steps arrive ([`StepGradients::add`]), reduced
/// over the world by [`StepGradients::finish`].
pub struct StepGradients<'a> {
    world: &'a World,
    params: &'a Params,
    /// Micro-steps of the whole step, all ranks together.
    micro_steps: usize,
    /// Rank 0 (and every rank on GPUs): the running sum of its micro-gradients. Other ranks: their
    /// first micro-gradient, kept as the container the reduced sum goes into.
    grads: Option<GradStore>,
    /// CPU ranks after 0: each micro-gradient, flat and in order, to be added one by one to the
    /// sum that arrives from the rank before.
    terms: Vec<Vec<f32>>,
    /// Each micro-step's loss, still on the device: one transfer per step.
    losses: Vec<Tensor>,
    /// Each micro-step's z-loss term, when the objective has one.
    z_losses: Vec<Tensor>,
}

/// A reduced step: the mean loss over every micro-step of every rank and the summed gradients.
pub struct ReducedStep {
    pub loss: f64,
    /// The mean z-loss term, when the objective has one.
    pub z_loss: Option<f64>,
    pub grads: GradStore,
    /// Seconds spent exchanging gradients and losses (several ranks only).
    pub reduce_secs: Option<f64>,
}

impl<'a> StepGradients<'a> {
    /// An empty step of `grad_accum` micro-steps per rank.
    pub fn new(world: &'a World, params: &'a Params, grad_accum: usize) -> Self {
        StepGradients {
            world,
            params,
            micro_steps: grad_accum * world.size(),
            grads: None,
            terms: Vec::new(),
            losses: Vec::with_capacity(grad_accum),
            z_losses: Vec::new(),
        }
    }

    /// Micro-steps of the whole step, all ranks together.
    pub fn micro_steps(&self) -> usize {
        self.micro_steps
    }

    /// The micro-steps (global indices) this rank computes.
    pub fn mine(&self) -> Range<usize> {
        let per_rank = self.micro_steps / self.world.size();
        self.world.rank() * per_rank..(self.world.rank() + 1) * per_rank
    }

    /// Adds this rank's next micro-step: its loss and z-loss term if any (f64 scalar tensors,
    /// not divided by the number of micro-steps) and the gradients of its backward pass.
    pub fn add(&mut self, loss: Tensor, z_loss: Option<Tensor>, grads: GradStore) -> Result<()> {
        self.losses.push(loss);
        self.z_losses.extend(z_loss);
        if !self.world.is_root() && !self.world.sums_on_device() {
            self.terms.push(flatten(self.params, &grads)?);
            self.grads.get_or_insert(grads);
            return Ok(());
        }
        let Some(sum) = self.grads.as_mut() else {
            self.grads = Some(grads);
            return Ok(());
        };
        for var in self.params.vars() {
            if let Some(g) = grads.get(var.as_tensor()) {
                let total = match sum.get(var.as_tensor()) {
                    Some(s) => (s + g)?,
                    None => g.clone(),
                };
                sum.insert(var.as_tensor(), total);
            }
        }
        Ok(())
    }

    /// The step's mean loss and summed gradients, the same on every rank.
    pub fn finish(self) -> Result<ReducedStep> {
        let world = self.world;
        let mut grads = self.grads.context("a step has at least one micro-step")?;
        let started = Instant::now();
        let loss = mean_over_micro_steps(world, &self.losses, self.micro_steps)?;
        let z_loss = match self.z_losses.is_empty() {
            true => None,
            false => Some(mean_over_micro_steps(
                world,
                &self.z_losses,
                self.micro_steps,
            )?),
        };
        if world.sums_on_device() {
            sum_on_device(world, self.params, &mut grads)?;
        } else if world.size() > 1 {
            let terms = match world.is_root() {
                true => vec![flatten(self.params, &grads)?],
                false => self.terms,
            };
            let total = world.sum_in_rank_order(terms);
            unflatten(self.params, &total, &mut grads)?;
        }
        Ok(ReducedStep {
            loss,
            z_loss,
            grads,
            reduce_secs: (world.size() > 1).then(|| started.elapsed().as_secs_f64()),
        })
    }
}

/// The mean of one value per micro-step over every micro-step of every rank: this rank's
/// `values`, gathered in global order and summed as one process would.
fn mean_over_micro_steps(world: &World, values: &[Tensor], micro_steps: usize) -> Result<f64> {
    let accum = micro_steps as f64;
    Ok(if world.size() == 1 {
        Tensor::stack(values, 0)?.sum_all()?.to_scalar::<f64>()? / accum
    } else {
        let local = values
            .iter()
            .map(|l| l.to_scalar::<f64>())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let all = world.gather_f64(&local);
        Tensor::from_vec(all, micro_steps, &Device::Cpu)?
            .sum_all()?
            .to_scalar::<f64>()?
            / accum
    })
}

/// The gradients of `params` in name order, as one f32 vector (what ranks exchange).
fn flatten(params: &Params, grads: &GradStore) -> Result<Vec<f32>> {
    let mut flat = Vec::with_capacity(params.vars().map(|v| v.elem_count()).sum());
    for (name, var) in params.named_vars() {
        let g = grads
            .get(var.as_tensor())
            .with_context(|| format!("parameter {name} got no gradient"))?;
        flat.extend(g.flatten_all()?.to_vec1::<f32>()?);
    }
    Ok(flat)
}

/// Replaces the gradients in `grads` by the slices of `flat` ([`flatten`]'s layout).
fn unflatten(params: &Params, flat: &[f32], grads: &mut GradStore) -> Result<()> {
    let mut offset = 0;
    for var in params.vars() {
        let n = var.elem_count();
        let g = Tensor::from_slice(&flat[offset..offset + n], var.shape(), var.device())?;
        grads.insert(var.as_tensor(), g);
        offset += n;
    }
    Ok(())
}

/// Sums the gradients over ranks on the GPU: one NCCL all-reduce of all of them laid end to end
/// (as llm.c keeps them), then each parameter's gradient is a view of its slice.
fn sum_on_device(world: &World, params: &Params, grads: &mut GradStore) -> Result<()> {
    let mut flat = Vec::new();
    for (name, var) in params.named_vars() {
        let g = grads
            .get(var.as_tensor())
            .with_context(|| format!("parameter {name} got no gradient"))?;
        flat.push(g.flatten_all()?);
    }
    let flat = Tensor::cat(&flat, 0)?;
    world.sum_on_device(&flat)?;
    let mut offset = 0;
    for var in params.vars() {
        let n = var.elem_count();
        grads.insert(
            var.as_tensor(),
            flat.narrow(0, offset, n)?.reshape(var.shape())?,
        );
        offset += n;
    }
    Ok(())
}
