//! Tevatron's reranker data, as `tevatron.reranker` reads and writes it: rerank input rows
//! (`{query_id, query, docid, title, text}`), the one string a query-passage pair becomes
//! (`format_pair`), and the output `qid<TAB>docid<TAB>score`, each query's lines by descending
//! score, queries in the order they first appear. It knows nothing of models; the scores come
//! from the caller. `docs/peers/tevatron-reranker.md` quotes the code this follows.

use std::io::Write;
use std::path::Path;

use serde_json::Value;

use crate::atomic::AtomicFile;
use crate::records::{id_field, py_strip, text_field};
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
