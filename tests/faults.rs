//! Fault injection: kill -9 at random moments (many inside checkpoint writes), SIGTERM and SIGINT,
//! a second signal, a corrupted checkpoint, a torn metrics line, a full disk, a concurrent second
//! process, a changed corpus, and non-finite losses. After each, the run resumes and must end
//! bitwise equal (parameters, optimizer state, losses) to an uninterrupted run of the same steps.

mod common;

use common::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const STEPS: u64 = 48;

/// The workspace, its config, and the uninterrupted reference run.
struct Setup {
    ws: Workspace,
    cfg: PathBuf,
    reference: PathBuf,
}

fn setup(extra: &str) -> Setup {
    let ws = Workspace::new();
    let cfg = ws.config(
        "c",
        &common::tinyshakespeare(),
        &format!(
            "max_steps = {STEPS}\nlr_decay_steps = {STEPS}\neval_interval = 3\neval_iters = 1\n\
             keep_last = 3\noptimizer = \"adopt\"\n{extra}"
        ),
    );
    ok(&ws.train(&["--config", cfg.to_str().unwrap(), "--out", "reference"]));
    let reference = ws.path("reference");
    Setup { ws, cfg, reference }
}

impl Setup {
    fn cfg(&self) -> &str {
        self.cfg.to_str().unwrap()
    }

    /// A training process in the background, with stdout/stderr captured.
    fn spawn(&self, args: &[&str], env: &[(&str, &str)]) -> Child {
        let mut cmd = bin();
        cmd.current_dir(self.ws.dir.path())
            .arg("train")
            .arg("--quiet")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.spawn().unwrap()
    }

    /// The run matches the reference: final parameters and optimizer state byte for byte, and
    /// every step's loss.
    fn assert_matches_reference(&self, run: &Path) {
        for file in ["model.safetensors", "optimizer.safetensors"] {
            assert!(
                file_bytes(run, STEPS, file) == file_bytes(&self.reference, STEPS, file),
                "{}: {file} differs from the uninterrupted run",
                run.display()
            );
        }
        let (ours, theirs) = (train_losses(run), train_losses(&self.reference));
        assert_eq!(ours.len() as u64, STEPS);
        assert_eq!(ours, theirs, "{}: losses differ", run.display());
        // One consistent history: every line parses, one train line per step.
        let lines = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
        let train_lines = lines.lines().filter(|l| l.contains("\"train\"")).count();
        assert_eq!(
            train_lines as u64,
            STEPS,
            "{}: duplicate or missing train lines",
            run.display()
        );
    }
}

/// Every complete checkpoint of a run loads and passes its checksums.
fn assert_checkpoints_intact(run: &Path) -> usize {
    let complete = gpt_pretrain::train::checkpoint::list_complete(run).unwrap();
    for (_, dir) in &complete {
        gpt_pretrain::train::checkpoint::load_dir(dir, &candle_core::Device::Cpu)
            .unwrap_or_else(|e| panic!("{} is damaged: {e:#}", dir.display()));
    }
    complete.len()
}

fn has_incomplete_checkpoint(run: &Path) -> bool {
    std::fs::read_dir(run.join("checkpoints"))
        .map(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with(".tmp-"))
        })
        .unwrap_or(false)
}

fn metrics_torn(run: &Path) -> bool {
    std::fs::read(run.join("metrics.jsonl")).is_ok_and(|b| !b.is_empty() && !b.ends_with(b"\n"))
}

