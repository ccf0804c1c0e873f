//! `tevatron train` end to end on the tiny BERT: outputs in Hugging Face's layout, a killed run
//! resumed to the same weights bit for bit, and every bad input the training issue lists
//! (exit code 2, one clear line, no panic, the last good checkpoint intact).

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{fails_with, names, ok, repo, tevatron};
use tevatron_model::testing::max_abs_diff_of;

fn data(f: &str) -> String {
    repo().join("testdata/train").join(f).to_string_lossy().into_owned()
}

fn tiny_bert() -> String {
    repo().join("testdata/tiny/bert").to_string_lossy().into_owned()
}

/// The arguments of a small run writing into `out` (the row-index cache stays inside `dir`).
fn train_args(dir: &Path, out: &str, extra: &[&str]) -> Vec<String> {
    let cache = dir.join("cache").to_string_lossy().into_owned();
    let mut args: Vec<String> = [
        "train",
        "--output_dir",
        out,
        "--model_name_or_path",
        &tiny_bert(),
        "--dataset_name",
        "json",
        "--dataset_path",
        &data("tiny.jsonl"),
        "--dataset_cache_dir",
        &cache,
        "--per_device_train_batch_size",
        "4",
        "--train_group_size",
        "3",
        "--query_max_len",
        "16",
        "--passage_max_len",
        "32",
        "--learning_rate",
        "1e-3",
        "--num_train_epochs",
        "2",
        "--logging_steps",
        "2",
        "--save_steps",
        "1",
        "--quiet",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn train(dir: &Path, out: &str, extra: &[&str]) -> std::process::Output {
    let args = train_args(dir, out, extra);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    tevatron(dir, &refs)
}

fn read_json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// The BERT recipe of Tevatron's README (minus the launcher and --deepspeed), on tiny data:
/// checkpoints and the final model in HF layout, log entries with HF's fields, and a model
/// that `tevatron encode` loads.
#[test]
fn readme_recipe_trains_and_writes_hugging_face_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("model").to_string_lossy().into_owned();
    let extra = ["--bf16", "--pooling", "cls", "--overwrite_output_dir", "--save_total_limit", "2"];
    // At info level despite --quiet: the log says how --bf16 computes on this CPU.
    let run = Command::new(env!("CARGO_BIN_EXE_tevatron"))
        .current_dir(dir.path())
        .args(train_args(dir.path(), &out, &extra))
        .env("TEVATRON_LOG", "info")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&run.stderr).into_owned();
    let said = match tevatron_model::backbone::bf16::Bf16Kernels::detect() {
        Some(k) if k.faster_than_f32() => {
            "--bf16 on the CPU: the linear layers' products (forward and both gradients) as bf16"
        }
        Some(_) => "slower than F32 training, kept for autocast's rounding",
        None => "--bf16 on the CPU: candle widens each half-precision product to F32",
    };
    assert!(log.contains(said), "{log}");
    ok(run);
    let out = PathBuf::from(out);
    let files = names(&out);
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "trainer_state.json",
        "training_curves.png",
        "training_curves.svg",
    ] {
        assert!(files.contains(&f.to_string()), "{f} missing from {files:?}");
    }
    // 24 rows / 4 = 6 micro-batches per epoch, 2 epochs: 12 steps; only the last 2 kept.
    assert_eq!(
        files.iter().filter(|f| f.starts_with("checkpoint-")).collect::<Vec<_>>(),
        ["checkpoint-11", "checkpoint-12"]
    );
    // The pooling it was trained with travels with the model (sentence-transformers modules).
    let pooling = read_json(&out.join("1_Pooling/config.json"));
    assert_eq!(pooling["pooling_mode_cls_token"], true);
    assert_eq!(pooling["pooling_mode_mean_tokens"], false);
    assert!(!out.join("2_Normalize").exists());
    let ck = names(&out.join("checkpoint-12"));
    for f in ["model.safetensors", "optimizer.safetensors", "scheduler.json", "rng_state.json"] {
        assert!(ck.contains(&f.to_string()), "{f} missing from {ck:?}");
    }
    let state = read_json(&out.join("trainer_state.json"));
    assert_eq!(state["global_step"], 12);
    let log = state["log_history"].as_array().unwrap();
    assert_eq!(log.len(), 7, "six log entries and the summary");
    for (i, e) in log[..6].iter().enumerate() {
        assert_eq!(e["step"], 2 * (i + 1));
        for k in ["loss", "grad_norm", "learning_rate", "epoch"] {
            assert!(e[k].as_f64().unwrap().is_finite(), "{k} in {e}");
        }
    }
    assert!((log[5]["epoch"].as_f64().unwrap() - 2.0).abs() < 1e-12);
    assert!(log[6]["train_runtime"].as_f64().is_some());
    // Warmup 10% of 12 steps = 2 steps, then linear decay: step 2 logs the peak rate.
    assert!((log[0]["learning_rate"].as_f64().unwrap() - 5e-4).abs() < 1e-12);
    // The trained model encodes.
    let emb = dir.path().join("q.safetensors").to_string_lossy().into_owned();
    let queries = repo().join("testdata/toy/queries.jsonl").to_string_lossy().into_owned();
    ok(tevatron(
        dir.path(),
        &[
            "encode",
            "--model_name_or_path",
            out.to_str().unwrap(),
            "--dataset_path",
            &queries,
            "--encode_is_query",
            "--encode_output_path",
            &emb,
            "--quiet",
        ],
    ));
}

