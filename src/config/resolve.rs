//! Resolving a config: every value checked, and the defaults that depend on other keys (the
//! optimizer's, the schedule's, a token budget's step count) written in.

use super::*;

impl TrainConfig {
    pub(super) fn resolved_for_world(mut self, world_size: usize) -> Result<Self> {
        let preset = GptConfig::preset(&self.model)?;
        self.dropout.get_or_insert(preset.dropout);
        if self.init_from.is_empty() {
            bail!("init_from must be scratch, a GPT-2 model name or a directory");
        }
        // With pretrained weights the shape is theirs, filled in when they are read.
        if !self.pretrained() {
            self.n_layer.get_or_insert(preset.n_layer);
            self.n_head.get_or_insert(preset.n_head);
            self.n_embd.get_or_insert(preset.n_embd);
            self.block_size.get_or_insert(preset.block_size);
            self.bias.get_or_insert(preset.bias);
            // The vocabulary comes from the tokenizer; 256 stands in here only to validate the shape.
            self.model_config(256)?;
        }

        let muon_keys = [
            ("momentum", self.momentum.is_some()),
            ("nesterov", self.nesterov.is_some()),
            ("ns_steps", self.ns_steps.is_some()),
            ("ns_coefficients", self.ns_coefficients.is_some()),
            ("adjust_lr", self.adjust_lr.is_some()),
            ("newton_schulz_dtype", self.newton_schulz_dtype.is_some()),
            ("adamw_lr", self.adamw_lr.is_some()),
            ("adamw_betas", self.adamw_betas.is_some()),
            ("adamw_eps", self.adamw_eps.is_some()),
            ("adamw_weight_decay", self.adamw_weight_decay.is_some()),
        ];
        if self.optimizer != OptimizerKind::Muon {
            if let Some((key, _)) = muon_keys.iter().find(|(_, set)| *set) {
                bail!("{key} applies to optimizer = \"muon\" only");
            }
        }
        match self.optimizer {
            OptimizerKind::Muon => {
                for (key, set) in [
                    ("betas", self.betas.is_some()),
                    ("decouple", self.decouple.is_some()),
                    ("clip_exponent", self.clip_exponent.is_some()),
                    ("variant", self.variant.is_some()),
                ] {
                    if set {
                        bail!("{key} does not apply to muon (its AdamW part takes adamw_betas, adamw_eps, adamw_lr, adamw_weight_decay)");
                    }
                }
            }
            OptimizerKind::Adam | OptimizerKind::AdamW => {
                if self.decouple.is_some() {
                    bail!("decouple applies to adopt only (adam couples weight decay, adamw decouples it)");
                }
                if self.clip_exponent.is_some() {
                    bail!("clip_exponent applies to adopt only");
                }
                if self.variant.is_some() {
                    bail!("variant applies to adopt only");
                }
            }
            OptimizerKind::Adopt => {
                let original = self.variant == Some(AdoptVariant::Original);
                if original && matches!(self.clip_exponent, Some(ClipExponent::Exponent(_))) {
                    bail!("the original ADOPT variant has no clipping; drop clip_exponent");
                }
            }
        }
        // Every optimizer key the config left out takes its optimizer's default, written into
        // the config so that it states every value used.
        match self.optimizer_settings() {
            crate::optim::OptimizerSettings::Adam(c) => {
                self.lr = Some(c.lr);
                self.betas = Some([c.beta1, c.beta2]);
                self.eps = Some(c.eps);
                self.weight_decay = Some(c.weight_decay);
            }
            crate::optim::OptimizerSettings::Adopt(c) => {
                self.lr = Some(c.lr);
                self.betas = Some([c.beta1, c.beta2]);
                self.eps = Some(c.eps);
                self.weight_decay = Some(c.weight_decay);
                self.decouple = Some(c.decouple);
                self.variant = Some(c.variant);
                self.clip_exponent = Some(match c.clip_exponent {
                    Some(e) => ClipExponent::Exponent(e),
                    None => ClipExponent::Keyword(NoClip::None),
                });
            }
            crate::optim::OptimizerSettings::Muon { muon, adamw } => {
                muon.check().map_err(anyhow::Error::from)?;
                self.lr = Some(muon.lr);
                self.eps = Some(muon.eps);
                self.weight_decay = Some(muon.weight_decay);
                self.momentum = Some(muon.momentum);
                self.nesterov = Some(muon.nesterov);
                self.ns_steps = Some(muon.ns_steps);
                self.ns_coefficients = Some(muon.ns_coefficients);
                self.adjust_lr = Some(muon.adjust_lr);
                self.newton_schulz_dtype = Some(muon.newton_schulz_precision);
                self.adamw_lr = Some(adamw.lr);
                self.adamw_betas = Some([adamw.beta1, adamw.beta2]);
                self.adamw_eps = Some(adamw.eps);
                self.adamw_weight_decay = Some(adamw.weight_decay);
            }
        }
        let lr = self.peak_lr();
        self.min_lr = Some(self.min_lr_or_default());
        if let Some(budget) = self.max_tokens {
            if budget == 0 {
                bail!("max_tokens must be at least 1 token");
            }
            // A pretrained model's block_size is known once its config is read.
            if let Some(block) = self.block_size {
                let per_step = (self.batch_size * self.grad_accum * block * world_size) as u64;
                self.max_steps = usize::try_from(budget.div_ceil(per_step.max(1)))
                    .context("max_tokens: too many steps")?;
            }
        }
        let decay_steps = self.lr_decay_steps_or_default();
        // With a token budget the step count depends on the world size; `for_world` pins it.
        if self.max_tokens.is_none() {
            self.lr_decay_steps = Some(decay_steps);
        }
        // A cosine that ends before the warmup does holds min_lr from the warmup's end: the lr
        // climbs to lr and drops to min_lr at once at step warmup_steps. Only a run that trains
        // past its warmup meets that drop. The rule reads the values alone, never whether a key
        // was given or derived, so a run's saved config validates exactly as it did when the
        // run started.
        if self.schedule == ScheduleKind::Wsd {
            self.decay_fraction.get_or_insert(WSD_DECAY_FRACTION);
            self.decay_shape.get_or_insert(DecayShape::Linear);
        } else if self.decay_fraction.is_some() || self.decay_shape.is_some() {
            bail!("decay_fraction and decay_shape apply to schedule = \"wsd\" only");
        }
        for (key, threshold) in [
            ("skip_loss_zscore", self.skip_loss_zscore),
            ("skip_grad_zscore", self.skip_grad_zscore),
        ] {
            if !(threshold.is_finite() && threshold >= 0.0) {
                bail!("{key} must be a number of standard deviations ≥ 0 (0 disables), got {threshold}");
            }
        }
        if !(self.z_loss.is_finite() && self.z_loss >= 0.0) {
            bail!(
                "z_loss must be a coefficient ≥ 0 (0 disables), got {}",
                self.z_loss
            );
        }
        if self.spike_policy() {
            let window = *self.zscore_window.get_or_insert(ZSCORE_WINDOW);
            if window < 2 {
                bail!("zscore_window must be at least 2 steps, got {window}");
            }
        } else if self.zscore_window.is_some() {
            bail!("zscore_window applies only with skip_loss_zscore or skip_grad_zscore above 0");
        }
        if self.diag_interval > 0 {
            self.diag_granularity
                .get_or_insert(crate::train::diagnostics::DiagGranularity::Group);
        } else if self.diag_granularity.is_some() {
            bail!("diag_granularity applies only with diag_interval above 0");
        }
        if self.sample_interval > 0 {
            self.sample_prompt.get_or_insert_with(String::new);
            if *self.sample_tokens.get_or_insert(SAMPLE_TOKENS) == 0 {
                bail!("sample_tokens must be at least 1");
            }
        } else if self.sample_prompt.is_some() || self.sample_tokens.is_some() {
            bail!("sample_prompt and sample_tokens apply only with sample_interval above 0");
        }
        if let Some(peak) = self.peak_flops {
            if !(peak.is_finite() && peak > 0.0) {
                bail!("peak_flops must be a positive number of FLOP/s, got {peak}");
            }
        }
        if let Some(fraction) = self.decay_fraction {
            if !(fraction > 0.0 && fraction <= 1.0) {
                bail!("decay_fraction must be in (0, 1], got {fraction}");
            }
        }
        let decay_start = self.schedule().decay_start();
        if self.schedule == ScheduleKind::Wsd
            && self.warmup_steps > decay_start
            && self.max_steps > decay_start
        {
            bail!(
                "the wsd decay starts at step {decay_start} (the last decay_fraction = {} of \
                 lr_decay_steps = {decay_steps}), inside the warmup of {} steps; lower \
                 decay_fraction or warmup_steps",
                self.decay_fraction.unwrap_or_default(),
                self.warmup_steps
            );
        }
        if matches!(self.schedule, ScheduleKind::Cosine | ScheduleKind::Linear)
            && self.warmup_steps > decay_steps
            && self.max_steps > self.warmup_steps
        {
            bail!(
                "warmup_steps ({warmup}) exceeds lr_decay_steps ({decay_steps}) and max_steps \
                 ({}) trains past it: at step {warmup} the lr would drop from lr to min_lr at \
                 once; keep max_steps at most {warmup}, lower warmup_steps or raise lr_decay_steps",
                self.max_steps,
                warmup = self.warmup_steps,
            );
        }
        self.validate(lr)?;
        Ok(self)
    }

