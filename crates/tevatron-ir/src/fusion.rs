//! Fusion of rankings: several runs over the same queries combined into one, as hybrid search
//! (a dense and a lexical run) and reranking with the first stage's scores kept (a reranker's
//! and a retriever's run) do. The methods and normalisations are ranx's (`ranx.fuse`, the
//! field's fusion library; `testdata/fusion` holds its values): reciprocal rank fusion
//! (Cormack et al., 2009; pyserini's `--rrf.k`), and a weighted sum of scores normalised per
//! query and run (min-max or zero mean and unit variance).
//!
//! A document a run does not retrieve for a query adds nothing from that run (ranx's rule:
//! its normalised score counts as 0). A query missing from some runs is fused from the runs
//! that have it. Ranks, and the order of the fused run, follow trec_eval: score descending,
//! ties by doc id descending ([`trec_order`]), so the fused file reads as `tevatron eval` ranks it.

use std::path::Path;

use crate::fxhash::FxHashMap;
use crate::metrics::trec_order;
use crate::trec::Run;
use crate::{Error, Result};

/// ranx's floor on the spread a normalisation divides by, so that a query whose scores are all
/// alike normalises to zeros instead of dividing by zero.
const MIN_SPREAD: f64 = 1e-9;

/// How a run's scores are made comparable with another run's before a weighted sum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Normalization {
    /// `(s - min) / (max - min)` over the query's documents in that run.
    MinMax,
    /// `(s - mean) / std` (population standard deviation) over the query's documents in that
    /// run: ranx's "zmuv".
    Zmuv,
    /// The scores as they are (for runs already on one scale).
    None,
}

/// How runs are combined.
#[derive(Clone, Debug, PartialEq)]
pub enum Method {
    /// Reciprocal rank fusion: a document's score is the sum over runs of `1 / (k + rank)`.
    Rrf {
        /// The constant `k` (60 in Cormack et al., pyserini and ranx).
        k: f64,
    },
    /// The sum over runs of `weight x normalised score`.
    WeightedSum {
        /// One weight per run, in the order the runs are given.
        weights: Vec<f64>,
        /// How each run's scores are normalised first.
        normalization: Normalization,
    },
}

/// A fused ranking: per query (in first-seen order over the runs), its documents with fused
/// scores, best first.
pub type Fused = Vec<(String, Vec<(String, f64)>)>;

/// What fusion learnt about the inputs' coverage, for the caller's log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Coverage {
    /// Queries fused.
    pub queries: usize,
    /// Queries some run lacks (fused from the runs that have them).
    pub partial: usize,
}

