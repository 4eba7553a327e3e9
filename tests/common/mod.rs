//! Helpers shared by the integration tests.
#![allow(dead_code)]

use candle_core::{DType, Tensor};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The project's root: `$GPT_PRETRAIN_ROOT` when the test binaries were copied to another machine
/// (scripts/gpu_check.sh), else the source tree they were built from.
pub fn project_root() -> PathBuf {
    match std::env::var_os("GPT_PRETRAIN_ROOT") {
        Some(root) => PathBuf::from(root),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")),
    }
}

/// The data directory: `$DATA_MIRROR`, else the project's `data/` (filled by
/// `scripts/get_data.sh`), else `../shared/data` beside the project.
pub fn data_dir() -> PathBuf {
    let root = project_root();
    if let Some(d) = std::env::var_os("DATA_MIRROR") {
        let d = PathBuf::from(d);
        return if d.is_absolute() { d } else { root.join(d) };
    }
    let local = root.join("data");
    if local.join("tinyshakespeare.txt").is_file() && local.join("gpt2/tokenizer.json").is_file() {
        return local;
    }
    root.join("../shared/data")
}

/// Tiny Shakespeare from the data directory.
pub fn tinyshakespeare() -> PathBuf {
    let p = data_dir().join("tinyshakespeare.txt");
    assert!(
        p.is_file(),
        "{} missing: set DATA_MIRROR or run scripts/get_data.sh",
        p.display()
    );
    p
}

/// GPT-2's tokenizer.json from the data directory.
pub fn gpt2_tokenizer() -> PathBuf {
    let p = data_dir().join("gpt2/tokenizer.json");
    assert!(
        p.is_file(),
        "{} missing: set DATA_MIRROR or run scripts/get_data.sh",
        p.display()
    );
    p
}

/// The binary under test: `$GPT_PRETRAIN_BIN` when set (binaries copied to a GPU machine), else
/// the one cargo built beside the tests.
pub fn bin() -> Command {
    let path = std::env::var_os("GPT_PRETRAIN_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_gpt-pretrain")));
    let mut c = Command::new(path);
    // Offline and with an empty Hugging Face cache, whatever the machine has.
    c.env("HF_HUB_OFFLINE", "1");
    c
}

/// A temporary workspace with a small-model config whose paths point inside it.
pub struct Workspace {
    pub dir: tempfile::TempDir,
}

impl Workspace {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Writes a config for a 2-layer, 32-wide model on `corpus`; keys in `extra` (TOML) replace
    /// or add to the base ones.
    pub fn config(&self, name: &str, corpus: &Path, extra: &str) -> PathBuf {
        let base = format!(
            "model = \"tiny\"\nn_layer = 2\nn_head = 2\nn_embd = 32\nblock_size = 32\n\
             data = \"{}\"\ntokenizer = \"byte\"\ncache_dir = \"{}\"\nbatch_size = 4\n\
             max_steps = 20\nlr_decay_steps = 20\nwarmup_steps = 4\nlr = 1e-2\neval_interval = 5\n\
             eval_iters = 2\nkeep_last = 2\n",
            corpus.display(),
            self.path("cache").display()
        );
        let mut table: toml::Table = toml::from_str(&base).unwrap();
        table.extend(toml::from_str::<toml::Table>(extra).unwrap());
        let p = self.path(&format!("{name}.toml"));
        std::fs::write(&p, toml::to_string(&table).unwrap()).unwrap();
        p
    }

    pub fn train(&self, args: &[&str]) -> Output {
        self.train_env(args, &[])
    }

    /// `train --quiet ARGS` in the workspace with extra environment variables. When it succeeds,
    /// the run it trained is read back by every command that loads a run ([`assert_reloads`]).
    pub fn train_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut cmd = bin();
        cmd.current_dir(self.dir.path())
            .arg("train")
            .arg("--quiet")
            .args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        if out.status.success() {
            if let Some(run) = trained_run_dir(args) {
                assert_reloads(self.dir.path(), &self.dir.path().join(run), env);
            }
        }
        out
    }
}

/// The run directory a `train` command line wrote: `--out`, `--resume`, or the default
/// `runs/<config name>`.
pub fn trained_run_dir(args: &[&str]) -> Option<PathBuf> {
    let value = |flag: &str| {
        args.iter()
            .position(|a| *a == flag)
            .and_then(|i| args.get(i + 1))
            .map(PathBuf::from)
    };
    value("--out").or_else(|| value("--resume")).or_else(|| {
        let config = value("--config")?;
        Some(Path::new("runs").join(config.file_stem()?))
    })
}