fn wait_for_train_lines(run: &Path, n: usize, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let count = std::fs::read_to_string(run.join("metrics.jsonl"))
            .map(|s| s.lines().filter(|l| l.contains("\"train\"")).count())
            .unwrap_or(0);
        if count >= n {
            return;
        }
        assert!(child.try_wait().unwrap().is_none(), "the run ended early");
        assert!(Instant::now() < deadline, "the run made no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The highest step with a complete train line (a torn last line is ignored).
fn max_train_step(run: &Path) -> u64 {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["split"] == "train")
        .filter_map(|v| v["step"].as_u64())
        .max()
        .unwrap_or(0)
}

/// Waits until the run has logged `step`; false if it exited first.
fn wait_for_step(run: &Path, step: u64, child: &mut Child) -> bool {
    let deadline = Instant::now() + Duration::from_secs(60);
    while max_train_step(run) < step {
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        assert!(Instant::now() < deadline, "the run made no progress");
        std::thread::sleep(Duration::from_millis(1));
    }
    true
}

fn send(child: &Child, signal: i32) {
    // SAFETY: signalling our own child process.
    assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
}

#[test]
fn kill_9_at_random_moments_loses_nothing() {
    let s = setup("");
    // Slow checkpoint and metrics writes widen the windows a kill can land in.
    let env = [
        ("GPT_PRETRAIN_SLOW_CHECKPOINT_MS", "8"),
        ("GPT_PRETRAIN_SLOW_METRICS_MS", "2"),
    ];
    let mut rng = ChaCha8Rng::seed_from_u64(20261125);
    let (mut trials, mut kills, mut inside_checkpoint, mut torn, mut before_first) =
        (0, 0, 0, 0, 0);
    let mut recovered = 0;
    // At least 20 trials, and more (up to 60) until 3 kills have landed inside a checkpoint
    // write: where a kill lands depends on the machine's load.
    for trial in 0..60 {
        if trial >= 20 && inside_checkpoint >= 3 {
            break;
        }
        trials += 1;
        let run = s.ws.path(&format!("trial{trial}"));
        let run_arg = run.to_str().unwrap().to_string();
        let kills_this_trial = rng.random_range(1..=3);
        let mut attempt = 0;
        loop {
            let resume_step = gpt_pretrain::train::checkpoint::list_complete(&run)
                .ok()
                .and_then(|c| c.last().map(|(step, _)| *step));
            if resume_step.is_none() && run.exists() {
                // Killed before its first checkpoint: nothing was saved, so start over.
                std::fs::remove_dir_all(&run).unwrap();
                before_first += 1;
            }
            let args: Vec<&str> = match resume_step {
                Some(_) => vec!["--resume", &run_arg],
                None => vec!["--config", s.cfg(), "--out", &run_arg],
            };
            let mut child = s.spawn(&args, &env);
            if attempt < kills_this_trial {
                // Kill a few milliseconds after a random step past the resume point: often inside
                // the evaluation and checkpoint that follow every third step.
                let from = resume_step.unwrap_or(0) + 1;
                let target = rng.random_range(from..STEPS);
                let delay = Duration::from_millis(rng.random_range(0..40));
                if wait_for_step(&run, target, &mut child) {
                    std::thread::sleep(delay);
                }
                if child.try_wait().unwrap().is_none() {
                    child.kill().unwrap(); // SIGKILL
                    child.wait().unwrap();
                    kills += 1;
                    inside_checkpoint += has_incomplete_checkpoint(&run) as usize;
                    torn += metrics_torn(&run) as usize;
                    attempt += 1;
                    continue;
                }
            }
            let out = child.wait_with_output().unwrap();
            ok(&out);
            break;
        }
        assert!(!has_incomplete_checkpoint(&run));
        s.assert_matches_reference(&run);
        recovered += 1;
        std::fs::remove_dir_all(&run).unwrap();
    }
    eprintln!(
        "kill -9 loop: {trials} trials, {kills} kills, {inside_checkpoint} inside a checkpoint write, \
         {torn} leaving a torn metrics line, {before_first} before the first checkpoint, \
         {recovered} runs recovered bitwise, 0 bytes lost"
    );
    assert_eq!(recovered, trials);
    assert!(kills >= trials, "too few kills ({kills})");
    assert!(
        inside_checkpoint >= 3,
        "too few kills landed inside checkpoint writes ({inside_checkpoint})"
    );
}

fn stop_with(signal: i32, expected_code: i32, name: &str) {
    let s = setup("");
    let run = s.ws.path("run");
    let mut child = s.spawn(
        &["--config", s.cfg(), "--out", "run"],
        &[("GPT_PRETRAIN_SLOW_METRICS_MS", "20")],
    );
    wait_for_train_lines(&run, 5, &mut child);
    send(&child, signal);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(expected_code), "{stderr}");
    assert!(
        stderr.contains(&format!("interrupted by {name} after step")),
        "{stderr}"
    );
    // It stopped right after a step, and that step is checkpointed with its metrics flushed.
    let last_step = train_losses(&run).last().unwrap().0;
    assert!(last_step < STEPS);
    let newest = gpt_pretrain::train::checkpoint::list_complete(&run)
        .unwrap()
        .last()
        .unwrap()
        .0;
    assert_eq!(newest, last_step, "{stderr}");
    assert!(stderr.contains(&format!("step-{last_step:08}")));
    ok(&s.ws.train(&["--resume", "run"]));
    s.assert_matches_reference(&run);
}

#[test]
fn sigterm_checkpoints_and_exits_143() {
    stop_with(libc::SIGTERM, 143, "SIGTERM");
}

