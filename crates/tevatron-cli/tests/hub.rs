//! The Hugging Face hub path with a hub id: `--model_name_or_path acme/tiny-bert` downloaded by
//! the real hub client (`hf-hub`) from a local server that speaks the hub's file protocol
//! (`GET {endpoint}/{repo}/resolve/main/{file}` with `Range`, answered with `ETag`,
//! `X-Repo-Commit` and `Content-Range`), reached through `HF_ENDPOINT` as a mirror would be.
//! The machine running the tests has no route to huggingface.co, so this is how the download,
//! the cache layout and the offline reuse are proven.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{fails_with, ok, repo};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// Serves `root/{org}/{name}/{file}` as the hub serves `{org}/{name}/resolve/{revision}/{file}`, on
/// a free local port, until the test process ends. Returns the endpoint URL.
fn serve(root: PathBuf) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let root = root.clone();
            std::thread::spawn(move || answer(stream, &root));
        }
    });
    endpoint
}

/// Answers the requests of one connection (the client keeps connections alive).
fn answer(stream: TcpStream, root: &Path) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut out = stream;
    loop {
        let mut request = String::new();
        if reader.read_line(&mut request).unwrap_or(0) == 0 {
            return;
        }
        let (mut range, mut authorization) = (None, String::new());
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
                break;
            }
            let (name, value) = line.split_once(':').unwrap_or((&line, ""));
            if name.eq_ignore_ascii_case("range") {
                range = value.trim().strip_prefix("bytes=").map(str::to_string);
            }
            if name.eq_ignore_ascii_case("authorization") {
                authorization = value.trim().to_string();
            }
        }
        let path = request.split_whitespace().nth(1).unwrap_or("/").to_string();
        // Repositories under `gated/` answer only the token `hf_secret`, as a gated model does.
        if path.starts_with("/gated/") && authorization != format!("Bearer {TOKEN}") {
            let _ = out.write_all(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n");
            continue;
        }
        let file = path
            .trim_start_matches('/')
            .split_once("/resolve/")
            // Any revision serves the one snapshot there is (`main` or its commit).
            .and_then(|(repo, rest)| {
                rest.split_once('/').map(|(_, file)| root.join(repo).join(file))
            })
            .filter(|f| f.is_file());
        let Some(file) = file else {
            let _ = out.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
            continue;
        };
        let mut body = Vec::new();
        std::fs::File::open(&file).unwrap().read_to_end(&mut body).unwrap();
        let total = body.len();
        let (start, end) = match range.as_deref().and_then(|r| r.split_once('-')) {
            Some((a, b)) => {
                let a: usize = a.parse().unwrap_or(0);
                let b = b.parse::<usize>().map(|b| b + 1).unwrap_or(total).min(total);
                (a.min(b), b)
            }
            None => (0, total),
        };
        // The blob's name in the cache: any stable content hash will do.
        let etag = body.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        let head = format!(
            "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{}/{total}\r\n\
             ETag: \"{etag:016x}\"\r\nX-Repo-Commit: {COMMIT}\r\n\r\n",
            end - start,
            end.max(1) - 1
        );
        if out.write_all(head.as_bytes()).and_then(|()| out.write_all(&body[start..end])).is_err() {
            return;
        }
    }
}

/// `tevatron encode` of the toy corpus with the given model and environment.
fn encode(dir: &Path, model: &str, out: &str, env: &[(&str, &str)]) -> Output {
    encode_with(dir, model, out, env, &[])
}

