//! Tevatron's reranker data, as `tevatron.reranker` reads and writes it: rerank input rows
//! (`{query_id, query, docid, title, text}`), the one string a query-passage pair becomes
//! (`format_pair`), and the output `qid<TAB>docid<TAB>score`, each query's lines by descending
//! score, queries in the order they first appear. It knows nothing of models; the scores come
//! from the caller. `docs/peers/tevatron-reranker.md` quotes the code this follows.

use std::io::Write;
use std::path::Path;

use serde_json::Value;

use crate::atomic::AtomicFile;
use crate::records::{id_field, open_jsonl, py_strip, text_field, text_record, RecordKind};
use crate::trec::Run;
use crate::{Error, Result};

/// One query-passage pair to score, as a rerank input row holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RerankPair {
    /// `query_id`.
    pub query_id: String,
    /// `docid`.
    pub docid: String,
    /// `query`.
    pub query: String,
    /// `title` (empty when the row has none).
    pub title: String,
    /// `text`.
    pub text: String,
}

impl RerankPair {
    /// Reads one rerank input row; errors name the file, line and field. A missing or null
    /// `title` is empty (Tevatron requires the key).
    pub fn from_row(obj: &Value, path: &Path, line: usize) -> Result<Self> {
        let required = |field: &str| -> Result<String> {
            text_field(obj, field, path, line)?.map(str::to_string).ok_or_else(|| {
                Error::MissingField { path: path.to_path_buf(), line, field: field.into() }
            })
        };
        Ok(Self {
            query_id: id_field(obj, "query_id", path, line)?,
            docid: id_field(obj, "docid", path, line)?,
            query: required("query")?,
            title: text_field(obj, "title", path, line)?.unwrap_or_default().to_string(),
            text: required("text")?,
        })
    }

    /// The pair as Tevatron's reranker tokenizes it ([`format_pair`]).
    pub fn formatted(&self, query_prefix: &str, passage_prefix: &str) -> String {
        format_pair(&self.query, &self.text, &self.title, query_prefix, passage_prefix)
    }
}

/// Reads every pair of rerank input files (JSONL, `.jsonl.gz` or Parquet rows of
/// `{query_id, query, docid, title, text}`), in file order.
pub fn read_pairs(files: &[std::path::PathBuf]) -> Result<Vec<RerankPair>> {
    let mut pairs = Vec::new();
    for path in files {
        let mut reader = open_jsonl(path)?;
        while let Some(row) = reader.next_object() {
            let (line, obj) = row?;
            pairs.push(RerankPair::from_row(&obj, path, line)?);
        }
    }
    Ok(pairs)
}

/// The pairs of a first-stage run to rescore: for each query of `run` (in first-seen order),
/// its `depth` best documents (by score, ties by doc id descending as trec_eval orders them),
/// with the query's text from `queries` (`{query_id, query_text | query}`) and the passage's
/// `title` and `text` from `corpus` (`{docid, title?, text}`). Only the documents the run
/// names are kept in memory. A query or document of the run missing from its file is an error
/// naming the run's line and the id.
pub fn pairs_from_run(
    run_path: &Path,
    queries: &[std::path::PathBuf],
    corpus: &[std::path::PathBuf],
    depth: usize,
) -> Result<Vec<RerankPair>> {
    let run = Run::read(run_path)?;
    let mut top: Vec<(&str, Vec<&str>)> = Vec::with_capacity(run.queries.len());
    for (i, (qid, _)) in run.queries.iter().enumerate() {
        let mut docs: Vec<(&str, f64)> = run.docs(i).collect();
        docs.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| b.0.cmp(a.0)));
        top.push((qid, docs.into_iter().take(depth).map(|(d, _)| d).collect()));
    }
    let wanted_q: std::collections::HashSet<&str> = top.iter().map(|(q, _)| *q).collect();
    let wanted_d: std::collections::HashSet<&str> =
        top.iter().flat_map(|(_, d)| d.iter().copied()).collect();
    let mut query_text = std::collections::HashMap::new();
    for path in queries {
        let mut reader = open_jsonl(path)?;
        while let Some(row) = reader.next_object() {
            let (line, obj) = row?;
            let rec = text_record(&obj, RecordKind::Query, path, line)?;
            if wanted_q.contains(rec.id.as_str()) {
                query_text.insert(rec.id, rec.text);
            }
        }
    }
    let mut passages = std::collections::HashMap::new();
    for path in corpus {
        let mut reader = open_jsonl(path)?;
        while let Some(row) = reader.next_object() {
            let (line, obj) = row?;
            let docid = id_field(&obj, "docid", path, line)?;
            if !wanted_d.contains(docid.as_str()) {
                continue;
            }
            let text = text_field(&obj, "text", path, line)?.ok_or_else(|| {
                Error::MissingField { path: path.to_path_buf(), line, field: "text".into() }
            })?;
            let title = text_field(&obj, "title", path, line)?.unwrap_or_default();
            passages.insert(docid, (title.to_string(), text.to_string()));
        }
    }
    let missing = |what: &str, id: &str, column: usize, files: &[std::path::PathBuf]| {
        let line = crate::records::read_to_string(run_path)
            .ok()
            .and_then(|t| {
                t.lines().position(|l| {
                    let cols: Vec<&str> = l.split_whitespace().collect();
                    let col = if cols.len() == 6 && column == 1 { 2 } else { column };
                    cols.get(col) == Some(&id)
                })
            })
            .map_or(0, |i| i + 1);
        let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
        Error::Line {
            path: run_path.to_path_buf(),
            line,
            what: format!("{what} {id:?} is not in {}", names.join(", ")),
        }
    };
    let mut pairs = Vec::new();
    for (qid, docs) in top {
        let query = query_text.get(qid).ok_or_else(|| missing("query", qid, 0, queries))?;
        for docid in docs {
            let (title, text) =
                passages.get(docid).ok_or_else(|| missing("document", docid, 1, corpus))?;
            pairs.push(RerankPair {
                query_id: qid.to_string(),
                docid: docid.to_string(),
                query: query.clone(),
                title: title.clone(),
                text: text.clone(),
            });
        }
    }
    Ok(pairs)
}