/// Kills a run at a random step with SIGKILL, runs the same command again: it resumes from the
/// latest checkpoint and ends with the weights (and log) of a run that never stopped.
#[test]
fn a_killed_run_resumes_to_bit_identical_weights() {
    let dir = tempfile::tempdir().unwrap();
    let whole = dir.path().join("whole").to_string_lossy().into_owned();
    ok(train(dir.path(), &whole, &[]));
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    let mut killed_at = None;
    let parts = dir.path().join("parts").to_string_lossy().into_owned();
    for attempt in 0..20u64 {
        let _ = std::fs::remove_dir_all(&parts);
        let k = 2 + ((seed.subsec_nanos() as u64 + attempt * 7) % 9) as usize; // 2..=10 of 12
        let mut child = Command::new(env!("CARGO_BIN_EXE_tevatron"))
            .current_dir(dir.path())
            .args(train_args(dir.path(), &parts, &[]))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let marker = Path::new(&parts).join(format!("checkpoint-{k}"));
        let start = Instant::now();
        while !marker.exists() && start.elapsed() < Duration::from_secs(60) {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        child.kill().unwrap_or(());
        let status = child.wait().unwrap();
        if !status.success() && !Path::new(&parts).join("checkpoint-12").exists() {
            killed_at = Some(k);
            break;
        }
    }
    let k = killed_at.expect("the run was killed before its end in one of 20 attempts");
    eprintln!("killed after checkpoint-{k}");
    let out = train(dir.path(), &parts, &["--quiet", "false"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{err}");
    assert!(!err.contains("with settings other than"), "{err}");
    // It resumed (a run started afresh ends on the same weights too): its first save comes
    // after the checkpoint it resumed from.
    assert!(err.contains("resuming from"), "{err}");
    let saved = common::saved_steps(&err);
    assert!(!saved.is_empty() && saved[0] > k, "resumed after checkpoint-{k}, saved {saved:?}");
    let whole = PathBuf::from(whole);
    let parts = PathBuf::from(parts);
    assert_eq!(
        std::fs::read(whole.join("model.safetensors")).unwrap(),
        std::fs::read(parts.join("model.safetensors")).unwrap(),
        "final weights differ after resuming from checkpoint {k}"
    );
    let logs = |p: &Path| {
        let mut log = read_json(&p.join("trainer_state.json"))["log_history"].clone();
        log.as_array_mut().unwrap().pop(); // the summary holds run times
        log
    };
    assert_eq!(logs(&whole), logs(&parts));
}

/// Resuming with a flag that shapes the batches changed is warned about, naming the flag with
/// both values; flags that change only where and how often things are written are not named.
#[test]
fn resuming_with_other_settings_is_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let first = dir.path().join("first").to_string_lossy().into_owned();
    ok(train(dir.path(), &first, &["--max_steps", "1"]));
    let from = Path::new(&first).join("checkpoint-1").to_string_lossy().into_owned();
    let second = dir.path().join("second").to_string_lossy().into_owned();
    let extra = ["--resume_from_checkpoint", &from, "--max_steps", "2"];
    let out =
        train(dir.path(), &second, &[&extra[..], &["--per_device_train_batch_size", "2"]].concat());
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{err}");
    assert!(err.contains("with settings other than the run that wrote it"), "{err}");
    assert!(err.contains("per_device_train_batch_size: 4 -> 2"), "{err}");
    assert!(err.contains("max_steps: 1 -> 2"), "{err}");
    assert!(!err.contains("output_dir:"), "{err}");
}

/// As Tevatron's driver, `--overwrite_output_dir` resumes the latest checkpoint and removes
/// nothing (its recipes pass the flag, so a rerun after a crash goes on); a checkpoint at the
/// run's last step leaves nothing to train, and the log says so.
#[test]
fn overwrite_output_dir_resumes_as_tevatron_does() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out").to_string_lossy().into_owned();
    ok(train(dir.path(), &out, &["--max_steps", "2"]));
    let again = ["--max_steps", "2", "--overwrite_output_dir", "--quiet", "false"];
    let run = train(dir.path(), &out, &again);
    let log = String::from_utf8_lossy(&run.stderr).into_owned();
    ok(run);
    assert!(log.contains("checkpoint-2 (step 2), as Tevatron does"), "{log}");
    assert!(log.contains("nothing is left to train"), "{log}");
    assert!(Path::new(&out).join("checkpoint-1").is_dir(), "nothing is removed");
    let more = ["--max_steps", "3", "--overwrite_output_dir", "--quiet", "false"];
    let run = train(dir.path(), &out, &more);
    let log = String::from_utf8_lossy(&run.stderr).into_owned();
    ok(run);
    assert_eq!(common::saved_steps(&log), [3], "{log}");
}

#[test]
fn bad_training_inputs_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let write = |name: &str, text: &str| {
        let p = d.join(name);
        std::fs::write(&p, text).unwrap();
        p.to_string_lossy().into_owned()
    };
    let good = std::fs::read_to_string(data("tiny.jsonl")).unwrap();
    let first = good.lines().next().unwrap();
    let run = |out: &str, path: &str, extra: &[&str]| {
        let mut args = train_args(d, &d.join(out).to_string_lossy(), extra);
        let i = args.iter().position(|a| a == "--dataset_path").unwrap();
        args[i + 1] = path.to_string();
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        tevatron(d, &refs)
    };
    let nopos =
        write("nopos.jsonl", &format!("{first}\n{{\"query\":\"q\",\"positive_passages\":[]}}\n"));
    fails_with(run("o1", &nopos, &[]), "nopos.jsonl:2");
    let bad = write("bad.jsonl", &format!("{first}\n{{\"query\": \n"));
    fails_with(run("o2", &bad, &[]), "bad.jsonl:2: malformed JSON");
    let noneg =
        write("noneg.jsonl", "{\"query\":\"q\",\"positive_passages\":[{\"text\":\"a\"}]}\n");
    fails_with(
        run("o3", &noneg, &[]),
        &format!("needs hard negatives, and no row of {noneg} has any"),
    );
    let ids = write(
        "ids.jsonl",
        "{\"query_id\":\"1\",\"query_text\":\"q\",\"positive_document_ids\":[\"d1\"],\"negative_document_ids\":[\"zz\"]}\n",
    );
    let corpus = write("corpus.jsonl", "{\"docid\":\"d1\",\"text\":\"a b\"}\n");
    fails_with(
        run("o4", &ids, &["--corpus_path", &corpus]),
        "ids.jsonl:1: document id \"zz\" is not in the corpus",
    );
    // A non-empty output folder without checkpoints is refused, as Hugging Face refuses it.
    std::fs::create_dir_all(d.join("busy")).unwrap();
    std::fs::write(d.join("busy/notes.txt"), "mine").unwrap();
    fails_with(run("busy", &data("tiny.jsonl"), &[]), "--overwrite_output_dir");
    assert!(d.join("busy/notes.txt").exists());
    // A folder holding only a save that was stopped (a run killed while it wrote its first
    // checkpoint): the same command runs again, and the partial folder is gone.
    std::fs::create_dir_all(d.join("stopped/.checkpoint-1.tmp")).unwrap();
    std::fs::write(d.join("stopped/.checkpoint-1.tmp/scheduler.json.tmp.1.0"), "{").unwrap();
    ok(run("stopped", &data("tiny.jsonl"), &["--max_steps", "1"]));
    assert!(!names(&d.join("stopped")).iter().any(|n| n.ends_with(".tmp")));
    assert!(d.join("stopped/model.safetensors").exists());
    // Flags we do not support are refused by name, with what to do instead.
    fails_with(run("o5", &data("tiny.jsonl"), &["--deepspeed", "ds.json"]), "drop --deepspeed");
    fails_with(
        run("o6", &data("tiny.jsonl"), &["--lr_scheduler_type", "polynomial"]),
        "linear, cosine",
    );
    // Optimizer settings PyTorch refuses, and negative numbers read as values (clap took
    // `-1` for a flag, so `--learning_rate -1` never reached its check).
    let tiny = data("tiny.jsonl");
    fails_with(run("o9", &tiny, &["--adam_beta1", "1.5"]), "--adam_beta1 must be in [0, 1)");
    fails_with(run("o9", &tiny, &["--adam_epsilon", "0"]), "--adam_epsilon must be a positive");
    fails_with(
        run("o9", &tiny, &["--weight_decay", "-5"]),
        "--weight_decay must be a non-negative",
    );
    fails_with(
        run("o9", &tiny, &["--learning_rate", "-1"]),
        "--learning_rate must be a non-negative",
    );
    fails_with(
        run("o9", &tiny, &["--lora", "--lora_alpha", "nan"]),
        "--lora_alpha must be a finite",
    );
    // An infinite or huge epoch count made a run of usize::MAX steps (it trained until killed).
    fails_with(
        run("o9", &tiny, &["--num_train_epochs", "inf"]),
        "--num_train_epochs must be a finite number, not inf",
    );
    fails_with(
        run("o9", &tiny, &["--num_train_epochs", "1e300"]),
        "--num_train_epochs 1e300 makes 6e300 optimizer steps",
    );
    assert!(!d.join("o9").exists());
    ok(run("o10", &tiny, &["--max_grad_norm", "-1", "--max_steps", "1"]));
    // A run's training_args.json is an arguments file for the same command (it held the
    // reranker's flags, which train refuses), and gives the same arguments back.
    let mut args = read_json(&d.join("o10/training_args.json"));
    assert!(args.get("rerank_max_len").is_none(), "{args}");
    args["output_dir"] = serde_json::json!(d.join("o11"));
    args["quiet"] = serde_json::json!(false);
    std::fs::write(d.join("again.json"), args.to_string()).unwrap();
    let out = tevatron(d, &["train", "again.json"]);
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    ok(out);
    // Nor does it note its own settings as changing nothing (those of features left off).
    assert!(!log.contains("changes nothing here"), "{log}");
    let mut again = read_json(&d.join("o11/training_args.json"));
    again["output_dir"] = args["output_dir"].clone();
    assert_eq!(again, args);
    // Another model's tokenizer (ids past the tiny BERT's 104 embedding rows).
    let roberta = repo().join("testdata/tiny/roberta").to_string_lossy().into_owned();
    fails_with(
        run("o7", &data("tiny.jsonl"), &["--tokenizer_name", &roberta]),
        "does not belong to this model",
    );
    // A checkpoint whose loop state contradicts itself: refused by name (the loss average
    // of the next log entry underflowed).
    ok(run("o8", &data("tiny.jsonl"), &["--max_steps", "2"]));
    let state_path = d.join("o8/checkpoint-2/trainer_state.json");
    let mut state = read_json(&state_path);
    state["tevatron"]["last_logged_step"] = serde_json::json!(99);
    std::fs::write(&state_path, state.to_string()).unwrap();
    fails_with(
        run("o8", &data("tiny.jsonl"), &["--max_steps", "4"]),
        "trainer_state.json: tevatron.last_logged_step 99 is past global_step 2",
    );
}