/// [`encode`] with more flags.
fn encode_with(dir: &Path, model: &str, out: &str, env: &[(&str, &str)], extra: &[&str]) -> Output {
    let corpus = repo().join("testdata/toy/corpus.jsonl");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tevatron"));
    cmd.current_dir(dir)
        .args(["encode", "--model_name_or_path", model, "--dataset_path"])
        .arg(corpus)
        .args(["--encode_output_path", out, "--passage_max_len", "12", "--pooling", "mean"])
        .args(["--quiet"])
        .args(extra)
        .env_remove("HF_ENDPOINT")
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("HF_HOME")
        .env_remove("HF_TOKEN")
        .env_remove("HF_TOKEN_PATH");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

/// The token gated repositories answer.
const TOKEN: &str = "hf_secret";

/// A hub with `acme/tiny-bert` (the tiny BERT's files), `gated/tiny-bert` (the same, for
/// [`TOKEN`] only) and `acme/no-weights` (its config and tokenizer only).
fn hub(dir: &Path) -> String {
    let bert = repo().join("testdata/tiny/bert");
    let all = &["config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"][..];
    for (org, name, files) in [
        ("acme", "tiny-bert", all),
        ("gated", "tiny-bert", all),
        ("acme", "no-weights", &["config.json", "tokenizer.json"][..]),
        ("acme", "no-tokenizer", &["config.json", "model.safetensors"][..]),
    ] {
        let to = dir.join(org).join(name);
        std::fs::create_dir_all(&to).unwrap();
        for f in files {
            std::fs::copy(bert.join(f), to.join(f)).unwrap();
        }
    }
    // A checkpoint in two shards.
    let sharded = repo().join("testdata/tiny/bert-sharded");
    let to = dir.join("acme/sharded");
    std::fs::create_dir_all(&to).unwrap();
    for f in std::fs::read_dir(&sharded).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, to.join(f.file_name().unwrap())).unwrap();
    }
    // A sentence-transformers model whose Dense modules live in sub-folders.
    let st = repo().join("testdata/tiny/bert-st-dense");
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors",
        "modules.json",
        "1_Pooling/config.json",
        "2_Dense/config.json",
        "2_Dense/model.safetensors",
        "3_Dense/config.json",
        "3_Dense/model.safetensors",
        "4_Normalize/config.json",
    ] {
        let to = dir.join("acme/st-dense").join(f);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(st.join(f), to).unwrap();
    }
    // A sentence-transformers model of the older layout: the Transformer in `0_Transformer/`.
    let to = dir.join("acme/st-subfolder");
    std::fs::create_dir_all(to.join("0_Transformer")).unwrap();
    std::fs::create_dir_all(to.join("1_Pooling")).unwrap();
    for f in all {
        std::fs::copy(bert.join(f), to.join("0_Transformer").join(f)).unwrap();
    }
    std::fs::write(to.join("modules.json"), SUBFOLDER_MODULES).unwrap();
    std::fs::write(to.join("1_Pooling/config.json"), MEAN_POOLING).unwrap();
    serve(dir.to_path_buf())
}

/// `modules.json` of a model whose Transformer lives in `0_Transformer/`.
const SUBFOLDER_MODULES: &str = r#"[
  {"idx": 0, "name": "0", "path": "0_Transformer", "type": "sentence_transformers.models.Transformer"},
  {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}
]"#;

/// A Pooling module's config for the tiny BERT (width 32), mean pooling.
const MEAN_POOLING: &str = r#"{"word_embedding_dimension": 32, "pooling_mode_cls_token": false,
  "pooling_mode_mean_tokens": true, "pooling_mode_max_tokens": false}"#;

#[test]
fn a_hub_id_downloads_into_the_cache_then_loads_offline() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let endpoint = hub(&d.join("hub"));
    let cache = d.join("cache");
    let cache_s = cache.to_string_lossy().into_owned();
    let env = [("HF_ENDPOINT", endpoint.as_str()), ("HF_HUB_CACHE", cache_s.as_str())];
    ok(encode(d, "acme/tiny-bert", "hub.safetensors", &env));
    // The hub's cache layout, as huggingface_hub and transformers read it.
    let snapshot = cache.join("models--acme--tiny-bert/snapshots").join(COMMIT);
    for f in ["config.json", "tokenizer.json", "model.safetensors"] {
        let got = std::fs::read(snapshot.join(f)).unwrap();
        assert_eq!(got, std::fs::read(repo().join("testdata/tiny/bert").join(f)).unwrap(), "{f}");
    }
    assert_eq!(
        std::fs::read_to_string(cache.join("models--acme--tiny-bert/refs/main")).unwrap(),
        COMMIT
    );
    // The same embeddings as the local folder gives.
    let local = repo().join("testdata/tiny/bert").to_string_lossy().into_owned();
    ok(encode(d, &local, "local.safetensors", &[]));
    let read = |f: &str| safetensors_embeddings(&d.join(f));
    assert_eq!(read("hub.safetensors"), read("local.safetensors"));
    // Offline, with no server named, the cache alone serves the same id.
    let offline = [("HF_HUB_OFFLINE", "1"), ("HF_HUB_CACHE", cache_s.as_str())];
    ok(encode(d, "acme/tiny-bert", "offline.safetensors", &offline));
    assert_eq!(read("offline.safetensors"), read("local.safetensors"));
}