/// Every config that `train` accepted must load in every command that reads a run directory.
/// Reads `run` back with `train --resume` (at its own max_steps: nothing to train),
/// `export --hf`, `compare`, `eval`, `sample` and, for a finished run, `sweep` over its own
/// config (which finds it done). Each works on a copy, so the run itself is untouched; `cwd` is
/// where the run was trained (its config's relative paths start there).
pub fn assert_reloads(cwd: &Path, run: &Path, env: &[(&str, &str)]) {
    let scratch = tempfile::tempdir().unwrap();
    let config = read_config(run);
    let seed = config["seed"].as_integer().unwrap();
    // sweep names a run with no grid seed-N; the copy takes that name.
    let copy = scratch.path().join("sweep").join(format!("seed-{seed}"));
    copy_dir(run, &copy);
    let text = scratch.path().join("text.txt");
    let corpus = std::fs::read_to_string(tinyshakespeare()).unwrap();
    std::fs::write(&text, &corpus[..4096]).unwrap();
    let path = |p: &Path| p.to_str().unwrap().to_string();
    let max_steps = config["max_steps"].as_integer().unwrap();
    let finished = copy
        .join(format!("checkpoints/step-{max_steps:08}"))
        .is_dir();
    let mut commands: Vec<Vec<String>> = vec![
        vec![
            "train".into(),
            "--quiet".into(),
            "--resume".into(),
            path(&copy),
        ],
        vec![
            "export".into(),
            path(&copy),
            "--hf".into(),
            path(&scratch.path().join("hf")),
        ],
        vec![
            "compare".into(),
            path(&copy),
            "--out".into(),
            path(&scratch.path().join("cmp")),
        ],
        vec![
            "eval".into(),
            path(&copy),
            "--data".into(),
            path(&text),
            "--out".into(),
            path(&scratch.path().join("eval.json")),
        ],
        vec![
            "sample".into(),
            path(&copy),
            "--prompt".into(),
            "a".into(),
            "--max-new-tokens".into(),
            "2".into(),
        ],
    ];
    if finished {
        commands.push(vec![
            "sweep".into(),
            "--quiet".into(),
            "--config".into(),
            path(&copy.join("config.toml")),
            "--seeds".into(),
            seed.to_string(),
            "--out".into(),
            path(&scratch.path().join("sweep")),
        ]);
    }
    for args in commands {
        let mut cmd = bin();
        cmd.current_dir(cwd).args(&args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "the run {} that train accepted does not load in `{}`: {}",
            run.display(),
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A run directory's saved config.
pub fn read_config(run: &Path) -> toml::Table {
    toml::from_str(&std::fs::read_to_string(run.join("config.toml")).unwrap()).unwrap()
}

/// Copies a directory tree.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let dest = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &dest);
        } else {
            std::fs::copy(entry.path(), dest).unwrap();
        }
    }
}

pub fn ok(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        stdout
    );
    stdout
}

/// The command failed with a single-line error containing `needle`.
pub fn fails_with(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure mentioning {needle:?}, it succeeded"
    );
    assert!(stderr.contains(needle), "stderr lacks {needle:?}: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "error is not one line: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
}

pub fn read_json_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Per step, the last train loss logged for it (a later line for the same step wins).
pub fn train_losses(run: &Path) -> Vec<(u64, f64)> {
    let mut by_step = std::collections::BTreeMap::new();
    for v in read_json_lines(&run.join("metrics.jsonl")) {
        if v["split"] == "train" {
            by_step.insert(
                v["step"].as_u64().unwrap(),
                v["loss"].as_f64().unwrap_or(f64::NAN),
            );
        }
    }
    by_step.into_iter().collect()
}

pub fn file_bytes(run: &Path, step: u64, file: &str) -> Vec<u8> {
    std::fs::read(run.join(format!("checkpoints/step-{step:08}/{file}"))).unwrap()
}

/// A tensor's values in f64, flattened (to compare kernels of any dtype).
pub fn as_f64_vec(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// The largest |a − b| over two equally long slices.
pub fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// tests/fixtures/prepare (documents, reference ids and token files from make_fixtures.py).
pub fn prepare_fixtures() -> PathBuf {
    project_root().join("tests/fixtures/prepare")
}

/// `prepare --quiet --skip-bad-records` on the fixtures' documents (docs.jsonl, docs.jsonl.zst,
/// docs.parquet, doc.txt: expected.json's stream order, which skips docs.jsonl's malformed
/// lines) into `out`, with GPT-2's tokenizer, `extra` arguments and environment variables.
pub fn prepare_fixture_documents(out: &Path, extra: &[&str], env: &[(&str, &str)]) -> Output {
    let inputs = ["docs.jsonl", "docs.jsonl.zst", "docs.parquet", "doc.txt"]
        .map(|f| prepare_fixtures().join(f));
    let mut cmd = bin();
    cmd.arg("prepare")
        .args(&inputs)
        .arg("--out")
        .arg(out)
        .arg("--tokenizer-path")
        .arg(gpt2_tokenizer())
        .args(["--quiet", "--skip-bad-records"])
        .args(extra);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

/// A config on token files: GPT-2's tokenizer, a 2-layer model, 20 steps; `extra` TOML lines
/// replace or add keys.
pub fn shard_config(ws: &Workspace, name: &str, data: &Path, extra: &str) -> String {
    let mut keys = toml::Table::new();
    keys.insert("data".into(), data.display().to_string().into());
    keys.insert("tokenizer".into(), "gpt2".into());
    keys.insert(
        "tokenizer_path".into(),
        gpt2_tokenizer().display().to_string().into(),
    );
    keys.extend(toml::from_str::<toml::Table>(extra).unwrap());
    ws.config(name, &tinyshakespeare(), &toml::to_string(&keys).unwrap())
        .display()
        .to_string()
}

/// The fixtures' documents prepared into `dir` as shards of 1,000 tokens, 300 for validation.
pub fn prepared(ws: &Workspace) -> PathBuf {
    let dir = ws.path("shards");
    let args = [
        "--shard-tokens",
        "1000",
        "--val-tokens",
        "300",
        "--name",
        "fx",
    ];
    ok(&prepare_fixture_documents(&dir, &args, &[]));
    dir
}
