//! Tevatron's reranker data, as `tevatron.reranker` reads and writes it: rerank input rows
//! (`{query_id, query, docid, title, text}`, read a chunk at a time), a run's top documents
//! with their query and passage texts (beyond Tevatron), what a query-passage pair becomes
//! (Tevatron's one string, `format_pair`, or sentence-transformers' text pair), and the output `qid<TAB>docid<TAB>score`, each query's lines by descending
//! score, queries in the order they first appear. It knows nothing of models; the scores come
//! from the caller. `docs/peers/tevatron-reranker.md` quotes the code this follows.

use std::io::Write;
use std::path::Path;

use serde_json::Value;

use crate::atomic::AtomicFile;
use crate::records::{
    id_field, open_jsonl, py_strip, required_text, text_field, text_record, RecordKind,
};
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
            Ok(required_text(obj, field, path, line)?.to_string())
        };
        Ok(Self {
            query_id: id_field(obj, "query_id", path, line)?,
            docid: id_field(obj, "docid", path, line)?,
            query: required("query")?,
            title: text_field(obj, "title", path, line)?.unwrap_or_default().to_string(),
            text: required("text")?,
        })
    }
}

/// How a query-passage pair becomes a cross-encoder's input (`--pair_format`): Tevatron's
/// reranker and sentence-transformers' `CrossEncoder` give a model its pairs differently, and a
/// model scores well only in the form it was trained on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PairFormat {
    /// One text, [`format_pair`]'s string with Tevatron's prefixes.
    Tevatron,
    /// A text pair `(query, title + " " + text)` with token types, as `CrossEncoder.predict`
    /// and sentence-transformers' CrossEncoder training give it; the prefixes do not apply.
    Pair,
}

impl PairFormat {
    /// The name `--pair_format` takes and a saved reranker's `config.json` records
    /// (`tevatron_pair_format`).
    pub fn name(self) -> &'static str {
        match self {
            PairFormat::Tevatron => "tevatron",
            PairFormat::Pair => "pair",
        }
    }

    /// The format a recorded name stands for; anything but `pair` is Tevatron's (the format
    /// of every reranker saved before the name was recorded).
    pub fn from_recorded(name: Option<&str>) -> Self {
        match name {
            Some("pair") => PairFormat::Pair,
            _ => PairFormat::Tevatron,
        }
    }
}

/// A pair's input in `format`: Tevatron's one string, or the query and the passage (title and
/// text joined by a space, the text alone without a title) of a text pair.
pub fn pair_input(
    format: PairFormat,
    query: &str,
    title: &str,
    text: &str,
    query_prefix: &str,
    passage_prefix: &str,
) -> (String, Option<String>) {
    match format {
        PairFormat::Tevatron => {
            (format_pair(query, text, title, query_prefix, passage_prefix), None)
        }
        PairFormat::Pair => {
            let passage =
                if title.is_empty() { text.to_string() } else { format!("{title} {text}") };
            (query.to_string(), Some(passage))
        }
    }
}

/// Rerank input files (JSONL, `.jsonl.gz` or Parquet rows of `{query_id, query, docid, title,
/// text}`) read a chunk at a time, in file order, so that memory holds one chunk of texts.
pub struct PairReader {
    files: std::vec::IntoIter<std::path::PathBuf>,
    current: Option<(std::path::PathBuf, crate::records::JsonlReader)>,
    /// The (query, document) pairs read so far: a pair given twice would be scored and written
    /// twice, and evaluation would keep one of its scores.
    seen: std::collections::HashSet<(String, String)>,
}

impl PairReader {
    /// A reader over `files`, opened one after the other.
    pub fn new(files: Vec<std::path::PathBuf>) -> Self {
        Self { files: files.into_iter(), current: None, seen: Default::default() }
    }

