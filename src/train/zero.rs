//! ZeRO stage 1 (`zero_stage = 1`, llm.c's `-z 1`): the optimizer state sharded across ranks.
//!
//! Every parameter tensor belongs to one rank, which alone keeps its moments and updates it after
//! the gradients are summed; then each owner sends its updated tensors to the other ranks. llm.c
//! cuts one flat buffer into equal slices; we give out whole tensors, so each tensor's update is
//! the same kernel call on the same values as in one process and results stay bitwise equal. The
//! price is balance: the largest tensor (the tied embedding, in small models) sets the largest
//! shard. Checkpoints hold the whole state, gathered on rank 0, so a run may switch `zero_stage`
//! when it resumes.

use crate::distributed::World;
use crate::model::Params;
use anyhow::{Context, Result};
use candle_core::{Device, Tensor, Var};
use std::collections::{BTreeMap, HashMap};

/// Which rank owns each parameter.
pub(super) struct Shards {
    owner: BTreeMap<String, usize>,
}

impl Shards {
    /// Gives out the parameters largest first, each to the rank holding the fewest values so
    /// far (the lowest rank on a tie): the same assignment on every rank.
    pub fn new(params: &Params, ranks: usize) -> Self {
        let mut by_size: Vec<(String, usize)> = params
            .named_vars()
            .into_iter()
            .map(|(name, var)| (name, var.elem_count()))
            .collect();
        by_size.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let mut load = vec![0usize; ranks];
        let mut owner = BTreeMap::new();
        for (name, n) in by_size {
            let rank = (0..ranks).min_by_key(|&r| (load[r], r)).expect("ranks > 0");
            load[rank] += n;
            owner.insert(name, rank);
        }
        Shards { owner }
    }

    fn owner_of(&self, name: &str) -> usize {
        self.owner[name]
    }

    /// The parameters `rank` updates.
    pub fn owned_by(&self, rank: usize, params: &Params) -> Vec<(String, Var)> {
        params
            .named_vars()
            .into_iter()
            .filter(|(name, _)| self.owner_of(name) == rank)
            .collect()
    }

    /// What `rank` keeps, for the run's start-up lines.
    pub fn describe(&self, rank: usize, params: &Params) -> String {
        let mine = self.owned_by(rank, params);
        let values: usize = mine.iter().map(|(_, v)| v.elem_count()).sum();
        let total: usize = params.vars().map(|v| v.elem_count()).sum();
        format!(
            "zero_stage 1: rank {rank} keeps the optimizer state of {} of {} tensors ({:.2}M of {:.2}M values)",
            mine.len(),
            self.owner.len(),
            values as f64 / 1e6,
            total as f64 / 1e6
        )
    }

    /// After each rank updated its own parameters: every parameter, from its owner to all.
    pub fn share_params(&self, world: &World, params: &Params) -> Result<()> {
        for (name, var) in params.named_vars() {
            let owner = self.owner_of(&name);
            let mut values = match owner == world.rank() {
                true => var.flatten_all()?.to_vec1::<f32>()?,
                false => vec![0f32; var.elem_count()],
            };
            world.broadcast_f32(owner, &mut values);
            if owner != world.rank() {
                var.set(&Tensor::from_vec(values, var.shape(), var.device())?)?;
            }
        }
        Ok(())
    }

    /// Rank 0 gets the whole optimizer state from every rank's `mine`; the other ranks get None.
    pub fn gather_state(
        &self,
        world: &World,
        mine: BTreeMap<String, Tensor>,
        device: &Device,
    ) -> Result<Option<BTreeMap<String, Tensor>>> {
        let bytes = safetensors::tensor::serialize(mine.iter(), None)?;
        let Some(all) = world.gather_bytes_to_root(bytes) else {
            return Ok(None);
        };
        let mut whole = mine;
        for (rank, bytes) in all.iter().enumerate().skip(1) {
            let theirs = candle_core::safetensors::load_buffer(bytes, device)
                .with_context(|| format!("rank {rank} sent an unreadable optimizer state"))?;
            whole.extend(theirs);
        }
        Ok(Some(whole))
    }

    /// The part of a whole optimizer state (keys `kind.parameter`) that `rank` keeps.
    pub fn own_state(
        &self,
        rank: usize,
        state: &HashMap<String, Tensor>,
    ) -> HashMap<String, Tensor> {
        state
            .iter()
            .filter(|(key, _)| {
                key.split_once('.')
                    .is_some_and(|(_, name)| self.owner.get(name) == Some(&rank))
            })
            .map(|(k, t)| (k.clone(), t.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::GptConfig;
    use candle_core::DType;

    fn params() -> Params {
        let mut cfg = GptConfig::preset("tiny").unwrap();
        cfg.vocab_size = 256;
        Params::init(&cfg, 0, DType::F32, &Device::Cpu).unwrap()
    }

    #[test]
    fn every_parameter_has_one_owner_and_shards_are_balanced() {
        let params = params();
        let all: Vec<String> = params.named_vars().into_iter().map(|(n, _)| n).collect();
        for ranks in [2, 3] {
            let shards = Shards::new(&params, ranks);
            let mut seen = Vec::new();
            let mut sizes = Vec::new();
            for rank in 0..ranks {
                let mine = shards.owned_by(rank, &params);
                assert!(!mine.is_empty(), "rank {rank} of {ranks} owns nothing");
                sizes.push(mine.iter().map(|(_, v)| v.elem_count()).sum::<usize>());
                seen.extend(mine.into_iter().map(|(n, _)| n));
            }
            seen.sort();
            assert_eq!(seen, all, "owners must cover every parameter exactly once");
            // Greedy largest-first: no shard exceeds the smallest by more than the largest tensor.
            let largest = params.vars().map(|v| v.elem_count()).max().unwrap();
            let (lo, hi) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
            assert!(hi - lo <= largest, "{sizes:?}");
        }
    }

    #[test]
    fn own_state_keeps_the_keys_of_owned_parameters() {
        let params = params();
        let shards = Shards::new(&params, 2);
        let mut state = HashMap::new();
        for (name, _) in params.named_vars() {
            for kind in ["exp_avg", "exp_avg_sq", "step"] {
                state.insert(
                    format!("{kind}.{name}"),
                    Tensor::new(&[0f32], &Device::Cpu).unwrap(),
                );
            }
        }
        let (a, b) = (shards.own_state(0, &state), shards.own_state(1, &state));
        assert_eq!(a.len() + b.len(), state.len());
        assert!(a.keys().all(|k| !b.contains_key(k)));
        assert_eq!(a.len(), 3 * shards.owned_by(0, &params).len());
    }
}
