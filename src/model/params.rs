//! The trainable tensors: seeded initialisation, loading from named tensors, and access by name.

use super::config::{GptConfig, Init};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use std::collections::{BTreeMap, HashMap};

/// The trainable tensors, by name in sorted order (optimizer state and checkpoints rely on it).
pub struct Params {
    vars: BTreeMap<String, Var>,
}

impl Params {
    /// Fresh parameters drawn from a ChaCha RNG seeded with `seed` in name order, so the same
    /// seed gives the same model on every machine (candle's own CPU RNG cannot be seeded).
    pub fn init(cfg: &GptConfig, seed: u64, dtype: DType, device: &Device) -> Result<Self> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut vars = BTreeMap::new();
        for spec in cfg.parameter_specs() {
            let n: usize = spec.shape.iter().product();
            let values: Vec<f64> = match spec.init {
                Init::Zeros => vec![0.0; n],
                Init::Ones => vec![1.0; n],
                Init::Normal(std) => {
                    let normal = Normal::new(0.0, std)?;
                    (0..n).map(|_| normal.sample(&mut rng)).collect()
                }
            };
            let t = Tensor::from_vec(values, spec.shape.as_slice(), device)?.to_dtype(dtype)?;
            vars.insert(spec.name, Var::from_tensor(&t)?);
        }
        Ok(Self { vars })
    }

    /// Parameters from named tensors (a checkpoint), which must match `cfg` exactly.
    pub fn from_tensors(
        cfg: &GptConfig,
        mut tensors: HashMap<String, Tensor>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let mut vars = BTreeMap::new();
        for spec in cfg.parameter_specs() {
            let t = tensors
                .remove(&spec.name)
                .with_context(|| format!("checkpoint lacks tensor {}", spec.name))?;
            if t.dims() != spec.shape.as_slice() {
                bail!(
                    "checkpoint tensor {} has shape {:?}, the model expects {:?} (a different model shape)",
                    spec.name,
                    t.dims(),
                    spec.shape
                );
            }
            let t = t.to_dtype(dtype)?.to_device(device)?;
            vars.insert(spec.name, Var::from_tensor(&t)?);
        }
        if let Some(extra) = tensors.keys().min() {
            bail!("checkpoint has tensor {extra}, which this model shape does not (a different model shape)");
        }
        Ok(Self { vars })
    }

    /// The variable called `name`.
    pub fn get(&self, name: &str) -> Result<&Var> {
        self.vars
            .get(name)
            .with_context(|| format!("no parameter named {name}"))
    }

    /// `(name, var)` pairs in name order.
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        self.vars
            .iter()
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect()
    }

    /// The variables in name order, borrowed (no allocation: the training loop calls this every step).
    pub fn vars(&self) -> impl Iterator<Item = &Var> {
        self.vars.values()
    }

    /// Current values by name, for saving.
    pub fn tensors(&self) -> BTreeMap<String, Tensor> {
        self.vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect()
    }
}