/// NaN loss stops the run with a message naming the last good checkpoint, which stays intact.
#[test]
fn a_diverging_run_stops_and_keeps_its_last_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o").to_string_lossy().into_owned();
    ok(train(dir.path(), &out, &["--max_steps", "2"]));
    let ck = Path::new(&out).join("checkpoint-2");
    let before = std::fs::read(ck.join("model.safetensors")).unwrap();
    // Resume with a temperature so small that the scores overflow: the loss is not finite.
    let msg = fails_with(
        train(dir.path(), &out, &["--max_steps", "4", "--temperature", "1e-300"]),
        "the loss is NaN at step 3",
    );
    assert!(msg.contains("checkpoint-2") && msg.contains("intact"), "{msg}");
    assert_eq!(std::fs::read(ck.join("model.safetensors")).unwrap(), before);
    assert!(!Path::new(&out).join("checkpoint-3").exists());
}

/// Saving into a folder where files cannot grow (a file-size limit stands in for a full disk:
/// writes fail with EFBIG) fails cleanly and leaves the previous checkpoint as it was.
#[cfg(target_os = "linux")]
#[test]
fn a_failed_save_leaves_the_previous_checkpoint_intact() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o").to_string_lossy().into_owned();
    ok(train(dir.path(), &out, &["--max_steps", "2"]));
    let ck = Path::new(&out).join("checkpoint-2");
    let before = std::fs::read(ck.join("optimizer.safetensors")).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tevatron"));
    cmd.current_dir(dir.path()).args(train_args(dir.path(), &out, &["--max_steps", "4"]));
    // SAFETY: only async-signal-safe libc calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let lim = libc::rlimit { rlim_cur: 16 * 1024, rlim_max: 16 * 1024 };
            libc::setrlimit(libc::RLIMIT_FSIZE, &lim);
            Ok(())
        });
    }
    let msg = fails_with(cmd.output().unwrap(), "checkpoint-3");
    assert!(msg.contains("File too large") || msg.contains("cannot write"), "{msg}");
    assert_eq!(std::fs::read(ck.join("optimizer.safetensors")).unwrap(), before);
    assert!(!Path::new(&out).join("checkpoint-3").exists());
    assert!(!Path::new(&out).join(".checkpoint-3.tmp").exists(), "no half checkpoint is left");
    // And the run resumes from checkpoint-2 once the disk has room again.
    ok(train(dir.path(), &out, &["--max_steps", "4"]));
    assert!(Path::new(&out).join("checkpoint-4").exists());
}

