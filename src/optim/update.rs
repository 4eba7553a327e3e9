//! What an optimizer step asks of the kernels: the per-parameter coefficients of one update,
//! computed by the optimizer in f64 and applied element-wise by the CPU kernel (kernel.rs), the
//! CUDA kernel (cuda.rs) or plain tensor ops, all with the same rules and operation order.

/// One step's coefficients for one parameter, computed by the optimizer in f64.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Update {
    /// Adam/AdamW: g ← g + coupled_wd·θ; θ ← θ·decay; m ← lerp(m, g, 1−β1); v ← β2·v + (1−β2)·g²;
    /// θ ← θ − step_size·m / (sqrt(v)/bias_correction2_sqrt + eps).
    Adam {
        beta1: f64,
        beta2: f64,
        eps: f64,
        coupled_wd: f64,
        decay: f64,
        step_size: f64,
        bias_correction2_sqrt: f64,
    },
    /// ADOPT's first step: g ← g + coupled_wd·θ; θ ← θ + decay_alpha·θ; v ← g².
    AdoptInit { coupled_wd: f64, decay_alpha: f64 },
    /// ADOPT: g ← g + coupled_wd·θ; θ ← θ + decay_alpha·θ; ĝ ← clamp(g / max(sqrt(v), eps), ±clip);
    /// m ← lerp(m, ĝ, 1−β1); θ ← θ − lr·m; v ← β2·v + (1−β2)·g².
    Adopt {
        beta1: f64,
        beta2: f64,
        eps: f64,
        coupled_wd: f64,
        decay_alpha: f64,
        lr: f64,
        clip: Option<f64>,
    },
}
