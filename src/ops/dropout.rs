//! Inverted dropout with masks from the run's own seeded stream (candle's CPU RNG cannot be
//! seeded), so a resumed run draws the same masks.

use candle_core::{Result, Tensor};
use rand::distr::Distribution;
use rand_chacha::ChaCha8Rng;

/// `x` with each element zeroed with probability `p` and the rest scaled by 1/(1−p), the mask
/// drawn from `rng`; `x` itself when `rng` is `None` (evaluation) or `p` is 0.
pub fn dropout(x: &Tensor, p: f64, rng: Option<&mut ChaCha8Rng>) -> Result<Tensor> {
    let Some(rng) = rng else { return Ok(x.clone()) };
    if p == 0.0 {
        return Ok(x.clone());
    }
    let keep = rand::distr::Bernoulli::new(1.0 - p)
        .map_err(|e| candle_core::Error::Msg(format!("dropout probability {p}: {e}")))?;
    let scale = 1.0 / (1.0 - p);
    let mask: Vec<f32> = (0..x.elem_count())
        .map(|_| if keep.sample(rng) { scale as f32 } else { 0.0 })
        .collect();
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    x.mul(&mask)
}