/// The memory and precision flags together: fp16 autocast with loss scaling, GradCache,
/// gradient checkpointing and tokenization workers; the run trains and logs finite numbers.
#[test]
fn fp16_grad_cache_and_checkpointing_run_together() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o").to_string_lossy().into_owned();
    ok(train(
        dir.path(),
        &out,
        &[
            "--fp16",
            "--grad_cache",
            "--gc_q_chunk_size",
            "2",
            "--gc_p_chunk_size",
            "5",
            "--gradient_checkpointing",
            "--dataloader_num_workers",
            "2",
            "--max_steps",
            "4",
            "--logging_steps",
            "1",
        ],
    ));
    let state = read_json(&Path::new(&out).join("trainer_state.json"));
    assert_eq!(state["tevatron"]["loss_scale"], 65536.0);
    let log = state["log_history"].as_array().unwrap();
    assert_eq!(log.len(), 5);
    for e in &log[..4] {
        assert!(e["loss"].as_f64().unwrap().is_finite() && e["grad_norm"].as_f64().unwrap() > 0.0);
    }
}

/// The same rows as Parquet (nested lists of structs, as `datasets` writes them) train to the
/// same weights, bit for bit, as the JSONL file.
#[test]
fn parquet_training_data_trains_like_jsonl() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a").to_string_lossy().into_owned();
    let b = dir.path().join("b").to_string_lossy().into_owned();
    ok(train(dir.path(), &a, &["--max_steps", "3"]));
    ok(train(dir.path(), &b, &["--max_steps", "3", "--dataset_path", &data("tiny.parquet")]));
    assert_eq!(
        std::fs::read(Path::new(&a).join("model.safetensors")).unwrap(),
        std::fs::read(Path::new(&b).join("model.safetensors")).unwrap()
    );
}