/// Fuses `runs` (each with the file it was read from, named in errors) by `method`, reading
/// each run's best `depth` documents for a query and keeping the best `k` fused ones
/// (pyserini's `--depth` and `--k`). Refuses fewer than two runs, a weight count other than
/// the run count, a negative or non-finite RRF constant, a non-finite weight (negative weights are
/// allowed), and a fused score that overflows (scores near the largest f64, naming the query).
/// A run's scores are finite: [`Run`]'s parser refuses any other, naming the file and line.
pub fn fuse(
    runs: &[(&Path, &Run)],
    method: &Method,
    depth: usize,
    k: usize,
) -> Result<(Fused, Coverage)> {
    if runs.len() < 2 {
        return Err(Error::Invalid(format!("fusion needs at least 2 runs, got {}", runs.len())));
    }
    match method {
        Method::Rrf { k } if !k.is_finite() || *k < 0.0 => {
            return Err(Error::Invalid(format!("the RRF constant k must be 0 or more, got {k}")));
        }
        Method::WeightedSum { weights, .. } if weights.len() != runs.len() => {
            return Err(Error::Invalid(format!(
                "{} weights for {} runs: give one weight per run",
                weights.len(),
                runs.len()
            )));
        }
        Method::WeightedSum { weights, .. } => {
            if let Some(bad) = weights.iter().find(|w| !w.is_finite()) {
                return Err(Error::Invalid(format!("weight {bad} is not a finite number")));
            }
        }
        Method::Rrf { .. } => {}
    }
    // Where each query sits in each run, queries in first-seen order over the runs.
    let mut slots: FxHashMap<&str, usize> = FxHashMap::default();
    let mut queries: Vec<(&str, Vec<Option<usize>>)> = Vec::new();
    for (r, (_, run)) in runs.iter().enumerate() {
        for (q, (qid, _)) in run.queries.iter().enumerate() {
            let slot = *slots.entry(qid).or_insert_with(|| {
                queries.push((qid, vec![None; runs.len()]));
                queries.len() - 1
            });
            queries[slot].1[r] = Some(q);
        }
    }
    let coverage = Coverage {
        queries: queries.len(),
        partial: queries.iter().filter(|(_, at)| at.iter().any(Option::is_none)).count(),
    };
    let mut fused = Vec::with_capacity(queries.len());
    for (qid, at) in queries {
        let mut scores: FxHashMap<&str, f64> = FxHashMap::default();
        for (r, q) in at.iter().enumerate() {
            let Some(q) = *q else { continue };
            let (path, run) = runs[r];
            let contributed = contributions(run, q, r, method, depth).ok_or_else(|| {
                Error::Invalid(format!(
                    "{}: query {qid}: its scores are too large to normalise (their mean or \
                     spread overflows)",
                    path.display()
                ))
            })?;
            for (docid, value) in contributed {
                *scores.entry(docid).or_insert(0.0) += value;
            }
        }
        // The sort below is a total order (doc ids are unique), so the map's order is lost.
        let mut docs: Vec<(&str, f64)> = scores.into_iter().collect();
        if let Some((docid, score)) = docs.iter().find(|(_, s)| !s.is_finite()) {
            return Err(Error::Invalid(format!(
                "query {qid}, document {docid}: the fused score is {score} (the inputs' scores \
                 or weights are too large to combine)"
            )));
        }
        docs.sort_unstable_by(trec_order);
        docs.truncate(k);
        fused.push((qid.to_string(), docs.into_iter().map(|(d, s)| (d.to_string(), s)).collect()));
    }
    Ok((fused, coverage))
}

/// What run `r` adds to each of its best `depth` documents for its query `q`. A weighted sum
/// normalises over all the documents the run has for the query, as pyserini rescores a whole
/// run before it cuts each to its depth. None where the normalisation overflows.
fn contributions<'a>(
    run: &'a Run,
    q: usize,
    r: usize,
    method: &Method,
    depth: usize,
) -> Option<Vec<(&'a str, f64)>> {
    let mut docs: Vec<(&str, f64)> = run.docs(q).collect();
    docs.sort_unstable_by(trec_order);
    Some(match method {
        Method::Rrf { k } => docs
            .iter()
            .take(depth)
            .enumerate()
            .map(|(i, &(d, _))| (d, 1.0 / (k + (i + 1) as f64)))
            .collect(),
        Method::WeightedSum { weights, normalization } => {
            normalize(&mut docs, *normalization)?;
            docs.iter().take(depth).map(|&(d, s)| (d, weights[r] * s)).collect()
        }
    })
}