/// Tevatron's `format_pair`: the title with every `-` turned into a space and stripped, then
/// `f'{query_prefix} {query} {passage_prefix} {title} {passage}'.strip()`. Only the ends are
/// stripped: an empty title or prefix leaves its spaces inside, as Tevatron's string does.
pub fn format_pair(
    query: &str,
    passage: &str,
    title: &str,
    query_prefix: &str,
    passage_prefix: &str,
) -> String {
    let title = title.replace('-', " ");
    let title = py_strip(&title);
    py_strip(&format!("{query_prefix} {query} {passage_prefix} {title} {passage}")).to_string()
}

/// Writes scored pairs as Tevatron's `rerank.py` does, atomically: the queries in the order
/// they first appear in `scored`, each query's pairs by descending score (ties keep their
/// order), one `qid<TAB>docid<TAB>score` line each, the score written as Python writes a float
/// (`2.0`, `0.125`). A NaN score is an error naming the pair.
pub fn write_reranked(path: &Path, scored: &[(&str, &str, f32)]) -> Result<()> {
    if let Some((qid, docid, _)) = scored.iter().find(|(_, _, s)| s.is_nan()) {
        return Err(Error::Invalid(format!(
            "{}: the score of query {qid}, passage {docid} is NaN",
            path.display()
        )));
    }
    let mut order: Vec<&str> = Vec::new();
    let mut groups: std::collections::HashMap<&str, Vec<(&str, f32)>> =
        std::collections::HashMap::new();
    for &(qid, docid, score) in scored {
        groups
            .entry(qid)
            .or_insert_with(|| {
                order.push(qid);
                Vec::new()
            })
            .push((docid, score));
    }
    let mut out = AtomicFile::create(path)?;
    for qid in order {
        let mut docs = groups.remove(qid).unwrap_or_default();
        docs.sort_by(|a, b| b.1.total_cmp(&a.1));
        for (docid, score) in docs {
            writeln!(out.writer(), "{qid}\t{docid}\t{score:?}").map_err(|e| out.err(e))?;
        }
    }
    out.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tevatron's string, spaces inside included, for the prefixes of its older and newer
    /// defaults, titles with hyphens, MS MARCO's lone `-`, and an empty title.
    #[test]
    fn pairs_are_formatted_as_tevatron_formats_them() {
        let f = format_pair;
        assert_eq!(f("what is x", "x is y", "", "", ""), "what is x   x is y");
        assert_eq!(
            f("what is x", "x is y", "-", "query:", "passage:"),
            "query: what is x passage:  x is y"
        );
        assert_eq!(
            f("q", "p", "Dense-Retrieval - Intro", "query:", "passage:"),
            "query: q passage: Dense Retrieval   Intro p"
        );
        assert_eq!(f(" q ", "p ", " t ", "", ""), "q   t p");
    }

    #[test]
    fn rows_are_read_with_clear_errors() {
        let path = Path::new("rerank.jsonl");
        let row: Value = serde_json::from_str(
            r#"{"query_id": 3, "query": "q", "docid": "d1", "title": "T-1", "text": "p"}"#,
        )
        .unwrap();
        let pair = RerankPair::from_row(&row, path, 7).unwrap();
        assert_eq!((pair.query_id.as_str(), pair.docid.as_str()), ("3", "d1"));
        assert_eq!(pair.formatted("", ""), "q  T 1 p");
        let untitled: Value =
            serde_json::from_str(r#"{"query_id": "a", "query": "q", "docid": "d", "text": "p"}"#)
                .unwrap();
        assert_eq!(RerankPair::from_row(&untitled, path, 1).unwrap().title, "");
        let no_text: Value =
            serde_json::from_str(r#"{"query_id": "a", "query": "q", "docid": "d"}"#).unwrap();
        let e = RerankPair::from_row(&no_text, path, 9).unwrap_err().to_string();
        assert!(e.contains("rerank.jsonl") && e.contains('9') && e.contains("text"), "{e}");
    }

    #[test]
    fn a_run_becomes_each_querys_best_pairs_with_texts_and_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let run = write(
            "run.trec",
            "q1 Q0 d1 1 0.5 x\nq1 Q0 d2 2 0.9 x\nq1 Q0 d3 3 0.5 x\nq2 Q0 d1 1 3 x\n",
        );
        let queries = [write("q.jsonl", "{\"query_id\": \"q2\", \"query\": \"two\"}\n{\"query_id\": \"q1\", \"query_text\": \"one\"}\n")];
        let corpus = [write(
            "c.jsonl",
            "{\"docid\": \"d1\", \"title\": \"T\", \"text\": \"a\"}\n{\"docid\": \"d2\", \"text\": \"b\"}\n{\"docid\": \"d3\", \"text\": \"c\"}\n{\"docid\": \"d9\", \"text\": \"z\"}\n",
        )];
        let pairs = pairs_from_run(&run, &queries, &corpus, 2).unwrap();
        let got: Vec<(&str, &str, &str, &str)> = pairs
            .iter()
            .map(|p| (p.query_id.as_str(), p.docid.as_str(), p.query.as_str(), p.title.as_str()))
            .collect();
        // Depth 2 of q1: d2 (0.9), then of the tie at 0.5 the larger doc id, d3.
        assert_eq!(
            got,
            [("q1", "d2", "one", ""), ("q1", "d3", "one", ""), ("q2", "d1", "two", "T")]
        );
        // The same pairs from Tevatron's 3-column ranking.
        let tsv = write("run.tsv", "q1\td1\t0.5\nq1\td2\t0.9\nq1\td3\t0.5\nq2\td1\t3\n");
        assert_eq!(pairs_from_run(&tsv, &queries, &corpus, 2).unwrap(), pairs);
        let bad = write("bad.trec", "q1 Q0 d2 1 0.9 x\nq3 Q0 d1 1 0.5 x\n");
        let e = pairs_from_run(&bad, &queries, &corpus, 5).unwrap_err().to_string();
        assert!(e.contains("bad.trec:2:") && e.contains("query \"q3\""), "{e}");
        let bad = write("bad2.tsv", "q1\td2\t1\nq1\tdx\t0.5\n");
        let e = pairs_from_run(&bad, &queries, &corpus, 5).unwrap_err().to_string();
        assert!(
            e.contains("bad2.tsv:2:") && e.contains("document \"dx\"") && e.contains("c.jsonl"),
            "{e}"
        );
    }

    #[test]
    fn input_files_are_read_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("in.jsonl");
        std::fs::write(&p, "{\"query_id\": 1, \"query\": \"q\", \"docid\": \"a\", \"text\": \"x\"}\n\n{\"query_id\": 1, \"query\": \"q\", \"docid\": \"b\", \"title\": null, \"text\": \"y\"}\n").unwrap();
        let pairs = read_pairs(std::slice::from_ref(&p)).unwrap();
        assert_eq!(pairs.iter().map(|p| p.docid.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        std::fs::write(&p, "{\"query_id\": 1, \"docid\": \"a\", \"text\": \"x\"}\n").unwrap();
        let e = read_pairs(&[p]).unwrap_err().to_string();
        assert!(e.contains("in.jsonl:1:") && e.contains("query"), "{e}");
    }

    #[test]
    fn output_groups_queries_in_order_and_sorts_by_score() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.txt");
        let scored = [
            ("q2", "a", 0.5f32),
            ("q1", "b", 1.0),
            ("q2", "c", 2.0),
            ("q1", "d", 1.0),
            ("q1", "e", -3.0),
        ];
        write_reranked(&path, &scored).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, "q2\tc\t2.0\nq2\ta\t0.5\nq1\tb\t1.0\nq1\td\t1.0\nq1\te\t-3.0\n");
        let e = write_reranked(&path, &[("q", "d", f32::NAN)]).unwrap_err().to_string();
        assert!(e.contains("NaN") && e.contains("query q"), "{e}");
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            text,
            "a failed write leaves the old file"
        );
    }
}