#[test]
fn sigint_checkpoints_and_exits_130() {
    stop_with(libc::SIGINT, 130, "SIGINT");
}

#[test]
fn a_second_signal_exits_at_once_without_damage() {
    let s = setup("");
    let run = s.ws.path("run");
    // Each checkpoint now takes seconds, so the second signal arrives while one is being written.
    let mut child = s.spawn(
        &["--config", s.cfg(), "--out", "run"],
        &[("GPT_PRETRAIN_SLOW_CHECKPOINT_MS", "1500")],
    );
    wait_for_train_lines(&run, 1, &mut child);
    send(&child, libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(300));
    let second = Instant::now();
    send(&child, libc::SIGTERM);
    let out = child.wait_with_output().unwrap();
    assert!(
        second.elapsed() < Duration::from_millis(1200),
        "did not exit at once"
    );
    assert_eq!(out.status.code(), Some(143));
    assert_checkpoints_intact(&run);
    // Whatever it was writing is discarded on resume, which then finishes the run exactly.
    let resumed = s.ws.train(&["--resume", "run"]);
    if gpt_pretrain::train::checkpoint::list_complete(&run)
        .unwrap()
        .is_empty()
    {
        // It never completed a checkpoint: resume must say so, and a fresh start is the recovery.
        fails_with(&resumed, "no complete checkpoint");
    } else {
        ok(&resumed);
        s.assert_matches_reference(&run);
    }
}

#[test]
fn a_corrupted_checkpoint_is_skipped_and_the_previous_one_used() {
    let s = setup("");
    ok(&s
        .ws
        .train(&["--config", s.cfg(), "--out", "run", "--set", "max_steps=30"]));
    let run = s.ws.path("run");
    let victim = run.join("checkpoints/step-00000030/optimizer.safetensors");
    let mut bytes = std::fs::read(&victim).unwrap();
    let n = bytes.len();
    bytes[n - 7] ^= 0x40;
    std::fs::write(&victim, bytes).unwrap();
    let out =
        s.ws.train(&["--resume", "run", "--set", &format!("max_steps={STEPS}")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    ok(&out);
    assert!(
        stderr.contains("skipped checkpoint")
            && stderr.contains("step-00000030")
            && stderr.contains("checksum"),
        "{stderr}"
    );
    s.assert_matches_reference(&run);
}

#[test]
fn a_torn_metrics_line_is_set_aside() {
    let s = setup("");
    ok(&s
        .ws
        .train(&["--config", s.cfg(), "--out", "run", "--set", "max_steps=30"]));
    let run = s.ws.path("run");
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(run.join("metrics.jsonl"))
        .unwrap();
    std::io::Write::write_all(&mut f, b"{\"step\":31,\"tokens\":39").unwrap();
    drop(f);
    let out =
        s.ws.train(&["--resume", "run", "--set", &format!("max_steps={STEPS}")]);
    ok(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("incomplete"));
    let aside = std::fs::read_to_string(run.join("metrics.superseded.jsonl")).unwrap();
    assert!(aside.contains("{\"step\":31,\"tokens\":39"), "{aside}");
    s.assert_matches_reference(&run);
}

#[test]
fn metrics_after_the_checkpoint_are_superseded() {
    // A crash after steps 31-33 were logged but before their checkpoint: resume restarts at 30
    // and the history shows each step once.
    let s = setup("");
    ok(&s
        .ws
        .train(&["--config", s.cfg(), "--out", "run", "--set", "max_steps=33"]));
    let run = s.ws.path("run");
    std::fs::remove_dir_all(run.join("checkpoints/step-00000033")).unwrap();
    let out =
        s.ws.train(&["--resume", "run", "--set", &format!("max_steps={STEPS}")]);
    ok(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("superseded"));
    s.assert_matches_reference(&run);
}

/// A small tmpfs, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: PathBuf, bytes: usize) -> Option<Self> {
        std::fs::create_dir_all(&path).unwrap();
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={bytes}"),
                "tmpfs",
                path.to_str().unwrap(),
            ])
            .stderr(Stdio::null())
            .status()
            .ok()?;
        status.success().then_some(Self(path))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_stops_the_run_and_keeps_earlier_checkpoints() {
    let s = setup("");
    // Each checkpoint of this model is ~420 KB; 1.2 MB fills during the third. Without the
    // privilege to mount a tmpfs, the same failure is injected at step 9.
    let disk = s.ws.path("disk");
    let tmpfs = Tmpfs::mount(disk.clone(), 1_200_000);
    let run = disk.join("run");
    let run_arg = run.to_str().unwrap().to_string();
    let mut env = Vec::new();
    if tmpfs.is_none() {
        eprintln!("note: cannot mount a tmpfs here; injecting ENOSPC instead");
        std::fs::create_dir_all(&disk).unwrap();
        env.push(("GPT_PRETRAIN_ENOSPC_AT_STEP", "9"));
    }
    let out = s
        .spawn(&["--config", s.cfg(), "--out", &run_arg], &env)
        .wait_with_output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the run did not notice the full disk"
    );
    assert!(stderr.contains("No space left on device"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    let kept = assert_checkpoints_intact(&run);
    assert!(kept >= 1, "no earlier checkpoint survived");
    assert!(
        !has_incomplete_checkpoint(&run),
        "the failed checkpoint was left behind"
    );
    // Move the run to a disk with room: it resumes and finishes exactly.
    let moved = s.ws.path("moved");
    copy_tree(&run, &moved);
    drop(tmpfs);
    ok(&s.ws.train(&["--resume", moved.to_str().unwrap()]));
    s.assert_matches_reference(&moved);
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn a_second_process_is_refused_and_a_crashed_lock_is_not_stuck() {
    let s = setup("");
    let run = s.ws.path("run");
    let mut first = s.spawn(
        &["--config", s.cfg(), "--out", "run"],
        &[("GPT_PRETRAIN_SLOW_METRICS_MS", "30")],
    );
    wait_for_train_lines(&run, 4, &mut first);
    let out = s.ws.train(&["--resume", "run"]);
    fails_with(&out, "is in use by another gpt-pretrain process");
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("pid {}", first.id())));
    fails_with(
        &s.ws.train(&["--config", s.cfg(), "--out", "run"]),
        "already exists",
    );
    first.kill().unwrap();
    first.wait().unwrap();
    ok(&s.ws.train(&["--resume", "run"]));
    s.assert_matches_reference(&run);
}