/// The f32 tensors of a safetensors file, by name.
fn tensors(path: &Path) -> std::collections::BTreeMap<String, Vec<f32>> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let values = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (name, values)
        })
        .collect()
}

/// `--nproc_per_node 2` starts two ranks that train as one process with twice the batch
/// (the same logged losses, the same weights within float rounding), and only rank 0 writes.
#[test]
fn two_ranks_train_as_one_process_with_twice_the_batch() {
    let dir = tempfile::tempdir().unwrap();
    let run = |out: &str, batch: &str, extra: &[&str]| {
        let out = dir.path().join(out).to_string_lossy().into_owned();
        let mut args = train_args(dir.path(), &out, &["--disable_dropout", "--save_steps", "3"]);
        let i = args.iter().position(|a| a == "--per_device_train_batch_size").unwrap();
        args[i + 1] = batch.to_string();
        let i = args.iter().position(|a| a == "--save_steps").unwrap();
        args.remove(i);
        args.remove(i);
        args.extend(extra.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        ok(tevatron(dir.path(), &refs));
        PathBuf::from(out)
    };
    let one = run("one", "8", &[]);
    let two = run("two", "4", &["--nproc_per_node", "2"]);
    let (a, b) = (tensors(&one.join("model.safetensors")), tensors(&two.join("model.safetensors")));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (name, x) in &a {
        let d = max_abs_diff_of(x, &b[name]);
        assert!(d <= 1e-5, "{name} differs by {d}");
    }
    let losses = |dir: &Path| -> Vec<f64> {
        let state = read_json(&dir.join("trainer_state.json"));
        state["log_history"].as_array().unwrap().iter().filter_map(|e| e["loss"].as_f64()).collect()
    };
    let (la, lb) = (losses(&one), losses(&two));
    assert_eq!(la.len(), 3, "6 steps logged every 2");
    assert_eq!(lb.len(), la.len(), "{la:?} vs {lb:?}");
    for (x, y) in la.iter().zip(&lb) {
        assert!((x - y).abs() <= 1e-5 * x.abs(), "{la:?} vs {lb:?}");
    }
    assert_eq!(names(&one), names(&two));
    assert!(names(&two).contains(&"checkpoint-6".to_string()));
    // The checkpoint records the ranks that trained it (the launcher takes --nproc_per_node
    // out of its ranks' arguments, so their flags said 1), and a resume on another count is
    // said.
    let state = read_json(&two.join("checkpoint-6/trainer_state.json"));
    assert_eq!(state["tevatron"]["world_size"], 2, "{state}");
    let out = dir.path().join("resumed").to_string_lossy().into_owned();
    let from = two.join("checkpoint-6").to_string_lossy().into_owned();
    let mut args =
        train_args(dir.path(), &out, &["--disable_dropout", "--resume_from_checkpoint", &from]);
    let i = args.iter().position(|a| a == "--per_device_train_batch_size").unwrap();
    args[i + 1] = "4".into();
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let run = tevatron(dir.path(), &refs);
    let log = String::from_utf8_lossy(&run.stderr).into_owned();
    ok(run);
    assert!(log.contains("was trained on 2 rank(s), and this run has 1"), "{log}");
}

/// A rank whose peers never come, or whose variables make no sense, stops with a message.
#[test]
fn bad_rank_settings_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let run = |out: &str, env: &[(&str, String)]| {
        let args = train_args(dir.path(), &dir.path().join(out).to_string_lossy(), &[]);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tevatron"));
        cmd.current_dir(dir.path()).args(&args).args(["--ddp_timeout", "2"]);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };
    let env = |rank: &str, world: &str| {
        vec![
            ("RANK", rank.to_string()),
            ("WORLD_SIZE", world.to_string()),
            ("MASTER_ADDR", "127.0.0.1".to_string()),
            ("MASTER_PORT", port.to_string()),
        ]
    };
    let start = Instant::now();
    fails_with(run("o1", &env("1", "2")), "rank 1: could not reach rank 0 at 127.0.0.1:");
    fails_with(run("o2", &env("0", "2")), "rank(s) 1 did not connect");
    assert!(start.elapsed() < Duration::from_secs(60));
    fails_with(run("o3", &env("2", "2")), "RANK=2 is out of range for WORLD_SIZE=2");
    // Ranks started by hand with another learning rate: the other rank names the flag, and
    // neither trains (they trained apart, their weights drifting, only rank 0's saved).
    let spawn = |rank: &str, extra: &[&str]| {
        let out = dir.path().join("by-hand").to_string_lossy().into_owned();
        let args = train_args(dir.path(), &out, extra);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tevatron"));
        cmd.current_dir(dir.path()).args(&args).args(["--ddp_timeout", "20"]);
        for (k, v) in env(rank, "2") {
            cmd.env(k, v);
        }
        cmd.stderr(std::process::Stdio::piped()).spawn().unwrap()
    };
    let (zero, one) = (spawn("0", &[]), spawn("1", &["--learning_rate", "0.05"]));
    let (zero, one) = (zero.wait_with_output().unwrap(), one.wait_with_output().unwrap());
    assert!(!zero.status.success(), "{}", String::from_utf8_lossy(&zero.stderr));
    fails_with(one, "rank 1: its flags differ from rank 0's (learning_rate:");
    let mut no_port = env("0", "2");
    no_port.pop();
    fails_with(run("o4", &no_port), "needs MASTER_PORT");
    // Port 0 (rank 0 would listen where the system picks; the others waited --ddp_timeout).
    let mut zero = env("1", "2");
    zero[3].1 = "0".into();
    fails_with(run("o4", &zero), "MASTER_PORT=\"0\" is not a port number from 1 to 65535");
    // A backend that does not exist, or NCCL where it cannot work (CPU ranks).
    let train_with = |out: &str, extra: &[&str]| {
        let args = train_args(dir.path(), &dir.path().join(out).to_string_lossy(), extra);
        tevatron(dir.path(), &args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    fails_with(train_with("o5", &["--ddp_backend", "mpi"]), "supported are nccl");
    let out =
        train_with("o6", &["--ddp_backend", "nccl", "--nproc_per_node", "2", "--device", "cpu"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let line = fails_with(out, "(exit status: 2)");
    assert!(
        line.contains("rank 0") && line.ends_with("failed") || line.contains("were stopped"),
        "{line}"
    );
    assert!(err.contains("--ddp_backend nccl: "), "{err}");
}

/// `--attn_implementation` on the CPU: the log says it changes nothing there (attention is
/// always the fused op), and the run trains to the same weights as without it, bit for bit; a
/// value outside transformers' three is refused.
#[test]
fn attn_implementation_changes_nothing_on_the_cpu_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let run = |out: &str, extra: &[&str]| {
        let args = train_args(dir.path(), out, &[extra, &["--max_steps", "2"]].concat());
        let out = Command::new(env!("CARGO_BIN_EXE_tevatron"))
            .current_dir(dir.path())
            .args(args.iter().filter(|a| *a != "--quiet"))
            .env("TEVATRON_LOG", "info")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let (plain, flagged) = (dir.path().join("plain"), dir.path().join("flash"));
    let log = run(&flagged.to_string_lossy(), &["--attn_implementation", "flash_attention_2"]);
    assert!(
        log.contains("--attn_implementation flash_attention_2 changes nothing on the CPU"),
        "{log}"
    );
    let log = run(&plain.to_string_lossy(), &[]);
    assert!(!log.contains("--attn_implementation"), "{log}");
    let weights = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
    assert_eq!(weights(&plain), weights(&flagged));
    let out = dir.path().join("bad").to_string_lossy().into_owned();
    fails_with(
        train(dir.path(), &out, &["--attn_implementation", "flash"]),
        "--attn_implementation \"flash\": expected eager, sdpa or flash_attention_2",
    );
}

/// A sentence-transformers model with Dense modules after pooling (saved by sentence-transformers
/// 6) trains them with the rest, checkpoints them in their folders, resumes from those to the
/// same weights bit for bit, and writes them where `SentenceTransformer` reads them.
#[test]
fn dense_modules_train_checkpoint_and_resume() {
    let dir = tempfile::tempdir().unwrap();
    let st = repo().join("testdata/tiny/bert-st-dense");
    let run = |out: &Path, extra: &[&str]| -> String {
        let out = out.to_string_lossy().into_owned();
        let mut args = train_args(dir.path(), &out, &[extra, &["--quiet", "false"]].concat());
        let model = args.iter().position(|a| *a == tiny_bert()).unwrap();
        args[model] = st.to_string_lossy().into_owned();
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = tevatron(dir.path(), &refs);
        let log = String::from_utf8_lossy(&out.stderr).into_owned();
        ok(out);
        log
    };
    let whole = dir.path().join("whole");
    run(&whole, &[]);
    let files = ["model.safetensors", "2_Dense/model.safetensors", "3_Dense/model.safetensors"];
    for f in &files[1..] {
        assert_ne!(
            std::fs::read(whole.join(f)).unwrap(),
            std::fs::read(st.join(f)).unwrap(),
            "{f} trained"
        );
        assert!(whole.join("checkpoint-6").join(f).is_file(), "{f} checkpointed");
    }
    let modules = std::fs::read_to_string(whole.join("modules.json")).unwrap();
    assert!(modules.contains("3_Dense") && modules.contains("4_Normalize"), "{modules}");
    let resumed = dir.path().join("resumed");
    let from = whole.join("checkpoint-6").to_string_lossy().into_owned();
    let log = run(&resumed, &["--resume_from_checkpoint", &from]);
    let saved = common::saved_steps(&log);
    assert!(!saved.is_empty() && saved[0] > 6, "resumed after checkpoint-6, saved {saved:?}");
    for f in files {
        assert_eq!(
            std::fs::read(whole.join(f)).unwrap(),
            std::fs::read(resumed.join(f)).unwrap(),
            "{f}"
        );
    }
}
