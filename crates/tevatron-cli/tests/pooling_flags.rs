//! The pooling rule for every command that loads an encoder: a sentence-transformers folder's
//! own pooling and normalisation apply only when neither `--pooling` nor `--normalize` is given;
//! once either is given, Tevatron's defaults (cls, no normalisation) hold for the other, and the
//! log says which settings are in force. Checked on `train` here (on a tiny BERT made into a
//! sentence-transformers folder with mean pooling and a Normalize module); `encode` is checked
//! against transformers' vectors in `encode_reference.rs`.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use std::path::{Path, PathBuf};

use common::{repo, tevatron};

/// The tiny BERT copied into `dir` with sentence-transformers modules: mean pooling, Normalize.
fn tiny_st_folder(dir: &Path) -> PathBuf {
    let st = dir.join("st-model");
    std::fs::create_dir_all(st.join("1_Pooling")).unwrap();
    std::fs::create_dir_all(st.join("2_Normalize")).unwrap();
    for e in std::fs::read_dir(repo().join("testdata/tiny/bert")).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), st.join(e.file_name())).unwrap();
        }
    }
    let modules = serde_json::json!([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
    ]);
    std::fs::write(st.join("modules.json"), modules.to_string()).unwrap();
    let pooling = serde_json::json!({"word_embedding_dimension": 32, "pooling_mode_cls_token": false,
        "pooling_mode_mean_tokens": true, "pooling_mode_lasttoken": false});
    std::fs::write(st.join("1_Pooling/config.json"), pooling.to_string()).unwrap();
    st
}

/// Trains one step on the tiny data with `flags`; returns the log (stderr) and the output dir.
fn train_one_step(dir: &Path, model: &Path, name: &str, flags: &[&str]) -> (String, PathBuf) {
    let out = dir.join(name);
    let data = repo().join("testdata/train/tiny.jsonl");
    let (model, out_s, data) =
        (model.to_string_lossy(), out.to_string_lossy(), data.to_string_lossy());
    let cache = dir.join("cache");
    let cache = cache.to_string_lossy();
    let mut args = vec![
        "train",
        "--output_dir",
        &out_s,
        "--model_name_or_path",
        &model,
        "--dataset_path",
        &data,
        "--dataset_cache_dir",
        &cache,
        "--per_device_train_batch_size",
        "2",
        "--train_group_size",
        "2",
        "--query_max_len",
        "8",
        "--passage_max_len",
        "16",
        "--max_steps",
        "1",
        "--save_strategy",
        "no",
    ];
    args.extend_from_slice(flags);
    let output = tevatron(dir, &args);
    let log = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "train failed: {log}");
    (log, out)
}

/// The saved model's sentence-transformers modules: (pooling config, has Normalize).
fn saved_settings(out: &Path) -> (serde_json::Value, bool) {
    let read = |p: PathBuf| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    let modules = read(out.join("modules.json"));
    let normalize = modules
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["type"].as_str().unwrap().ends_with("Normalize"));
    (read(out.join("1_Pooling/config.json")), normalize)
}

#[test]
fn train_uses_the_folders_settings_only_when_no_pooling_flag_is_given() {
    let tmp = tempfile::tempdir().unwrap();
    let st = tiny_st_folder(tmp.path());

    // No flag: the folder's mean pooling and Normalize, said in the log and kept in the output.
    let (log, out) = train_one_step(tmp.path(), &st, "none", &[]);
    assert!(
        log.contains("pooling mean and normalize true from the sentence-transformers"),
        "{log}"
    );
    let (pool, normalize) = saved_settings(&out);
    assert_eq!((pool["pooling_mode_mean_tokens"].as_bool(), normalize), (Some(true), true));

    // --pooling cls alone: normalize is Tevatron's default (off), not the folder's.
    let (log, out) = train_one_step(tmp.path(), &st, "cls", &["--pooling", "cls"]);
    assert!(log.contains("using pooling cls and normalize false"), "{log}");
    assert!(
        log.contains("mean pooling, normalize true"),
        "the log names the folder's settings: {log}"
    );
    let (pool, normalize) = saved_settings(&out);
    assert_eq!((pool["pooling_mode_cls_token"].as_bool(), normalize), (Some(true), false));

    // --normalize false alone (argparse's bool form): pooling is Tevatron's default, cls.
    let (log, out) = train_one_step(tmp.path(), &st, "nonorm", &["--normalize", "false"]);
    assert!(log.contains("using pooling cls and normalize false"), "{log}");
    let (pool, normalize) = saved_settings(&out);
    assert_eq!((pool["pooling_mode_cls_token"].as_bool(), normalize), (Some(true), false));

    // Both given: as given.
    let (log, _) = train_one_step(tmp.path(), &st, "both", &["--pooling", "mean", "--normalize"]);
    assert!(log.contains("using pooling mean and normalize true, as given"), "{log}");
}

/// A folder's sentence-transformers prompts are named in the log as not prepended (Tevatron
/// prepends only its prefix flags), so a user of a model that expects "query: " learns to pass
/// --query_prefix.
#[test]
fn the_folders_prompts_are_named_as_not_prepended() {
    let tmp = tempfile::tempdir().unwrap();
    let st = tiny_st_folder(tmp.path());
    let (log, _) = train_one_step(tmp.path(), &st, "plain", &[]);
    assert!(!log.contains("prompts"), "{log}");
    let config = serde_json::json!({"prompts": {"query": "query: ", "document": ""}});
    std::fs::write(st.join("config_sentence_transformers.json"), config.to_string()).unwrap();
    let (log, _) = train_one_step(tmp.path(), &st, "prompted", &[]);
    assert!(
        log.contains(r#"prompts (query: "query: "), which are not prepended here"#)
            && log.contains("--query_prefix"),
        "{log}"
    );
}