#[test]
fn a_changed_corpus_is_refused_unless_allowed_and_recorded() {
    let ws = Workspace::new();
    let corpus = ws.path("corpus.txt");
    std::fs::copy(common::tinyshakespeare(), &corpus).unwrap();
    let cfg = ws.config(
        "c",
        &corpus,
        "max_steps = 6\nlr_decay_steps = 12\neval_interval = 3",
    );
    ok(&ws.train(&["--config", cfg.to_str().unwrap(), "--out", "run"]));
    let text = std::fs::read_to_string(&corpus).unwrap();
    std::fs::write(&corpus, text.replace("Citizen", "Citoyen")).unwrap();
    let out = ws.train(&["--resume", "run", "--set", "max_steps=12"]);
    fails_with(&out, "changed since the run started");
    assert!(String::from_utf8_lossy(&out.stderr).contains("corpus.txt"));
    let out = ws.train(&[
        "--resume",
        "run",
        "--set",
        "max_steps=12",
        "--allow-data-change",
    ]);
    ok(&out);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("warning: resuming with a changed corpus")
    );
    let header: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ws.path("run/run.json")).unwrap()).unwrap();
    let overrides = header["overrides"].as_array().unwrap();
    assert_eq!(overrides.len(), 1);
    assert!(overrides[0].as_str().unwrap().contains("at step 6: corpus"));
}

#[test]
fn nan_policy_skip_counts_and_logs_skipped_steps() {
    let ws = Workspace::new();
    let cfg = ws.config(
        "c",
        &common::tinyshakespeare(),
        "max_steps = 9\nlr_decay_steps = 9\neval_interval = 3\nnan_policy = \"skip\"",
    );
    let out = ws.train_env(
        &["--config", cfg.to_str().unwrap(), "--out", "run"],
        &[("GPT_PRETRAIN_INJECT_NAN_AT_STEP", "5")],
    );
    ok(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("step 5 skipped"));
    let events = read_json_lines(&ws.path("run/metrics.jsonl"));
    let skipped: Vec<u64> = events
        .iter()
        .filter(|v| v["skipped"] == true)
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(skipped, vec![5]);
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(ws.path("run/checkpoints/step-00000009/state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["skipped_steps"], 1);
    // The skipped step changed nothing: the optimizer has taken 8 steps.
    let ckpt = gpt_pretrain::train::checkpoint::load_dir(
        &ws.path("run/checkpoints/step-00000009"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let step: Vec<i64> = ckpt.optimizer["step.transformer.wte.weight"]
        .to_vec1()
        .unwrap();
    assert_eq!(step, vec![8]);
}