    /// The next `n` pairs (fewer at the end; none when all are read).
    pub fn next_chunk(&mut self, n: usize) -> Result<Vec<RerankPair>> {
        let mut out = Vec::with_capacity(n.min(1 << 16));
        while out.len() < n {
            if self.current.is_none() {
                let Some(path) = self.files.next() else { break };
                let reader = open_jsonl(&path)?;
                self.current = Some((path, reader));
            }
            let (path, reader) = self.current.as_mut().expect("opened above");
            match reader.next_object() {
                Some(row) => {
                    let (line, obj) = row?;
                    let pair = RerankPair::from_row(&obj, path, line)?;
                    if !self.seen.insert((pair.query_id.clone(), pair.docid.clone())) {
                        return Err(Error::Line {
                            path: path.clone(),
                            line,
                            what: format!(
                                "query {:?}, passage {:?} is given twice: each pair once",
                                pair.query_id, pair.docid
                            ),
                        });
                    }
                    out.push(pair);
                }
                None => self.current = None,
            }
        }
        Ok(out)
    }
}

/// Reads every pair of rerank input files, in file order ([`PairReader`] at once).
pub fn read_pairs(files: &[std::path::PathBuf]) -> Result<Vec<RerankPair>> {
    PairReader::new(files.to_vec()).next_chunk(usize::MAX)
}

/// The pairs of a run to rescore, each query's and passage's text stored once: a query with a
/// hundred documents holds its text once, not a hundred times.
#[derive(Clone, Debug, Default)]
pub struct RunPairs {
    /// `(query_id, query)`.
    queries: Vec<(String, String)>,
    /// `(docid, title, text)`.
    docs: Vec<(String, String, String)>,
    /// `(query, doc)` indices, in output order.
    pairs: Vec<(u32, u32)>,
}

impl RunPairs {
    /// Number of pairs.
    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    /// Whether there is no pair.
    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    /// The ids of the queries, in the run's order.
    pub fn query_ids(&self) -> impl Iterator<Item = &str> + '_ {
        self.queries.iter().map(|(id, _)| id.as_str())
    }

    /// The pairs `range` with their texts.
    pub fn get(&self, range: std::ops::Range<usize>) -> Vec<RerankPair> {
        self.pairs[range]
            .iter()
            .map(|&(q, d)| {
                let (query_id, query) = &self.queries[q as usize];
                let (docid, title, text) = &self.docs[d as usize];
                RerankPair {
                    query_id: query_id.clone(),
                    docid: docid.clone(),
                    query: query.clone(),
                    title: title.clone(),
                    text: text.clone(),
                }
            })
            .collect()
    }
}

