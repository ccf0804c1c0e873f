//! Tevatron's own commands run here as written: every retriever `train`, `encode` and `search`
//! command of Tevatron's README and examples (`testdata/recipes/tevatron-commands.md`, copied
//! verbatim) runs under bash, each source file's commands in order in one folder and one shell,
//! so a train's output feeds the encodes and their embeddings the search. What is replaced:
//!
//! - the launcher: `python -m`, `python -m torch.distributed.launch ... -m`, `deepspeed ...
//!   --module` and `torchrun ... -m` become shell functions that run `tevatron <command>` with the
//!   arguments as bash passed them, `--deepspeed FILE` the only flag removed;
//! - the hub: models (`bert-base-uncased`, `mistralai/Mistral-7B-v0.1`, ...) and datasets
//!   (`Tevatron/msmarco-passage-aug`, `Tevatron/beir` with its `scifact` configuration, ...) are
//!   tiny local stand-ins placed under their ids in a Hugging Face cache (`HF_HUB_CACHE`, with
//!   `HF_HUB_OFFLINE=1`), so the commands name them exactly as written;
//! - inputs a command reads that come from elsewhere (a local data file, embeddings written by a
//!   driver other than the retriever's: `encode_mm`, `vllm_encode`, an example's own
//!   `encode.py`) are made first by the `PRELUDES` below;
//! - the few textual changes in `EDITS`, each needed for the block to be valid shell or to keep
//!   it inside the test folder; blocks in `SKIPPED` are not retriever commands or cannot run in
//!   Python either, with the reason.
//!
//! Every invocation's exit code is logged; the test fails on any non-zero one and on any block
//! that ran no command, printing the tool's stderr.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::repo;

/// Blocks not run, with why.
const SKIPPED: &[(&str, &str)] = &[
    (
        "README-5",
        "the JAX section's search: its --query_reps is a glob, which Tevatron's search does not \
         expand either (it opens one file), and its inputs come from the JAX encoder",
    ),
    ("MSMARCO-3", "Tevatron v1's module tevatron.driver.encode, not the retriever driver"),
    ("MSMARCO-4", "Tevatron v1's module tevatron.faiss_retriever, not the retriever driver"),
];

/// Textual changes: (block, from, to), each with its reason in a comment.
const EDITS: &[(&str, &str, &str)] = &[
    // A placeholder, not shell: `VAR=<folder ...>` reads a file named `folder`.
    ("README-2", "<folder to save query embedding>", "embeddings"),
    ("README-3", "<folder to save query embedding>", "embeddings"),
    // A comment after a line continuation ends the command in bash (for Python too).
    ("QWEN3-4", " \\ # replace by 0.6B/4B/8B", " \\"),
    ("QWEN3-5", " \\ # replace by 0.6B/4B/8B", " \\"),
    // Absolute paths of the author's machines, kept inside the test folder.
    (
        "REPLLAMA-4",
        "/store2/scratch/x93ma/main-tevatron/tevatron/experiments/tevatron-train-repllama.jsonl",
        "tevatron-train-repllama.jsonl",
    ),
    ("REPLLAMA-5", "/mnt/users/x93ma/", "mnt-users-x93ma/"),
];