#[test]
fn a_hub_id_brings_its_sentence_transformers_modules() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let endpoint = hub(&d.join("hub"));
    let cache = d.join("cache").to_string_lossy().into_owned();
    let env = [("HF_ENDPOINT", endpoint.as_str()), ("HF_HUB_CACHE", cache.as_str())];
    ok(encode(d, "acme/st-dense", "hub.safetensors", &env));
    let local = repo().join("testdata/tiny/bert-st-dense").to_string_lossy().into_owned();
    ok(encode(d, &local, "local.safetensors", &[]));
    let hub = safetensors_embeddings(&d.join("hub.safetensors"));
    assert_eq!(hub, safetensors_embeddings(&d.join("local.safetensors")));
    let rows = std::fs::read_to_string(repo().join("testdata/toy/corpus.jsonl")).unwrap();
    assert_eq!(hub.len(), rows.lines().count() * 12 * 4, "the last Dense module's 12 dimensions");
    // A cache filled without the module folders (by an earlier build) is completed online, and
    // offline the missing file is named.
    let snapshot = d.join("cache/models--acme--st-dense/snapshots").join(COMMIT);
    std::fs::remove_dir_all(snapshot.join("3_Dense")).unwrap();
    let offline = [("HF_HUB_OFFLINE", "1"), ("HF_HUB_CACHE", cache.as_str())];
    fails_with(encode(d, "acme/st-dense", "x.safetensors", &offline), "3_Dense");
    ok(encode(d, "acme/st-dense", "again.safetensors", &env));
    assert_eq!(safetensors_embeddings(&d.join("again.safetensors")), hub);
}

/// A repository with the Transformer in `0_Transformer/` (sentence-transformers before 2)
/// loads from the hub as its local folder does, and again offline from the cache.
#[test]
fn a_hub_id_with_the_transformer_in_a_sub_folder_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let endpoint = hub(&d.join("hub"));
    let cache = d.join("cache").to_string_lossy().into_owned();
    let env = [("HF_ENDPOINT", endpoint.as_str()), ("HF_HUB_CACHE", cache.as_str())];
    ok(encode(d, "acme/st-subfolder", "hub.safetensors", &env));
    let local = d.join("hub/acme/st-subfolder").to_string_lossy().into_owned();
    ok(encode(d, &local, "local.safetensors", &[]));
    let plain = repo().join("testdata/tiny/bert").to_string_lossy().into_owned();
    ok(encode(d, &plain, "plain.safetensors", &[]));
    let read = |f: &str| safetensors_embeddings(&d.join(f));
    assert_eq!(read("hub.safetensors"), read("local.safetensors"));
    assert_eq!(read("hub.safetensors"), read("plain.safetensors"));
    let offline = [("HF_HUB_OFFLINE", "1"), ("HF_HUB_CACHE", cache.as_str())];
    ok(encode(d, "acme/st-subfolder", "offline.safetensors", &offline));
    assert_eq!(read("offline.safetensors"), read("local.safetensors"));
}

/// A repository without a tokenizer loads with `--tokenizer_name`, and without it the error
/// says to give one.
#[test]
fn a_hub_id_without_a_tokenizer_takes_tokenizer_name() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let endpoint = hub(&d.join("hub"));
    let cache = d.join("cache").to_string_lossy().into_owned();
    let env = [("HF_ENDPOINT", endpoint.as_str()), ("HF_HUB_CACHE", cache.as_str())];
    fails_with(encode(d, "acme/no-tokenizer", "x.safetensors", &env), "--tokenizer_name");
    let tok = ["--tokenizer_name", "acme/tiny-bert"];
    ok(encode_with(d, "acme/no-tokenizer", "hub.safetensors", &env, &tok));
    ok(encode(d, "acme/tiny-bert", "whole.safetensors", &env));
    let read = |f: &str| safetensors_embeddings(&d.join(f));
    assert_eq!(read("hub.safetensors"), read("whole.safetensors"));
    let offline = [("HF_HUB_OFFLINE", "1"), ("HF_HUB_CACHE", cache.as_str())];
    ok(encode_with(d, "acme/no-tokenizer", "offline.safetensors", &offline, &tok));
    assert_eq!(read("offline.safetensors"), read("whole.safetensors"));
}