/// The pairs of a first-stage run to rescore: for each query of `run` (in first-seen order),
/// its `depth` best documents (by score, ties by doc id descending as trec_eval orders them),
/// with the query's text from `queries` (`{query_id, query_text | query}`) and the passage's
/// `title` and `text` from `corpus` (`{docid, title?, text}`). Only the documents the run
/// names are kept in memory, each once. A query or document of the run missing from its file
/// is an error naming the run's line and the id.
pub fn pairs_from_run(
    run_path: &Path,
    queries: &[std::path::PathBuf],
    corpus: &[std::path::PathBuf],
    depth: usize,
) -> Result<RunPairs> {
    let run = Run::read(run_path)?;
    let mut top: Vec<(&str, Vec<&str>)> = Vec::with_capacity(run.queries.len());
    for (i, (qid, _)) in run.queries.iter().enumerate() {
        let mut docs: Vec<(&str, f64)> = run.docs(i).collect();
        docs.sort_by(crate::metrics::trec_order);
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
            let text = required_text(&obj, "text", path, line)?;
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
    let mut out = RunPairs::default();
    let mut doc_index: std::collections::HashMap<&str, u32> = std::collections::HashMap::new();
    for (qid, docs) in top {
        let query = query_text.get(qid).ok_or_else(|| missing("query", qid, 0, queries))?;
        let q = out.queries.len() as u32;
        out.queries.push((qid.to_string(), query.clone()));
        for docid in docs {
            let d = match doc_index.get(docid) {
                Some(&d) => d,
                None => {
                    let (title, text) =
                        passages.get(docid).ok_or_else(|| missing("document", docid, 1, corpus))?;
                    let d = out.docs.len() as u32;
                    out.docs.push((docid.to_string(), title.clone(), text.clone()));
                    doc_index.insert(docid, d);
                    d
                }
            };
            out.pairs.push((q, d));
        }
    }
    Ok(out)
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
/// (`2.0`, `0.125`). A score that is not finite (NaN, or an infinity from an fp16 overflow,
/// which eval, fuse and rerank refuse to read back) is an error naming the pair.
pub fn write_reranked(path: &Path, scored: &[(&str, &str, f32)]) -> Result<()> {
    if let Some((qid, docid, score)) = scored.iter().find(|(_, _, s)| !s.is_finite()) {
        return Err(Error::Invalid(format!(
            "{}: the score of query {qid}, passage {docid} is {score}",
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

    /// A pair's input in each format: Tevatron's string (prefixes and title inside), or the
    /// query and the title-and-text passage of a text pair (no prefixes, no title turned into
    /// spaces); the recorded names read back, an unknown or missing one as Tevatron's.
    #[test]
    fn a_pair_becomes_the_input_of_its_format() {
        let one = pair_input(PairFormat::Tevatron, "q", "a-b", "text", "query:", "passage:");
        assert_eq!(one, ("query: q passage: a b text".to_string(), None));
        let two = pair_input(PairFormat::Pair, "q", "a-b", "text", "query:", "passage:");
        assert_eq!(two, ("q".to_string(), Some("a-b text".to_string())));
        let untitled = pair_input(PairFormat::Pair, "q", "", "text", "", "");
        assert_eq!(untitled.1.as_deref(), Some("text"));
        for f in [PairFormat::Tevatron, PairFormat::Pair] {
            assert_eq!(PairFormat::from_recorded(Some(f.name())), f);
        }
        assert_eq!(PairFormat::from_recorded(Some("other")), PairFormat::Tevatron);
        assert_eq!(PairFormat::from_recorded(None), PairFormat::Tevatron);
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
        assert_eq!(
            (pair.query.as_str(), pair.title.as_str(), pair.text.as_str()),
            ("q", "T-1", "p")
        );
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
        let run_pairs = pairs_from_run(&run, &queries, &corpus, 2).unwrap();
        let pairs = run_pairs.get(0..run_pairs.len());
        // At depth 3 both queries have d1: four pairs, three passages stored.
        let deeper = pairs_from_run(&run, &queries, &corpus, 3).unwrap();
        assert_eq!((deeper.len(), deeper.docs.len()), (4, 3));
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
        let again = pairs_from_run(&tsv, &queries, &corpus, 2).unwrap();
        assert_eq!(again.get(0..again.len()), pairs);
        assert_eq!(again.get(1..3), pairs[1..3]);
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
        // Chunk by chunk, across files: the same pairs in the same order.
        let q = dir.path().join("more.jsonl");
        std::fs::write(
            &q,
            "{\"query_id\": 2, \"query\": \"r\", \"docid\": \"c\", \"text\": \"z\"}\n",
        )
        .unwrap();
        let mut reader = PairReader::new(vec![p.clone(), q]);
        let chunks: Vec<Vec<String>> = (0..3)
            .map(|_| reader.next_chunk(2).unwrap().into_iter().map(|p| p.docid).collect())
            .collect();
        assert_eq!(chunks, [vec!["a", "b"], vec!["c"], vec![]]);
        // A pair given twice, across files (it was scored and written twice): its second line.
        let twice = dir.path().join("twice.jsonl");
        std::fs::write(&twice, "{\"query_id\": 2, \"query\": \"r\", \"docid\": \"b\", \"text\": \"z\"}\n{\"query_id\": 1, \"query\": \"q\", \"docid\": \"b\", \"text\": \"z\"}\n").unwrap();
        let e = read_pairs(&[p.clone(), twice]).unwrap_err().to_string();
        assert!(
            e.ends_with("twice.jsonl:2: query \"1\", passage \"b\" is given twice: each pair once"),
            "{e}"
        );
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
        let e = write_reranked(&path, &[("q", "d", f32::INFINITY)]).unwrap_err().to_string();
        assert!(e.ends_with("the score of query q, passage d is inf"), "{e}");
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            text,
            "a failed write leaves the old file"
        );
    }
}
