//! Data parallel under `mpirun` (the `mpi` feature; OpenMPI's `mpirun` on the PATH): N ranks
//! against one process accumulating N times as many micro-batches, bitwise; a rank killed mid-run;
//! SIGTERM; ranks that disagree; a changed world size on resume.
#![cfg(feature = "mpi")]

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// `mpirun` in the workspace, before its ranks: ranks run one thread each; CI runs as root; 2 ranks
/// may outnumber the cores; no binding, so ranks never share one.
fn mpirun_base(ws: &Workspace) -> Command {
    // Each job's own OpenMPI session directory: tests run their mpiruns concurrently, and two
    // creating the shared /tmp/ompi.HOST.UID at once fail with "File exists" (seen in CI).
    let session_dir = ws.path("ompi-session");
    std::fs::create_dir_all(&session_dir).unwrap();
    let mut cmd = Command::new("mpirun");
    cmd.current_dir(ws.dir.path())
        .env("OMPI_MCA_orte_tmpdir_base", &session_dir)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("RAYON_NUM_THREADS", "1")
        .args(["--oversubscribe", "--bind-to", "none"]);
    cmd
}

/// `mpirun -np N gpt-pretrain train --quiet ARGS` in the workspace. Ranks run one thread each,
/// as does the single process they are compared with (results do not depend on the thread count,
/// but the machine has 2 cores).
fn mpirun(ws: &Workspace, np: usize, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = mpirun_base(ws);
    cmd.env("HF_HUB_OFFLINE", "1")
        .args(["-np", &np.to_string()]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.arg(bin().get_program())
        .arg("train")
        .arg("--quiet")
        .args(args);
    cmd
}

fn mpirun_output(ws: &Workspace, np: usize, args: &[&str], env: &[(&str, &str)]) -> Output {
    mpirun(ws, np, args, env)
        .output()
        .expect("mpirun not found: install OpenMPI (apt-get install openmpi-bin libopenmpi-dev)")
}

fn single(ws: &Workspace, args: &[&str]) -> Output {
    ws.train_env(args, &[("RAYON_NUM_THREADS", "1")])
}

fn mpi_ok(out: &Output) {
    assert!(
        out.status.success(),
        "mpirun failed ({}): {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Every metrics event without its timings (ms, tok/s), which differ from run to run.
fn events(run: &Path) -> Vec<serde_json::Value> {
    read_json_lines(&run.join("metrics.jsonl"))
        .into_iter()
        .map(|mut v| {
            let o = v.as_object_mut().unwrap();
            o.remove("ms");
            o.remove("tok_per_s");
            o.remove("reduce_ms");
            v
        })
        .collect()
}

fn assert_same_run(a: &Path, b: &Path, step: u64) {
    let (ea, eb) = (events(a), events(b));
    assert!(!ea.is_empty());
    assert_eq!(ea, eb, "metrics differ between {a:?} and {b:?}");
    for file in ["model.safetensors", "optimizer.safetensors"] {
        assert!(
            file_bytes(a, step, file) == file_bytes(b, step, file),
            "{file} at step {step} differs between {a:?} and {b:?}"
        );
    }
}

#[test]
fn two_ranks_equal_one_process_with_twice_the_accumulation() {
    let ws = Workspace::new();
    // Dropout on: its masks follow the global micro-step, whichever rank draws them.
    let cfg = ws.config(
        "dp",
        &tinyshakespeare(),
        "max_steps = 30\nlr_decay_steps = 30\neval_interval = 10\ndropout = 0.1\neval_iters = 3",
    );
    let cfg = cfg.to_str().unwrap();
    for (per_rank, total) in [(1, 2), (2, 4)] {
        let (ranks, one) = (format!("ranks-a{per_rank}"), format!("one-a{total}"));
        mpi_ok(&mpirun_output(
            &ws,
            2,
            &[
                "--config",
                cfg,
                "--out",
                &ranks,
                "--set",
                &format!("grad_accum={per_rank}"),
            ],
            &[],
        ));
        ok(&single(
            &ws,
            &[
                "--config",
                cfg,
                "--out",
                &one,
                "--set",
                &format!("grad_accum={total}"),
            ],
        ));
        assert_same_run(&ws.path(&ranks), &ws.path(&one), 30);
        // Tokens are global: 2 ranks × grad_accum × batch 4 × block 32 per step.
        let last = events(&ws.path(&ranks)).pop().unwrap();
        assert_eq!(last["tokens"], 30 * total * 4 * 32, "{last}");
        let logged = read_json_lines(&ws.path(&ranks).join("metrics.jsonl"));
        assert!(logged
            .iter()
            .filter(|v| v["split"] == "train")
            .all(|v| v["reduce_ms"].as_f64().is_some_and(|ms| ms >= 0.0)));
        // Rank 0 alone wrote the run directory, and it records the world size.
        let header: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(ws.path(&ranks).join("run.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(header["world_size"], 2);
    }
    // Muon, with its state sharded (whole tensors per rank, as its orthogonalisation needs):
    // two ranks equal one process, bit for bit.
    let muon = ws.config(
        "muon",
        &tinyshakespeare(),
        "max_steps = 12\nlr_decay_steps = 12\neval_interval = 6\noptimizer = \"muon\"\nweight_decay = 0.01",
    );
    let muon = muon.to_str().unwrap();
    mpi_ok(&mpirun_output(
        &ws,
        2,
        &[
            "--config",
            muon,
            "--out",
            "muon-zero",
            "--set",
            "zero_stage=1",
        ],
        &[],
    ));
    ok(&single(
        &ws,
        &[
            "--config",
            muon,
            "--out",
            "muon-one",
            "--set",
            "grad_accum=2",
        ],
    ));
    assert_same_run(&ws.path("muon-zero"), &ws.path("muon-one"), 12);
    // The comparison can fail: one rank with the same per-rank batch trains on half the data.
    ok(&single(&ws, &["--config", cfg, "--out", "half"]));
    assert_ne!(
        train_losses(&ws.path("half")),
        train_losses(&ws.path("ranks-a1"))
    );
}

#[test]
fn two_ranks_on_token_shards_equal_one_process() {
    let ws = Workspace::new();
    let shards = prepared(&ws);
    let cfg = shard_config(
        &ws,
        "shards",
        &shards,
        "max_steps = 30\nlr_decay_steps = 30\neval_interval = 10",
    );
    let cfg = cfg.as_str();
    mpi_ok(&mpirun_output(
        &ws,
        2,
        &["--config", cfg, "--out", "ranks"],
        &[],
    ));
    ok(&single(
        &ws,
        &["--config", cfg, "--out", "one", "--set", "grad_accum=2"],
    ));
    assert_same_run(&ws.path("ranks"), &ws.path("one"), 30);
}

/// The pid of the rank `rank` among mpirun's children (its environment says which it is).
fn rank_pid(mpirun: &Child, rank: usize) -> Option<i32> {
    // Each of mpirun's threads lists the children it forked.
    let mut children = String::new();
    for task in std::fs::read_dir(format!("/proc/{}/task", mpirun.id())).ok()? {
        let path = task.ok()?.path().join("children");
        children += &std::fs::read_to_string(path).unwrap_or_default();
        children.push(' ');
    }
    children
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|env| {
                env.split(|&b| b == 0)
                    .any(|kv| kv == format!("OMPI_COMM_WORLD_RANK={rank}").as_bytes())
            })
        })
}

/// Waits until the run has logged a step at or past `step`.
fn wait_for_step(run: &Path, step: u64, job: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let reached = std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .any(|v| v["step"].as_u64().is_some_and(|s| s >= step));
        if reached {
            return;
        }
        assert!(
            job.try_wait().unwrap().is_none(),
            "the job ended before step {step}"
        );
        assert!(
            Instant::now() < deadline,
            "step {step} not reached in 120 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits for the job to end by itself, at most `limit`.
fn ends_within(job: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = job.try_wait().unwrap() {
            return status;
        }
        if started.elapsed() > limit {
            let _ = job.kill();
            panic!("the job did not end within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn long_config(ws: &Workspace) -> PathBuf {
    ws.config(
        "long",
        &tinyshakespeare(),
        "max_steps = 60\nlr_decay_steps = 60\neval_interval = 10\nkeep_last = 10",
    )
}

#[test]
fn a_killed_rank_ends_the_job_and_resume_continues_bitwise() {
    let ws = Workspace::new();
    let cfg = long_config(&ws);
    let cfg = cfg.to_str().unwrap();
    mpi_ok(&mpirun_output(
        &ws,
        2,
        &["--config", cfg, "--out", "whole"],
        &[],
    ));
    // Slowed so that the kill lands mid-run: 40 ms per metrics line.
    let slow = [("GPT_PRETRAIN_SLOW_METRICS_MS", "20")];
    let mut job = mpirun(&ws, 2, &["--config", cfg, "--out", "killed"], &slow)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(ws.path("killed.stderr")).unwrap())
        .spawn()
        .unwrap();
    wait_for_step(&ws.path("killed"), 25, &mut job);
    let victim = rank_pid(&job, 1).expect("rank 1 among mpirun's children");
    let survivor = rank_pid(&job, 0).expect("rank 0 among mpirun's children");
    unsafe { libc::kill(victim, libc::SIGKILL) };
    let status = ends_within(&mut job, Duration::from_secs(30));
    assert!(!status.success(), "{status}");
    // mpirun returns once it has signalled the other ranks; rank 0 (which holds the run's lock)
    // must be gone too, within the same 30 s, before a resume can take the run over.
    let started = Instant::now();
    while std::path::Path::new(&format!("/proc/{survivor}")).exists() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "rank 0 outlived the job by 30 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let last = std::fs::read_dir(ws.path("killed/checkpoints"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("step-"))
        .count();
    assert!(last >= 2, "no checkpoint after step 0 before the kill");
    mpi_ok(&mpirun_output(&ws, 2, &["--resume", "killed"], &[]));
    assert_eq!(
        train_losses(&ws.path("whole")),
        train_losses(&ws.path("killed"))
    );
    for file in ["model.safetensors", "optimizer.safetensors"] {
        assert!(
            file_bytes(&ws.path("whole"), 60, file) == file_bytes(&ws.path("killed"), 60, file),
            "{file} differs after resume"
        );
    }
}

#[test]
fn sigterm_checkpoints_every_rank_and_exits_143() {
    let ws = Workspace::new();
    let cfg = long_config(&ws);
    let cfg = cfg.to_str().unwrap();
    let slow = [("GPT_PRETRAIN_SLOW_METRICS_MS", "20")];
    let mut job = mpirun(&ws, 2, &["--config", cfg, "--out", "run"], &slow)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_step(&ws.path("run"), 15, &mut job);
    // As a scheduler does: every rank gets the signal.
    for rank in 0..2 {
        let pid = rank_pid(&job, rank).expect("rank among mpirun's children");
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let status = ends_within(&mut job, Duration::from_secs(30));
    let mut stderr = String::new();
    std::io::Read::read_to_string(job.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(143), "{stderr}");
    assert!(
        stderr.contains("interrupted by SIGTERM after step"),
        "{stderr}"
    );
    let step: u64 = stderr
        .split("after step ")
        .nth(1)
        .and_then(|s| s.split(';').next())
        .and_then(|s| s.trim().parse().ok())
        .expect("the step in the message");
    assert!(ws
        .path(&format!("run/checkpoints/step-{step:08}/model.safetensors"))
        .is_file());
}

/// `mpirun` with one rank per (binary, config) pair: `train --quiet --out run --config CONFIG`.
fn mpmd(ws: &Workspace, ranks: &[(&Path, &Path)]) -> Output {
    let mut cmd = mpirun_base(ws);
    for (i, (program, config)) in ranks.iter().enumerate() {
        if i > 0 {
            cmd.arg(":");
        }
        cmd.args(["-np", "1"])
            .arg(program)
            .args(["train", "--quiet", "--out", "run", "--config"])
            .arg(config);
    }
    cmd.output().unwrap()
}

#[test]
fn ranks_with_different_configs_are_refused_before_touching_disk() {
    let ws = Workspace::new();
    let a = ws.config("a", &tinyshakespeare(), "");
    let b = ws.config("b", &tinyshakespeare(), "lr = 2e-2");
    // MPMD: rank 0 and rank 1 started with different configs.
    let program = PathBuf::from(bin().get_program());
    let out = mpmd(&ws, &[(&program, &a), (&program, &b)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("error: rank 1 has a different config than rank 0"),
        "{stderr}"
    );
    assert!(!ws.path("run").exists(), "the run directory was created");

    // The same config, but rank 1 runs another binary (a copy with a byte appended: it still runs).
    let other = ws.path("gpt-pretrain-other");
    let mut bytes = std::fs::read(bin().get_program()).unwrap();
    bytes.push(0);
    std::fs::write(&other, bytes).unwrap();
    std::fs::set_permissions(&other, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let out = mpmd(&ws, &[(&program, &a), (&other, &a)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("error: rank 1 has a different binary than rank 0"),
        "{stderr}"
    );
    assert!(!ws.path("run").exists(), "the run directory was created");
}

#[test]
fn ranks_whose_parameters_drift_apart_stop_at_the_checkpoint() {
    let ws = Workspace::new();
    let cfg = ws.config("drift", &tinyshakespeare(), "");
    let out = mpirun_output(
        &ws,
        2,
        &["--config", cfg.to_str().unwrap(), "--out", "run"],
        &[("GPT_PRETRAIN_DESYNC_RANK", "1")],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(
            "error: rank 1 has a different model and optimizer state after step 5 than rank 0"
        ),
        "{stderr}"
    );
    // Nothing of the drifted state was saved.
    assert!(!ws.path("run/checkpoints/step-00000005").exists());
}

#[test]
fn a_different_world_size_on_resume_is_refused() {
    let ws = Workspace::new();
    let cfg = ws.config("resize", &tinyshakespeare(), "");
    let cfg = cfg.to_str().unwrap();
    mpi_ok(&mpirun_output(
        &ws,
        2,
        &["--config", cfg, "--out", "two", "--set", "max_steps=10"],
        &[],
    ));
    let out = single(&ws, &["--resume", "two", "--set", "max_steps=20"]);
    fails_with(&out, "was trained on 2 rank(s) and this job has 1");
    let out = mpirun_output(&ws, 3, &["--resume", "two", "--set", "max_steps=20"], &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("was trained on 2 rank(s) and this job has 3"));
    // The refused resumes left the run as it was: it still resumes on 2 ranks.
    mpi_ok(&mpirun_output(
        &ws,
        2,
        &["--resume", "two", "--set", "max_steps=20"],
        &[],
    ));
    assert_eq!(train_losses(&ws.path("two")).len(), 20);
}

#[test]
fn ranks_cannot_share_a_named_gpu() {
    let ws = Workspace::new();
    let cfg = ws.config("gpu", &tinyshakespeare(), "device = \"cuda:1\"");
    let out = mpirun_output(
        &ws,
        2,
        &["--config", cfg.to_str().unwrap(), "--out", "run"],
        &[],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("device = \"cuda:1\" with 2 ranks: use device = \"cuda\""),
        "{stderr}"
    );
}

#[test]
fn zero_stage_1_shards_the_optimizer_state_without_changing_a_bit() {
    let ws = Workspace::new();
    let cfg = ws.config(
        "zero",
        &tinyshakespeare(),
        "max_steps = 30\nlr_decay_steps = 30\neval_interval = 10\nweight_decay = 0.1",
    );
    let cfg = cfg.to_str().unwrap();
    let zero = ["--set", "zero_stage=1"];
    mpi_ok(&mpirun_output(
        &ws,
        2,
        &[&["--config", cfg, "--out", "zero"][..], &zero].concat(),
        &[],
    ));
    ok(&single(
        &ws,
        &["--config", cfg, "--out", "one", "--set", "grad_accum=2"],
    ));
    // optimizer.safetensors holds the whole state, gathered from both shards.
    assert_same_run(&ws.path("zero"), &ws.path("one"), 30);
    // Checkpoints hold the whole state, so a run may switch zero_stage when it resumes.
    mpi_ok(&mpirun_output(
        &ws,
        2,
        &[
            &["--config", cfg, "--out", "switch", "--set", "max_steps=10"][..],
            &zero,
        ]
        .concat(),
        &[],
    ));
    mpi_ok(&mpirun_output(
        &ws,
        2,
        &[
            "--resume",
            "switch",
            "--set",
            "max_steps=30",
            "--set",
            "zero_stage=0",
        ],
        &[],
    ));
    assert_eq!(
        train_losses(&ws.path("switch")),
        train_losses(&ws.path("one"))
    );
    for file in ["model.safetensors", "optimizer.safetensors"] {
        assert!(
            file_bytes(&ws.path("switch"), 30, file) == file_bytes(&ws.path("one"), 30, file),
            "{file} differs after switching zero_stage"
        );
    }
}