/// Normalises one query's scores in one run, as ranx does; None where the shift or spread
/// overflows (scores near the largest f64: a spread of infinity made every score 0, and the
/// fused ranking followed the doc ids).
fn normalize(docs: &mut [(&str, f64)], normalization: Normalization) -> Option<()> {
    let n = docs.len() as f64;
    let (shift, spread) = match normalization {
        Normalization::None => return Some(()),
        Normalization::MinMax => {
            let min = docs.iter().map(|d| d.1).fold(f64::INFINITY, f64::min);
            let max = docs.iter().map(|d| d.1).fold(f64::NEG_INFINITY, f64::max);
            (min, max - min)
        }
        Normalization::Zmuv => {
            let mean = docs.iter().map(|d| d.1).sum::<f64>() / n;
            let var = docs.iter().map(|d| (d.1 - mean) * (d.1 - mean)).sum::<f64>() / n;
            (mean, var.sqrt())
        }
    };
    if !(shift.is_finite() && spread.is_finite()) {
        return None;
    }
    let spread = spread.max(MIN_SPREAD);
    for d in docs.iter_mut() {
        d.1 = (d.1 - shift) / spread;
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(text: &str) -> Run {
        Run::parse_str(text, "run").unwrap()
    }

    fn fused(runs: &[&Run], method: Method, k: usize) -> Fused {
        let named: Vec<(&Path, &Run)> = runs.iter().map(|r| (Path::new("r"), *r)).collect();
        fuse(&named, &method, usize::MAX, k).unwrap().0
    }

    /// Scores whose spread overflows f64 are refused, naming the run and query, for both
    /// normalisations (z-scores made every score 0 and ranked by doc id).
    #[test]
    fn scores_too_large_to_normalise_are_refused() {
        let huge = run("q d1 1e308\nq d2 -1e308\n");
        let other = run("q d1 1\nq d2 2\n");
        let named = [(Path::new("huge.tsv"), &huge), (Path::new("other.tsv"), &other)];
        for normalization in [Normalization::Zmuv, Normalization::MinMax] {
            let method = Method::WeightedSum { weights: vec![1.0, 1.0], normalization };
            let err = fuse(&named, &method, usize::MAX, 10).unwrap_err().to_string();
            assert!(err.contains("huge.tsv: query q: its scores are too large"), "{err}");
        }
    }

    #[test]
    fn rrf_sums_reciprocal_ranks_with_ties_ranked_as_trec_eval() {
        // Run a: d2 and d1 tie, so trec_eval ranks d2 (the larger id) first.
        let a = run("q d1 0.5\nq d2 0.5\nq d3 0.9\n");
        let b = run("q d1 3\nq d4 1\n");
        let got = fused(&[&a, &b], Method::Rrf { k: 1.0 }, 10);
        let want = |d: &str| match d {
            "d3" => 1.0 / 2.0,
            "d2" => 1.0 / 3.0,
            "d1" => 1.0 / 4.0 + 1.0 / 2.0,
            "d4" => 1.0 / 3.0,
            _ => unreachable!(),
        };
        let docs = &got[0].1;
        assert_eq!(docs.iter().map(|d| d.0.as_str()).collect::<Vec<_>>(), ["d1", "d3", "d4", "d2"]);
        for (d, s) in docs {
            assert!((s - want(d)).abs() < 1e-15, "{d}: {s}");
        }
    }

    #[test]
    fn weighted_sum_normalises_each_run_and_absent_documents_add_nothing() {
        let a = run("q d1 1\nq d2 3\nq d3 2\n");
        let b = run("q d1 -10\nq d4 10\n");
        let min_max =
            Method::WeightedSum { weights: vec![0.25, 0.75], normalization: Normalization::MinMax };
        let got: FxHashMap<String, f64> =
            fused(&[&a, &b], min_max, 10).remove(0).1.into_iter().collect();
        // a: d1 0, d2 1, d3 0.5; b: d1 0, d4 1.
        assert_eq!(got["d1"], 0.0);
        assert_eq!(got["d2"], 0.25);
        assert_eq!(got["d3"], 0.125);
        assert_eq!(got["d4"], 0.75);
        let zmuv =
            Method::WeightedSum { weights: vec![1.0, 1.0], normalization: Normalization::Zmuv };
        let got: FxHashMap<String, f64> =
            fused(&[&a, &b], zmuv, 10).remove(0).1.into_iter().collect();
        // a: mean 2, std sqrt(2/3); b: mean 0, std 10.
        let sd = (2.0f64 / 3.0).sqrt();
        assert!((got["d1"] - (-1.0 / sd - 1.0)).abs() < 1e-12);
        assert!((got["d3"] - 0.0).abs() < 1e-12);
        assert!((got["d4"] - 1.0).abs() < 1e-12);
    }

    #[test]
    fn queries_missing_from_a_run_are_fused_from_the_others_and_depth_cuts() {
        let a = run("q1 d1 1\nq1 d2 2\nq1 d3 3\n");
        let b = run("q2 d9 1\nq1 d1 5\n");
        let named = [(Path::new("a"), &a), (Path::new("b"), &b)];
        let (got, coverage) = fuse(&named, &Method::Rrf { k: 60.0 }, usize::MAX, 2).unwrap();
        assert_eq!(coverage, Coverage { queries: 2, partial: 1 });
        assert_eq!(got[0].0, "q1");
        assert_eq!(got[0].1.iter().map(|d| d.0.as_str()).collect::<Vec<_>>(), ["d1", "d3"]);
        assert_eq!(got[1], ("q2".to_string(), vec![("d9".to_string(), 1.0 / 61.0)]));
    }

    #[test]
    fn depth_reads_each_runs_best_documents_only() {
        // a ranks d3, d2, d1; b ranks d1. Depth 1 reads a's d3 and b's d1 only.
        let a = run("q d1 1\nq d2 2\nq d3 3\n");
        let b = run("q d1 5\n");
        let named = [(Path::new("a"), &a), (Path::new("b"), &b)];
        let (rrf, _) = fuse(&named, &Method::Rrf { k: 0.0 }, 1, 10).unwrap();
        assert_eq!(rrf[0].1, [("d3".to_string(), 1.0), ("d1".to_string(), 1.0)]);
        // A weighted sum normalises over the whole list, then reads the best `depth`: a's d3
        // is 1 after min-max over d1..d3, and d2 (0.5) is not read.
        let wsum =
            Method::WeightedSum { weights: vec![1.0, 0.5], normalization: Normalization::MinMax };
        let (got, _) = fuse(&named, &wsum, 1, 10).unwrap();
        assert_eq!(got[0].1, [("d3".to_string(), 1.0), ("d1".to_string(), 0.0)]);
        let (all, _) = fuse(&named, &wsum, usize::MAX, 10).unwrap();
        assert_eq!(all[0].1.len(), 3);
    }

    #[test]
    fn bad_input_is_refused_with_what_and_where() {
        let a = run("q d1 1\n");
        let one = [(Path::new("a.tsv"), &a)];
        let rrf = Method::Rrf { k: 60.0 };
        let msg = |r: Result<(Fused, Coverage)>| r.unwrap_err().to_string();
        assert_eq!(msg(fuse(&one, &rrf, usize::MAX, 10)), "fusion needs at least 2 runs, got 1");
        let ok = [(Path::new("a.tsv"), &a), (Path::new("c.tsv"), &a)];
        let weights =
            Method::WeightedSum { weights: vec![1.0], normalization: Normalization::None };
        assert_eq!(
            msg(fuse(&ok, &weights, usize::MAX, 10)),
            "1 weights for 2 runs: give one weight per run"
        );
        assert_eq!(
            msg(fuse(&ok, &Method::Rrf { k: -1.0 }, usize::MAX, 10)),
            "the RRF constant k must be 0 or more, got -1"
        );
        let weights = Method::WeightedSum {
            weights: vec![1.0, f64::NAN],
            normalization: Normalization::None,
        };
        assert_eq!(msg(fuse(&ok, &weights, usize::MAX, 10)), "weight NaN is not a finite number");
        let huge = run("q d1 1.7e308\n");
        let two = [(Path::new("a.tsv"), &huge), (Path::new("b.tsv"), &huge)];
        let sum =
            Method::WeightedSum { weights: vec![1.0, 1.0], normalization: Normalization::None };
        assert!(msg(fuse(&two, &sum, usize::MAX, 10)).starts_with("query q, document d1"));
    }
}