/// Bash run before a block: the inputs that come from outside the retriever drivers.
/// `standin_embeddings Q P` writes query and passage embeddings (of the tiny BERT) to Q and P.
const PRELUDES: &[(&str, &str)] = &[
    ("REPLLAMA-4", "cp \"$STANDIN/train.jsonl\" tevatron-train-repllama.jsonl"),
    (
        "VLLM-SEARCH-1",
        "standin_embeddings beir_embedding_scifact/queries_scifact.pkl \
         beir_embedding_scifact/corpus_scifact.0.pkl",
    ),
    ("BCP-README-1", "mkdir -p data && cp \"$STANDIN/queries.jsonl\" data/browsecomp_plus_decrypted.jsonl"),
    ("BCP-EX-1", "mkdir -p data && cp \"$STANDIN/queries.jsonl\" data/browsecomp_plus_decrypted.jsonl"),
    (
        "REASONIR-1",
        "dataset=biology; embedding_path=bright_embeddings/${dataset}/reasonir; \
         standin_embeddings $embedding_path/queries.pkl $embedding_path/corpus.pkl",
    ),
    (
        "COCOND-1",
        "mkdir -p marco/bert/corpus marco/bert/query marco/bert/train marco/bert/train-hn && \
         cp \"$STANDIN\"/corpus-split/*.json marco/bert/corpus/ && \
         cp \"$STANDIN/queries.jsonl\" marco/bert/query/dev.query.json && \
         cp \"$STANDIN/queries.jsonl\" marco/bert/query/train.query.json && \
         cp \"$STANDIN/train.jsonl\" marco/bert/train/train.json && \
         cp \"$STANDIN/train.jsonl\" marco/bert/train-hn/train.json",
    ),
    (
        "MM-1",
        "CKPT=ckpt; DATASET=scifact; \
         standin_embeddings beir_embedding/$CKPT/$DATASET/queries.pkl beir_embedding/$CKPT/$DATASET/corpus.0.pkl && \
         standin_embeddings miracl_embedding/$CKPT/$DATASET/queries.pkl miracl_embedding/$CKPT/$DATASET/corpus.0.pkl && \
         standin_embeddings wiki-ss-embedding/$CKPT/query.wiki-ss.pkl wiki-ss-embedding/$CKPT/corpus.0.pkl && \
         standin_embeddings multivent-embedding/$CKPT/query-test.pkl multivent-embedding/$CKPT/corpus.0.pkl",
    ),
    ("DSE-1", "standin_embeddings query.nq.pkl corpus.0.pkl"),
    ("DSEQ-1", "cp -r \"$TINY/qwen2\" dse-qwen-ft"),
];

/// Hub models and the tiny model standing in for each.
const MODELS: &[(&str, &str)] = &[
    ("bert-base-uncased", "bert"),
    ("Luyu/co-condenser-marco-retriever", "bert"),
    ("CONDENSER_MODEL_NAME", "bert"),
    ("mistralai/Mistral-7B-v0.1", "mistral"),
    ("meta-llama/Llama-2-7b-hf", "llama"),
    ("castorini/repllama-v1-7b-lora-passage", "llama-lora"),
    ("Qwen/Qwen3-Embedding-4B", "qwen3"),
    ("Qwen/Qwen3-Embedding-0.6B", "qwen3"),
];

/// Hub datasets: (id, [(file in the snapshot, stand-in)]), with the stand-ins `train` (training
/// rows with negatives), `train8` (its first 8 rows), `queries` and `corpus`.
const DATASETS: &[(&str, &[(&str, &str)])] = &[
    ("Tevatron/msmarco-passage-aug", &[("train.jsonl", "train")]),
    ("Tevatron/msmarco-passage", &[("train.jsonl", "train"), ("dev.jsonl", "queries")]),
    ("Tevatron/msmarco-passage-corpus", &[("corpus.jsonl", "corpus")]),
    ("Tevatron/wikipedia-nq", &[("train.jsonl", "train"), ("test.jsonl", "queries")]),
    ("Tevatron/wikipedia-nq-corpus", &[("corpus.jsonl", "corpus")]),
    ("Tevatron/beir", &[("scifact/test.jsonl", "queries")]),
    ("Tevatron/beir-corpus", &[("scifact/train.jsonl", "corpus")]),
    // One batch of 8 (the recipe's batch size): the Qwen3 recipes run 10 epochs of group 16.
    ("Tevatron/scifact", &[("train.jsonl", "train8")]),
    ("Tevatron/browsecomp-plus-corpus", &[("corpus.jsonl", "corpus")]),
    ("Tevatron/wiki-ss-corpus", &[("corpus.jsonl", "corpus")]),
    ("Tevatron/wiki-ss-nq", &[("test.jsonl", "queries")]),
];