    /// Checks every value of a config whose optimizer defaults are filled in (`lr` is its
    /// resolved peak learning rate).
    fn validate(&self, lr: f64) -> Result<()> {
        if !(lr.is_finite() && lr > 0.0) {
            bail!("lr must be a positive number, got {lr}");
        }
        if let Some(min_lr) = self.min_lr {
            if !(min_lr.is_finite() && min_lr >= 0.0 && min_lr <= lr) {
                bail!("min_lr must be in [0, lr], got {min_lr}");
            }
        }
        if let Some([b1, b2]) = self.betas {
            for (name, b) in [("betas[0]", b1), ("betas[1]", b2)] {
                if !(0.0..1.0).contains(&b) {
                    bail!("{name} must be in [0, 1), got {b}");
                }
            }
        }
        if let Some(eps) = self.eps {
            if !(eps.is_finite() && eps > 0.0) {
                bail!("eps must be positive, got {eps}");
            }
        }
        if let Some(wd) = self.weight_decay {
            if !(wd.is_finite() && wd >= 0.0) {
                bail!("weight_decay must be >= 0, got {wd}");
            }
        }
        if let Some([b1, b2]) = self.adamw_betas {
            for (name, b) in [("adamw_betas[0]", b1), ("adamw_betas[1]", b2)] {
                if !(0.0..1.0).contains(&b) {
                    bail!("{name} must be in [0, 1), got {b}");
                }
            }
        }
        for (name, value) in [("adamw_lr", self.adamw_lr), ("adamw_eps", self.adamw_eps)] {
            if let Some(v) = value {
                if !(v.is_finite() && v > 0.0) {
                    bail!("{name} must be positive, got {v}");
                }
            }
        }
        if let Some(wd) = self.adamw_weight_decay {
            if !(wd.is_finite() && wd >= 0.0) {
                bail!("adamw_weight_decay must be >= 0, got {wd}");
            }
        }
        if let Some(ClipExponent::Exponent(e)) = self.clip_exponent {
            if !(e.is_finite() && e > 0.0) {
                bail!("clip_exponent must be positive or \"none\", got {e}");
            }
        }
        if !(self.val_fraction > 0.0 && self.val_fraction < 1.0) {
            bail!("val_fraction must be in (0, 1), got {}", self.val_fraction);
        }
        if !(self.grad_clip.is_finite() && self.grad_clip >= 0.0) {
            bail!(
                "grad_clip must be >= 0 (0 disables), got {}",
                self.grad_clip
            );
        }
        for (name, v) in [
            ("max_steps", self.max_steps),
            ("batch_size", self.batch_size),
            ("grad_accum", self.grad_accum),
            ("eval_interval", self.eval_interval),
            ("eval_iters", self.eval_iters),
            ("eval_batch_size", self.eval_batch_size.unwrap_or(1)),
            ("log_interval", self.log_interval),
            ("keep_last", self.keep_last),
        ] {
            if v == 0 {
                bail!("{name} must be at least 1");
            }
        }
        if self.zero_stage > 1 {
            bail!(
                "zero_stage must be 0 (optimizer state on every rank) or 1 (sharded across ranks), got {}",
                self.zero_stage
            );
        }
        if self.tokenizer == TokenizerKind::Bpe && !(257..=65536).contains(&self.bpe_vocab_size) {
            bail!(
                "bpe_vocab_size must be in [257, 65536], got {}",
                self.bpe_vocab_size
            );
        }
        if self.data.is_empty() {
            bail!("data must name a text corpus or token files");
        }
        crate::device::parse_device_spec(&self.device)?;
        if self.cpu_bf16() {
            if let Some(reason) = crate::ops::onednn::bf16_matmuls_unavailable() {
                bail!("dtype = \"bf16\" on CPU needs oneDNN, and {reason}");
            }
        }
        Ok(())
    }
}
