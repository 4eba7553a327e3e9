//! One optimizer step in nanoGPT's order: each micro-step's forward and backward, the sum over
//! micro-steps and ranks, the spike policy, clipping, the update, and the diagnostics around it.

use super::*;

/// What one optimizer step produced.
pub(super) struct StepOutcome {
    pub(super) loss: f64,
    /// The z-loss term of the objective, when `z_loss` is on.
    pub(super) z_loss: Option<f64>,
    pub(super) norm: f64,
    pub(super) lr: f64,
    /// Why the update was not applied, if it was not.
    pub(super) skip: Option<SkipReason>,
    /// Whether `grad_clip` scaled the gradients down.
    pub(super) clipped: bool,
    /// The spike policy's z-scores, when it is on.
    pub(super) z: StepZScores,
    /// Per-layer figures (`diag_interval` steps on rank 0), as metrics keys.
    pub(super) diagnostics: Option<serde_json::Map<String, serde_json::Value>>,
    /// Data parallel: seconds this rank spent exchanging losses and gradients, waiting for slower
    /// ranks included.
    pub(super) reduce_secs: Option<f64>,
}

impl Trainer {
    /// One optimizer step: micro-steps with gradient accumulation (this rank's share of them),
    /// the sum over ranks, clipping, update.
    pub(super) fn train_step(&mut self, schedule: &Schedule) -> Result<StepOutcome> {
        let world = Rc::clone(&self.world);
        let lr = schedule.lr_at(self.position.step as usize);
        let mut step = StepGradients::new(&world, &self.params, self.cfg.grad_accum);
        for micro in 0..step.micro_steps() {
            // Every rank draws every micro-batch's windows, so the sampler's position stays the
            // same on all ranks.
            let starts = self.position.sampler.next_starts(
                self.data.split_len(Split::Train),
                self.model.config().block_size,
                self.cfg.batch_size,
            );
            if step.mine().contains(&micro) {
                let (loss, z_loss, grads) =
                    self.forward_backward(&starts, micro, step.micro_steps())?;
                step.add(loss, z_loss, grads)?;
            }
        }
        let ReducedStep {
            loss,
            z_loss,
            mut grads,
            reduce_secs,
        } = step.finish()?;
        let norm = grad_norm(&self.params, &grads)?;
        let mut z = StepZScores::default();
        let finite = loss.is_finite() && norm.is_finite() && z_loss.is_none_or(f64::is_finite);
        let skip = if !finite {
            match self.cfg.nan_policy {
                NanPolicy::Stop => return Err(self.non_finite_error(loss, norm)),
                NanPolicy::Skip => Some(SkipReason::NonFinite),
            }
        } else if let Some(windows) = &mut self.position.spikes {
            let reason;
            (z, reason) = windows.judge(
                loss,
                norm,
                self.cfg.skip_loss_zscore,
                self.cfg.skip_grad_zscore,
            );
            reason
        } else {
            None
        };
        let before_update = match self.cfg.diag_granularity {
            Some(granularity)
                if skip.is_none()
                    && world.is_root()
                    && (self.position.step + 1).is_multiple_of(self.cfg.diag_interval as u64) =>
            {
                Some(BeforeUpdate::capture(&self.params, &grads, granularity)?)
            }
            _ => None,
        };
        let clip = self.cfg.grad_clip;
        let clipped = skip.is_none() && clip > 0.0 && norm > clip;
        if skip.is_some() {
            self.position.skipped_steps += 1;
        } else {
            if clipped {
                self.position.clipped_steps += 1;
                // torch.nn.utils.clip_grad_norm_'s coefficient.
                scale_grads(&self.params, &mut grads, clip / (norm + 1e-6))?;
            }
            let (optimizer, grads) = (&mut self.optimizer, &grads);
            on_worker_thread_if_cpu(&self.device, || optimizer.update(grads, lr))?;
            if let Some(shards) = &self.shards {
                shards.share_params(&world, &self.params)?;
            }
        }
        let diagnostics = match before_update {
            Some(before) => {
                let mut figures = before.after(&self.params)?;
                // Sharded optimizer state holds only this rank's part.
                if self.shards.is_none() {
                    let granularity = self.cfg.diag_granularity.unwrap_or(DiagGranularity::Group);
                    figures.extend(diagnostics::normalized_update_rms(
                        &self.optimizer.state_tensors()?,
                        &self.cfg.optimizer_settings(),
                        granularity,
                    )?);
                }
                Some(figures)
            }
            None => None,
        };
        if self.position.step == 0 && world.size() > 1 && faults::desync_rank(world.rank()) {
            let first = self.params.vars().next().expect("a model has parameters");
            first.set(&(first.as_tensor() + 1e-3)?)?;
        }
        self.position.step += 1;
        let block = self.model.config().block_size;
        self.position.tokens += (self.cfg.batch_size * self.global_accum() * block) as u64;
        Ok(StepOutcome {
            loss,
            z_loss,
            norm,
            lr,
            skip,
            clipped,
            z,
            diagnostics,
            reduce_secs,
        })
    }

    /// Micro-step `micro` of `micro_steps` on the windows at `starts`: its cross-entropy and
    /// z-loss term (undivided, f64, on the device) and the gradients of the objective divided
    /// by `micro_steps`.
    fn forward_backward(
        &self,
        starts: &[usize],
        micro: usize,
        micro_steps: usize,
    ) -> Result<(Tensor, Option<Tensor>, GradStore)> {
        let block = self.model.config().block_size;
        let (x, y) = self.data.batch(Split::Train, starts, block, &self.device)?;
        // Dropout masks come from a stream keyed by (seed, micro-step index): no state to save.
        let mut dropout_rng = (self.model.config().dropout > 0.0).then(|| {
            let mut rng = ChaCha8Rng::seed_from_u64(self.cfg.seed);
            rng.set_stream(1 + self.position.step * micro_steps as u64 + micro as u64);
            rng
        });
        let (model, step, z_loss) = (&self.model, self.position.step, self.cfg.z_loss);
        on_worker_thread_if_cpu(&self.device, || {
            let terms = model.training_loss(&x, &y, dropout_rng.as_mut(), z_loss)?;
            let (mut loss, mut value) = (terms.objective, terms.cross_entropy);
            if faults::nan_at(step + 1) {
                loss = (loss * f64::NAN)?;
                value = (value * f64::NAN)?;
            }
            let value = value.detach().to_dtype(DType::F64)?;
            let z_value = terms.z_loss.map(|z| z.to_dtype(DType::F64)).transpose()?;
            let loss = if micro_steps > 1 {
                (loss / micro_steps as f64)?
            } else {
                loss
            };
            Ok((value, z_value, loss.backward()?))
        })
    }

    /// The error that stops a run under `nan_policy = "stop"`, naming the last good checkpoint.
    pub(super) fn non_finite_error(&self, loss: f64, norm: f64) -> anyhow::Error {
        let last = match checkpoint::list_complete(&self.run_dir) {
            Ok(list) => list
                .last()
                .map_or_else(|| "none".into(), |(_, d)| d.display().to_string()),
            Err(e) => format!("the checkpoints could not be listed: {e:#}"),
        };
        anyhow::anyhow!(
            "loss became {loss} (gradient norm {norm}) at step {}; stopped without saving (last good checkpoint: {last})",
            self.position.step + 1
        )
    }
}
