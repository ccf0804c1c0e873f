//! TREC runs and qrels: reading the 6-column run (`qid Q0 docid rank score tag`), Tevatron's
//! 3-column ranking (`qid docid score`) and 4-column qrels (`qid iter docid rel`), and writing
//! runs in each format. The rank column and line order play no part; metrics re-sort.

use std::io::Write;
use std::path::Path;

use crate::atomic::AtomicFile;
use crate::fxhash::FxHashMap;
use crate::records::read_to_string;
use crate::{Error, Result};

/// Relevance judgements: query id → (doc id → relevance).
#[derive(Clone, Debug, Default)]
pub struct Qrels {
    /// Judgements by query, in first-seen order of queries.
    pub queries: Vec<(String, FxHashMap<String, i64>)>,
}

/// A ranking: query id → list of (doc id, score). A doc id seen twice for a query keeps the
/// last score (as pytrec_eval's dict does).
#[derive(Clone, Debug, Default)]
pub struct Run {
    /// The run's text; doc ids are [`Span`]s into it, so parsing allocates nothing per line.
    text: String,
    /// Retrieved documents by query, in first-seen order of queries.
    pub queries: Vec<(String, Vec<(Span, f64)>)>,
}

/// Where a doc id lies in a [`Run`]'s text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    start: usize,
    end: usize,
}

impl Run {
    /// The doc id a span points at.
    pub fn docid(&self, span: Span) -> &str {
        &self.text[span.start..span.end]
    }

    /// The documents of query `i` as `(docid, score)`, in first-seen order.
    pub fn docs(&self, i: usize) -> impl Iterator<Item = (&str, f64)> + '_ {
        self.queries[i].1.iter().map(|&(span, score)| (self.docid(span), score))
    }
}

/// Splits a line on white space into at most 7 columns without allocating; returns the count
/// (7 means "more than 6").
fn columns(line: &str) -> ([&str; 7], usize) {
    let mut cols = [""; 7];
    let mut n = 0;
    for c in line.split_ascii_whitespace() {
        if n == 7 {
            break;
        }
        cols[n] = c;
        n += 1;
    }
    (cols, n)
}

fn line_err(path: &Path, line: usize, what: String) -> Error {
    Error::Line { path: path.to_path_buf(), line, what }
}

/// A run's score column: a finite number. NaN or an infinity has no place in a ranking, which
/// sorts by it (eval's sort panicked on NaN, and rerank took it for the best).
fn parse_score(text: &str, path: &Path, line: usize) -> Result<f64> {
    text.parse()
        .ok()
        .filter(|s: &f64| s.is_finite())
        .ok_or_else(|| line_err(path, line, format!("score {text:?} is not a finite number")))
}

impl Qrels {
    /// Reads a 4-column qrels file.
    pub fn read(path: &Path) -> Result<Self> {
        Self::parse_str(&read_to_string(path)?, path)
    }

    /// Parses qrels text; `path` is only used in error messages.
    pub fn parse_str(text: &str, path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let mut index: FxHashMap<&str, usize> = FxHashMap::default();
        let mut qrels = Qrels::default();
        for (i, line) in text.lines().enumerate() {
            let (cols, n) = columns(line);
            if n == 0 {
                continue;
            }
            if n != 4 {
                let found = if n == 7 { line.split_whitespace().count() } else { n };
                return Err(line_err(
                    path,
                    i + 1,
                    format!("qrels line needs 4 columns, found {found}"),
                ));
            }
            let [qid, _, docid, rel, ..] = cols;
            // An integer, or one written with a fraction of zeros (`1.0`, which trec_eval's
            // `atol` reads as 1); any other fraction (or exponent) is refused, not cut.
            let whole = rel.split_once('.').filter(|(_, f)| f.bytes().all(|b| b == b'0'));
            let rel: i64 = whole.map_or(rel, |(w, _)| w).parse().map_err(|_| {
                line_err(path, i + 1, format!("relevance {rel:?} is not an integer"))
            })?;
            let slot = *index.entry(qid).or_insert_with(|| {
                qrels.queries.push((qid.to_string(), FxHashMap::default()));
                qrels.queries.len() - 1
            });
            qrels.queries[slot].1.insert(docid.to_string(), rel);
        }
        Ok(qrels)
    }
}

impl Run {
    /// Reads a TREC 6-column run or Tevatron's 3-column TSV (whitespace-separated either way).
    pub fn read(path: &Path) -> Result<Self> {
        Self::parse_string(read_to_string(path)?, path)
    }

    /// Parses run text; `path` is only used in error messages.
    pub fn parse_str(text: &str, path: impl AsRef<Path>) -> Result<Self> {
        Self::parse_string(text.to_owned(), path)
    }