#[test]
fn hub_failures_say_what_was_missing_and_where_the_cache_is() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let endpoint = hub(&d.join("hub"));
    let cache = d.join("cache").to_string_lossy().into_owned();
    let env = [("HF_ENDPOINT", endpoint.as_str()), ("HF_HUB_CACHE", cache.as_str())];
    let line = fails_with(encode(d, "acme/no-weights", "x.safetensors", &env), "has none of");
    assert!(line.contains(&cache), "{line}");
    fails_with(encode(d, "acme/absent", "x.safetensors", &env), "downloading it failed");
    // A server that is not there: a clear error, not a hang.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let gone = format!("http://{closed}");
    let env = [("HF_ENDPOINT", gone.as_str()), ("HF_HUB_CACHE", cache.as_str())];
    fails_with(encode(d, "acme/tiny-bert", "x.safetensors", &env), "downloading it failed");
    let offline = [("HF_HUB_OFFLINE", "1"), ("HF_HUB_CACHE", cache.as_str())];
    fails_with(encode(d, "acme/tiny-bert", "x.safetensors", &offline), "HF_HUB_OFFLINE is set");
    assert!(!d.join("x.safetensors").exists());
}

/// A sharded checkpoint whose download stopped between shards is completed by the next run
/// online (every later run failed on the missing shard), and named offline.
#[test]
fn a_sharded_download_cut_short_is_completed() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let endpoint = hub(&d.join("hub"));
    let cache = d.join("cache").to_string_lossy().into_owned();
    let env = [("HF_ENDPOINT", endpoint.as_str()), ("HF_HUB_CACHE", cache.as_str())];
    ok(encode(d, "acme/sharded", "whole.safetensors", &env));
    let snapshot = d.join("cache/models--acme--sharded/snapshots").join(COMMIT);
    let shard = std::fs::read_dir(&snapshot)
        .unwrap()
        .map(|f| f.unwrap().path())
        .find(|p| p.to_string_lossy().contains("-of-"))
        .unwrap();
    std::fs::remove_file(&shard).unwrap();
    let name = shard.file_name().unwrap().to_string_lossy().into_owned();
    let offline = [("HF_HUB_OFFLINE", "1"), ("HF_HUB_CACHE", cache.as_str())];
    fails_with(encode(d, "acme/sharded", "x.safetensors", &offline), &name);
    ok(encode(d, "acme/sharded", "again.safetensors", &env));
    let read = |f: &str| safetensors_embeddings(&d.join(f));
    assert_eq!(read("again.safetensors"), read("whole.safetensors"));
}

/// A gated repository is fetched with the token of `HF_TOKEN`, or of `$HF_HOME/token` with the
/// cache elsewhere (hf-hub alone read neither: only a token beside its cache folder), and
/// without one the download fails with the reason.
#[test]
fn gated_repositories_take_the_token_from_hf_token_or_hf_home() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let endpoint = hub(&d.join("hub"));
    let (cache, home) = (d.join("cache"), d.to_string_lossy().into_owned());
    let cache_s = cache.to_string_lossy().into_owned();
    let env = [("HF_ENDPOINT", endpoint.as_str()), ("HF_HUB_CACHE", &cache_s), ("HOME", &home)];
    fails_with(encode(d, "gated/tiny-bert", "x.safetensors", &env), "downloading it failed");
    let with_token = [&env[..], &[("HF_TOKEN", TOKEN)]].concat();
    ok(encode(d, "gated/tiny-bert", "token.safetensors", &with_token));
    std::fs::create_dir_all(d.join("hf")).unwrap();
    std::fs::write(d.join("hf/token"), format!("{TOKEN}\n")).unwrap();
    let other_cache = d.join("cache2").to_string_lossy().into_owned();
    let hf_home = d.join("hf").to_string_lossy().into_owned();
    let logged_in = [
        ("HF_ENDPOINT", endpoint.as_str()),
        ("HF_HUB_CACHE", &other_cache),
        ("HOME", &home),
        ("HF_HOME", &hf_home),
    ];
    ok(encode(d, "gated/tiny-bert", "home.safetensors", &logged_in));
    let read = |f: &str| safetensors_embeddings(&d.join(f));
    assert_eq!(read("token.safetensors"), read("home.safetensors"));
}

/// The `embeddings` tensor's bytes of an encode output.
fn safetensors_embeddings(path: &Path) -> Vec<u8> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let offsets = &header["embeddings"]["data_offsets"];
    let (a, b) = (offsets[0].as_u64().unwrap() as usize, offsets[1].as_u64().unwrap() as usize);
    bytes[8 + n + a..8 + n + b].to_vec()
}
