//! `gpt-pretrain export`: a run's newest checkpoint as a directory `transformers` loads.

use crate::model::hf::write_transformers_dir;
use crate::train::{load_run_model, RunModel};
use anyhow::Result;
use candle_core::Device;
use std::path::Path;

/// Writes the newest checkpoint of the run in `run_dir` as a `transformers` GPT-2 directory `out`
/// (see [`write_transformers_dir`]).
pub fn export(run_dir: &Path, out: &Path) -> Result<()> {
    let (run, _) = load_run_model(run_dir, Some(&Device::Cpu))?;
    let RunModel {
        tokenizer,
        model_cfg,
        params,
        ..
    } = run;
    write_transformers_dir(out, &model_cfg, &params, &tokenizer)
}