/// The launcher stand-ins and helpers every section's shell starts with.
const HARNESS: &str = r#"
tev_run() {
  local module=$1; shift
  local cmd
  case "$module" in
    tevatron.retriever.driver.train) cmd=train ;;
    tevatron.retriever.driver.encode) cmd=encode ;;
    tevatron.retriever.driver.search) cmd=search ;;
    *) echo "$TEV_BLOCK 97 unknown driver $module" >> "$TEV_LOG"; return 97 ;;
  esac
  local args=()
  while [ $# -gt 0 ]; do
    case "$1" in
      --deepspeed) shift 2; continue ;;
      --deepspeed=*) shift; continue ;;
    esac
    args+=("$1"); shift
  done
  echo "== $TEV_BLOCK: tevatron $cmd ${args[*]}" >> "$TEV_ERR"
  local start=$SECONDS
  "$TEVATRON" "$cmd" "${args[@]}" 2>> "$TEV_ERR"
  local rc=$?
  echo "$TEV_BLOCK $rc $cmd $((SECONDS - start))s" >> "$TEV_LOG"
  return $rc
}
python() {
  if [ "$1" = -m ] && [ "$2" = torch.distributed.launch ]; then
    shift 2
    while [ $# -gt 0 ] && [ "$1" != -m ]; do shift; done
  fi
  if [ "$1" != -m ]; then echo "$TEV_BLOCK 96 python without -m" >> "$TEV_LOG"; return 96; fi
  shift
  local module=$1; shift
  tev_run "$module" "$@"
}
deepspeed() {
  while [ $# -gt 0 ] && [ "$1" != --module ]; do shift; done
  shift
  local module=$1; shift
  tev_run "$module" "$@"
}
torchrun() {
  while [ $# -gt 0 ] && [ "$1" != -m ]; do shift; done
  shift
  local module=$1; shift
  tev_run "$module" "$@"
}
standin_embeddings() {
  "$TEVATRON" encode --model_name_or_path bert-base-uncased --dataset_name json \
    --dataset_path "$STANDIN/queries.jsonl" --encode_is_query --encode_output_path "$1" --quiet &&
  "$TEVATRON" encode --model_name_or_path bert-base-uncased --dataset_name json \
    --dataset_path "$STANDIN/corpus.jsonl" --encode_output_path "$2" --quiet ||
  echo "$TEV_BLOCK 95 stand-in embeddings" >> "$TEV_LOG"
}
"#;

/// One command block of the recipes file.
struct Block {
    id: String,
    section: String,
    body: String,
}

fn blocks() -> Vec<Block> {
    let text =
        std::fs::read_to_string(repo().join("testdata/recipes/tevatron-commands.md")).unwrap();
    let mut out = Vec::new();
    let mut section = String::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if let Some(s) = line.strip_prefix("## ") {
            section = s.to_string();
        } else if let Some(rest) = line.strip_prefix("<!-- id=") {
            let id = rest.split_whitespace().next().unwrap().to_string();
            assert_eq!(lines.next(), Some("```bash"), "block {id}");
            let body: Vec<&str> = lines.by_ref().take_while(|l| *l != "```").collect();
            out.push(Block { id, section: section.clone(), body: body.join("\n") });
        }
    }
    out
}

/// Training rows, queries and a corpus from the tiny training data, and the corpus cut in ten.
fn write_standins(dir: &Path) {
    std::fs::create_dir_all(dir.join("corpus-split")).unwrap();
    let train = std::fs::read_to_string(repo().join("testdata/train/tiny.jsonl")).unwrap();
    std::fs::write(dir.join("train.jsonl"), &train).unwrap();
    let first8: Vec<&str> = train.lines().take(8).collect();
    std::fs::write(dir.join("train8.jsonl"), first8.join("\n") + "\n").unwrap();
    let (mut queries, mut corpus) = (String::new(), Vec::new());
    for line in train.lines() {
        let row: serde_json::Value = serde_json::from_str(line).unwrap();
        let q = serde_json::json!({"query_id": row["query_id"], "query": row["query"]});
        writeln!(queries, "{q}").unwrap();
        for p in ["positive_passages", "negative_passages"] {
            for passage in row[p].as_array().unwrap() {
                corpus.push(
                    serde_json::json!({"docid": passage["docid"], "title": passage["title"],
                                               "text": passage["text"]})
                    .to_string(),
                );
            }
        }
    }
    std::fs::write(dir.join("queries.jsonl"), queries).unwrap();
    std::fs::write(dir.join("corpus.jsonl"), corpus.join("\n") + "\n").unwrap();
    for (i, part) in corpus.chunks(corpus.len().div_ceil(10)).enumerate() {
        std::fs::write(dir.join(format!("corpus-split/split{i:02}.json")), part.join("\n") + "\n")
            .unwrap();
    }
}

/// A Hugging Face cache holding the stand-in models and datasets under their hub ids.
fn write_hub_cache(cache: &Path, standin: &Path) {
    let snapshot = |kind: &str, id: &str| {
        let repo_dir = cache.join(format!("{kind}--{}", id.replace('/', "--")));
        std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
        std::fs::write(repo_dir.join("refs/main"), "standin").unwrap();
        repo_dir.join("snapshots/standin")
    };
    for (id, tiny) in MODELS {
        let dir = snapshot("models", id);
        std::fs::create_dir_all(&dir).unwrap();
        for e in std::fs::read_dir(repo().join("testdata/tiny").join(tiny)).unwrap() {
            let e = e.unwrap();
            if !e.file_name().to_string_lossy().starts_with("expected") {
                std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
            }
        }
    }
    for (id, files) in DATASETS {
        let dir = snapshot("datasets", id);
        for (file, which) in *files {
            let dest = dir.join(file);
            std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
            std::fs::copy(standin.join(format!("{which}.jsonl")), dest).unwrap();
        }
    }
}

/// The script of one section: the harness, then each block (edited, after its prelude) and a
/// `wait`, so that backgrounded commands end before the next block reads their output.
fn section_script(blocks: &[&Block]) -> String {
    let mut script = HARNESS.to_string();
    for b in blocks {
        let mut body = b.body.clone();
        for (id, from, to) in EDITS {
            if *id == b.id {
                assert!(body.contains(from), "{id}: the edit's text {from:?} is not in the block");
                body = body.replace(from, to);
            }
        }
        writeln!(script, "export TEV_BLOCK={}", b.id).unwrap();
        for (id, prelude) in PRELUDES {
            if *id == b.id {
                writeln!(script, "{prelude}").unwrap();
            }
        }
        // The empty line ends a command whose last line continues (example_dpr.md's does).
        writeln!(script, "{body}\n\nwait").unwrap();
    }
    script
}

#[test]
fn tevatrons_readme_and_example_commands_run_as_written() {
    let tmp = tempfile::tempdir().unwrap();
    let standin = tmp.path().join("standin");
    let cache = tmp.path().join("hub");
    write_standins(&standin);
    write_hub_cache(&cache, &standin);
    let all = blocks();
    let named = SKIPPED
        .iter()
        .map(|s| s.0)
        .chain(EDITS.iter().map(|e| e.0))
        .chain(PRELUDES.iter().map(|p| p.0));
    for id in named {
        assert!(all.iter().any(|b| b.id == id), "{id} names no block");
    }
    let run: Vec<&Block> =
        all.iter().filter(|b| !SKIPPED.iter().any(|(id, _)| *id == b.id)).collect();
    assert!(run.len() >= 50, "only {} blocks", run.len());
    let mut sections: Vec<(String, Vec<&Block>)> = Vec::new();
    for b in run {
        match sections.last_mut() {
            Some((s, v)) if *s == b.section => v.push(b),
            _ => sections.push((b.section.clone(), vec![b])),
        }
    }
    let log = tmp.path().join("invocations.log");
    let err = tmp.path().join("stderr.log");
    for (i, (section, blocks)) in sections.iter().enumerate() {
        let dir = tmp.path().join(format!("section{i:02}"));
        std::fs::create_dir_all(&dir).unwrap();
        let script = dir.join("recipe.sh");
        std::fs::write(&script, section_script(blocks)).unwrap();
        let status = Command::new("bash")
            .arg(&script)
            .current_dir(&dir)
            .env("TEVATRON", env!("CARGO_BIN_EXE_tevatron"))
            .env("TEV_LOG", &log)
            .env("TEV_ERR", &err)
            .env("STANDIN", &standin)
            .env("TINY", repo().join("testdata/tiny"))
            .env("HF_HUB_CACHE", &cache)
            .env("HF_HUB_OFFLINE", "1")
            .env_remove("HF_HOME")
            .env_remove("RANK")
            .env_remove("WORLD_SIZE")
            .status()
            .unwrap();
        assert!(status.code().is_some(), "{section}: bash was killed");
    }
    let invocations = std::fs::read_to_string(&log).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err).unwrap_or_default();
    let failed: Vec<&str> =
        invocations.lines().filter(|l| l.split_whitespace().nth(1) != Some("0")).collect();
    assert!(failed.is_empty(), "failed: {failed:?}\n{stderr}");
    for (_, blocks) in &sections {
        for b in blocks {
            let ran =
                invocations.lines().any(|l| l.split_whitespace().next() == Some(b.id.as_str()));
            assert!(ran, "{} ran no tevatron command\n{stderr}", b.id);
        }
    }
    // Each search wrote a ranking: spot-check the README's, which reads the README's encodes.
    let run_file: PathBuf = tmp.path().join("section00/embeddings/run.dev.txt");
    let ranking = std::fs::read_to_string(&run_file).unwrap();
    let count = |f: &str| std::fs::read_to_string(standin.join(f)).unwrap().lines().count();
    let (queries, passages) = (count("queries.jsonl"), count("corpus.jsonl"));
    assert_eq!(ranking.lines().count(), queries * passages, "every query ranks every passage");
}