    fn parse_string(owned: String, path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = owned.as_str();
        let base = text.as_ptr() as usize;
        // Keys borrow from `text`: no allocation per line beyond the stored doc id.
        let mut index: FxHashMap<&str, usize> = FxHashMap::default();
        // Doc ids already given, per query; each new map starts at the size of the previous
        // query's, which avoids rehashing as maps grow (runs have a fixed depth per query).
        let mut seen: Vec<FxHashMap<&str, usize>> = Vec::new();
        let mut queries: Vec<(String, Vec<(Span, f64)>)> = Vec::new();
        let mut current: Option<(&str, usize)> = None;
        for (i, line) in text.lines().enumerate() {
            let (cols, n) = columns(line);
            let (qid, docid, score) = match n {
                0 => continue,
                3 => (cols[0], cols[1], cols[2]),
                6 => (cols[0], cols[2], cols[4]),
                _ => {
                    let found = if n == 7 { line.split_whitespace().count() } else { n };
                    return Err(line_err(
                        path,
                        i + 1,
                        format!("run line needs 6 columns (qid Q0 docid rank score tag) or 3 (qid docid score), found {found}"),
                    ));
                }
            };
            let score = parse_score(score, path, i + 1)?;
            // Runs are grouped by query, so the current slot is almost always the one.
            let slot = match current {
                Some((q, slot)) if q == qid => slot,
                _ => {
                    let slot = *index.entry(qid).or_insert_with(|| {
                        let guess = seen.last().map_or(0, |m| m.len());
                        seen.push(FxHashMap::with_capacity_and_hasher(guess, Default::default()));
                        queries.push((qid.to_string(), Vec::with_capacity(guess)));
                        queries.len() - 1
                    });
                    current = Some((qid, slot));
                    slot
                }
            };
            let docs = &mut queries[slot].1;
            match seen[slot].get(docid) {
                Some(&at) => docs[at].1 = score,
                None => {
                    seen[slot].insert(docid, docs.len());
                    let start = docid.as_ptr() as usize - base;
                    docs.push((Span { start, end: start + docid.len() }, score));
                }
            }
        }
        drop(seen);
        Ok(Run { text: owned, queries })
    }
}

/// One ranked row, as search produces them: per query, rows come sorted best first.
#[derive(Clone, Debug, PartialEq)]
pub struct RankedRow<'a> {
    /// Query id.
    pub qid: &'a str,
    /// Document id.
    pub docid: &'a str,
    /// Score.
    pub score: f32,
}

/// The output formats of rankings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunFormat {
    /// Tevatron's `qid\tdocid\tscore`.
    Tsv,
    /// `qid Q0 docid rank score dense`.
    Trec,
    /// MS MARCO's `qid\tdocid\trank`.
    Marco,
}

/// Whether a run file can carry `id`: not empty, and no whitespace (its readers, ours and
/// trec_eval alike, split columns on it).
pub fn fits_a_run(id: &str) -> bool {
    !id.is_empty() && !id.contains(char::is_whitespace)
}

/// Writes a ranking file atomically. Ranks restart at 1 when the query id changes, as in
/// Tevatron's converters; with `remove_query`, rows whose doc id equals the query id are dropped
/// without consuming a rank.
pub fn write_run<'a>(
    path: &Path,
    rows: impl IntoIterator<Item = (&'a str, &'a str, String)>,
    format: RunFormat,
    remove_query: bool,
) -> Result<()> {
    let mut out = AtomicFile::create(path)?;
    let mut last: Option<&str> = None;
    let mut rank = 0usize;
    for (qid, docid, score) in rows {
        // As Tevatron's converters: a change of query restarts the ranks even at a row that is
        // then dropped (only ungrouped input tells the two orders apart).
        if last != Some(qid) {
            rank = 0;
            last = Some(qid);
        }
        if remove_query && qid == docid {
            continue;
        }
        for (what, id) in [("query id", qid), ("docid", docid)] {
            if !fits_a_run(id) {
                return Err(Error::Invalid(format!(
                    "{}: {what} {id:?} is empty or holds whitespace, which a whitespace-separated \
                     run cannot carry (its readers, ours and trec_eval alike, would split it): \
                     rename the ids, or keep the ranking in safetensors",
                    path.display()
                )));
            }
        }
        rank += 1;
        let w = out.writer();
        let r = match format {
            RunFormat::Tsv => writeln!(w, "{qid}\t{docid}\t{score}"),
            RunFormat::Trec => writeln!(w, "{qid} Q0 {docid} {rank} {score} dense"),
            RunFormat::Marco => writeln!(w, "{qid}\t{docid}\t{rank}"),
        };
        r.map_err(|e| out.err(e))?;
    }
    out.commit()
}

/// Reads Tevatron's whitespace-separated `qid docid score` ranking as raw string columns, in
/// file order (the converters keep the order and the score text as they are).
pub fn read_ranking_columns(path: &Path) -> Result<Vec<(String, String, String)>> {
    let text = read_to_string(path)?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        match cols[..] {
            [] => continue,
            // The score is checked, and written as it was given.
            [q, d, s] => {
                parse_score(s, path, i + 1)?;
                rows.push((q.to_string(), d.to_string(), s.to_string()))
            }
            _ => {
                return Err(line_err(
                    path,
                    i + 1,
                    format!("ranking line needs 3 columns (qid docid score), found {}", cols.len()),
                ))
            }
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tevatron's converters' ranks: restarted at each change of query, a dropped self-hit
    /// consuming no rank, and a change of query at a dropped row restarting them too.
    #[test]
    fn converted_ranks_follow_tevatrons_converters() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("r.trec");
        let rows = [("q1", "d1"), ("q1", "q1"), ("q1", "d2"), ("q2", "q2"), ("q1", "d9")];
        let rows = rows.iter().map(|(q, d)| (*q, *d, "1".to_string()));
        write_run(&out, rows, RunFormat::Trec, true).unwrap();
        let ranks: Vec<String> = std::fs::read_to_string(&out)
            .unwrap()
            .lines()
            .map(|l| l.split(' ').take(4).collect::<Vec<_>>().join(" "))
            .collect();
        assert_eq!(ranks, ["q1 Q0 d1 1", "q1 Q0 d2 2", "q1 Q0 d9 1"]);
    }

    #[test]
    fn run_reads_both_formats_and_keeps_last_duplicate() {
        let run = Run::parse_str("q1 Q0 d1 1 2.5 t\nq1\td2\t-1\nq2 d1 0\nq1 d1 3\n", "r").unwrap();
        assert_eq!(run.queries[0].0, "q1");
        assert_eq!(run.docs(0).collect::<Vec<_>>(), [("d1", 3.0), ("d2", -1.0)]);
        assert_eq!(run.docs(1).collect::<Vec<_>>(), [("d1", 0.0)]);
    }

    #[test]
    fn malformed_lines_name_file_and_line() {
        let e = Run::parse_str("q1 d1 1\nq1 d2\n", "run.txt").unwrap_err();
        assert_eq!(
            e.to_string(),
            "run.txt:2: run line needs 6 columns (qid Q0 docid rank score tag) or 3 (qid docid score), found 2"
        );
        let e = Run::parse_str("q1 d1 x\n", "run.txt").unwrap_err();
        assert_eq!(e.to_string(), "run.txt:1: score \"x\" is not a finite number");
        // NaN sorts nowhere (eval's sort panicked on it, rerank took it for the best); an
        // infinity breaks the fusion's normalisation.
        for bad in ["NaN", "nan", "inf", "-infinity"] {
            let e = Run::parse_str(&format!("q1 d1 1\nq1 d2 {bad}\n"), "run.txt").unwrap_err();
            assert_eq!(e.to_string(), format!("run.txt:2: score {bad:?} is not a finite number"));
        }
        let e = Qrels::parse_str("q 0 d\n", "q.txt").unwrap_err();
        assert_eq!(e.to_string(), "q.txt:1: qrels line needs 4 columns, found 3");
        let e = Qrels::parse_str("q 0 d 1.5\n", "q.txt").unwrap_err();
        assert_eq!(e.to_string(), "q.txt:1: relevance \"1.5\" is not an integer");
        // A whole number written with a fraction of zeros is that number, as trec_eval reads it.
        let q = Qrels::parse_str("q 0 d 2.0\nq 0 e -1.00\n", "q.txt").unwrap();
        assert_eq!(q.queries[0].1["d"], 2);
        assert_eq!(q.queries[0].1["e"], -1);
        let e = Qrels::parse_str("q 0 d 1e3\n", "q.txt").unwrap_err();
        assert_eq!(e.to_string(), "q.txt:1: relevance \"1e3\" is not an integer");
    }

    /// The converters' reader checks the score column too (it wrote `abc` into a TREC run).
    #[test]
    fn ranking_columns_refuse_a_score_that_is_not_a_number() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.tsv");
        std::fs::write(&path, "q1 d1 1e-3\nq1 d2 abc\n").unwrap();
        let e = read_ranking_columns(&path).unwrap_err().to_string();
        assert!(e.ends_with("r.tsv:2: score \"abc\" is not a finite number"), "{e}");
        std::fs::write(&path, "q1 d1 1e-3\n").unwrap();
        assert_eq!(read_ranking_columns(&path).unwrap()[0].2, "1e-3", "kept as written");
    }

    /// A byte-order mark before the first line is not part of the first query id.
    #[test]
    fn a_byte_order_mark_is_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let (qrels, run) = (dir.path().join("qrels.txt"), dir.path().join("run.txt"));
        std::fs::write(&qrels, "\u{feff}q1 0 d1 1\n").unwrap();
        std::fs::write(&run, "\u{feff}q1 d1 2\n").unwrap();
        assert_eq!(Qrels::read(&qrels).unwrap().queries[0].0, "q1");
        assert_eq!(Run::read(&run).unwrap().queries[0].0, "q1");
    }

    #[test]
    fn converters_renumber_and_remove_self_hits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.trec");
        let rows =
            vec![("q1", "q1", "9".to_string()), ("q1", "d1", "8".into()), ("q2", "d3", "1".into())];
        write_run(&path, rows.clone(), RunFormat::Trec, true).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "q1 Q0 d1 1 8 dense\nq2 Q0 d3 1 1 dense\n"
        );
        write_run(&path, rows, RunFormat::Marco, false).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "q1\tq1\t1\nq1\td1\t2\nq2\td3\t1\n");
    }
}
