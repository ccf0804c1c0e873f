//! Retrieval metrics with the semantics of trec_eval 9 / pytrec_eval.
//!
//! Each query's documents are ordered by score descending, then doc id descending (trec_eval's
//! `comp_sim_docno`); the rank column and line order of the run play no part. A document is
//! relevant when its judgement is at least 1; nDCG uses the judgement as a graded gain.
//! Means are taken over the queries that are in both the run and the qrels, or, with
//! `complete` (trec_eval `-c`), over every judged query, counting a missing one as 0.
//! This module knows nothing of file formats: it takes a [`Run`] and [`Qrels`].

use std::cmp::Ordering;

use rayon::prelude::*;

use crate::fxhash::FxHashMap;
use crate::trec::{Qrels, Run};
use crate::{Error, Result};

/// What a measure computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MeasureKind {
    /// Reciprocal rank of the first relevant document, on the run cut to `k` if given.
    RecipRank(Option<usize>),
    /// nDCG at a cut-off (`ndcg_cut.k`), or over the whole ranking (`ndcg`).
    Ndcg(Option<usize>),
    /// Fraction of relevant documents retrieved in the top `k`.
    Recall(usize),
    /// Fraction of the top `k` that is relevant (divided by `k` even if fewer were retrieved).
    Precision(usize),
    /// Mean average precision, over the whole ranking or cut at `k` (`map_cut.k`).
    Map(Option<usize>),
}

/// A measure and the name the user gave it (used as the key of the output).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Measure {
    /// The name as written by the user.
    pub name: String,
    /// What it computes.
    pub kind: MeasureKind,
}

/// trec_eval's cut-offs for a cut-off measure named without one (its `-m ndcg_cut`).
const TREC_EVAL_CUTOFFS: [usize; 9] = [5, 10, 15, 20, 30, 100, 200, 500, 1000];

fn cutoff(name: &str, k: &str) -> Result<usize> {
    match k.parse::<usize>() {
        Ok(k) if k > 0 => Ok(k),
        _ => Err(Error::Invalid(format!(
            "measure {name:?}: cut-off {k:?} is not a positive integer"
        ))),
    }
}

impl Measure {
    /// Parses one measure: `mrr@K`, `ndcg@K`, `recall@K`, `p@K`, `map`, `map@K`, or the
    /// trec_eval spellings `recip_rank`, `ndcg`, `ndcg_cut.K`, `recall.K`, `P.K`, `map_cut.K`
    /// (also with `_` before the number, as trec_eval prints them).
    pub fn parse(name: &str) -> Result<Measure> {
        let unknown = || {
            Error::Invalid(format!(
                "unknown measure {name:?}; use mrr@K, ndcg@K, recall@K, p@K, map, map@K, \
                 recip_rank, ndcg, ndcg_cut.K, recall.K, P.K or map_cut.K"
            ))
        };
        let (base, k) = match name.find(['@', '.']) {
            Some(i) => (&name[..i], Some(&name[i + 1..])),
            None => match name.rfind('_') {
                Some(i)
                    if name[i + 1..].chars().all(|c| c.is_ascii_digit()) && i + 1 < name.len() =>
                {
                    (&name[..i], Some(&name[i + 1..]))
                }
                _ => (name, None),
            },
        };
        let k = k.map(|k| cutoff(name, k)).transpose()?;
        let kind = match (base.to_ascii_lowercase().as_str(), k) {
            ("mrr" | "recip_rank", k) => MeasureKind::RecipRank(k),
            ("ndcg", k) | ("ndcg_cut", k @ Some(_)) => MeasureKind::Ndcg(k),
            ("recall", Some(k)) => MeasureKind::Recall(k),
            ("p" | "precision", Some(k)) => MeasureKind::Precision(k),
            ("map", k) | ("map_cut", k @ Some(_)) => MeasureKind::Map(k),
            _ => return Err(unknown()),
        };
        Ok(Measure { name: name.to_string(), kind })
    }

    /// Parses a `-m` value, which may list several cut-offs as trec_eval allows
    /// (`recall.5,100` gives `recall.5` and `recall.100`); a cut-off measure named bare
    /// (`ndcg_cut`, `map_cut`, `P`, `recall`) takes trec_eval's default cut-offs, named as
    /// trec_eval prints them (`ndcg_cut_5`, ...).
    pub fn parse_list(spec: &str) -> Result<Vec<Measure>> {
        if ["ndcg_cut", "map_cut", "P", "recall"].contains(&spec) {
            return TREC_EVAL_CUTOFFS
                .iter()
                .map(|k| Measure::parse(&format!("{spec}_{k}")))
                .collect();
        }
        let mut parts = spec.split(',');
        let first = parts.next().unwrap_or_default();
        let mut out = vec![Measure::parse(first)?];
        let stem = match first.find(['@', '.']) {
            Some(i) => &first[..=i],
            None => {
                return if spec.contains(',') {
                    Err(Error::Invalid(format!(
                        "measure {spec:?}: a list of cut-offs needs a base like recall.5,100"
                    )))
                } else {
                    Ok(out)
                }
            }
        };
        for k in parts {
            out.push(Measure::parse(&format!("{stem}{k}"))?);
        }
        Ok(out)
    }
}

/// trec_eval's order: score descending, then doc id descending. trec_eval holds a score in
/// single precision (`float sim`, as pytrec_eval passes it too), so scores equal as f32 tie.
pub fn trec_order<S: AsRef<str>>(a: &(S, f64), b: &(S, f64)) -> Ordering {
    let (a32, b32) = (a.1 as f32, b.1 as f32);
    b32.partial_cmp(&a32).unwrap_or(Ordering::Equal).then_with(|| b.0.as_ref().cmp(a.0.as_ref()))
}

/// Computes one measure for one query, given relevance of the ranked list (best first) and the
/// query's judgements.
fn measure_query(kind: MeasureKind, ranked_rel: &[i64], judged: &FxHashMap<String, i64>) -> f64 {
    let num_rel = judged.values().filter(|&&r| r >= 1).count();
    let cut = |k: Option<usize>| k.map_or(ranked_rel.len(), |k| k.min(ranked_rel.len()));
    match kind {
        MeasureKind::RecipRank(k) => {
            ranked_rel[..cut(k)].iter().position(|&r| r >= 1).map_or(0.0, |i| 1.0 / (i + 1) as f64)
        }
        MeasureKind::Precision(k) => {
            ranked_rel[..cut(Some(k))].iter().filter(|&&r| r >= 1).count() as f64 / k as f64
        }
        MeasureKind::Recall(k) => {
            if num_rel == 0 {
                return 0.0;
            }
            ranked_rel[..cut(Some(k))].iter().filter(|&&r| r >= 1).count() as f64 / num_rel as f64
        }
        MeasureKind::Map(k) => {
            if num_rel == 0 {
                return 0.0;
            }
            let mut found = 0usize;
            let mut sum = 0.0;
            for (i, &r) in ranked_rel[..cut(k)].iter().enumerate() {
                if r >= 1 {
                    found += 1;
                    sum += found as f64 / (i + 1) as f64;
                }
            }
            sum / num_rel as f64
        }
        MeasureKind::Ndcg(k) => {
            let dcg: f64 = ranked_rel[..cut(k)]
                .iter()
                .enumerate()
                .filter(|(_, &r)| r > 0)
                .map(|(i, &r)| r as f64 / ((i + 2) as f64).log2())
                .sum();
            let mut gains: Vec<i64> = judged.values().copied().filter(|&r| r > 0).collect();
            gains.sort_unstable_by(|a, b| b.cmp(a));
            let ideal_len = k.map_or(gains.len(), |k| k.min(gains.len()));
            let idcg: f64 = gains[..ideal_len]
                .iter()
                .enumerate()
                .map(|(i, &r)| r as f64 / ((i + 2) as f64).log2())
                .sum();
            if idcg > 0.0 {
                dcg / idcg
            } else {
                0.0
            }
        }
    }
}

/// The result of [`evaluate`].
#[derive(Clone, Debug, PartialEq)]
pub struct Evaluation {
    /// Measure names, in the order asked.
    pub names: Vec<String>,
    /// Mean of each measure.
    pub means: Vec<f64>,
    /// Per-query values, in run order (then, with `complete`, judged queries missing from the run).
    pub per_query: Vec<(String, Vec<f64>)>,
}

/// Evaluates `run` against `qrels` on every measure.
pub fn evaluate(run: &Run, qrels: &Qrels, measures: &[Measure], complete: bool) -> Evaluation {
    let judged: FxHashMap<&str, &FxHashMap<String, i64>> =
        qrels.queries.iter().map(|(q, j)| (q.as_str(), j)).collect();
    let mut per_query = Vec::new();
    // Queries are independent: evaluate them on all cores, keeping run order.
    let evaluated: Vec<Option<(String, Vec<f64>)>> = run
        .queries
        .par_iter()
        .enumerate()
        .map(|(i, (qid, _))| {
            let j = judged.get(qid.as_str())?;
            let mut ranked: Vec<(&str, f64)> = run.docs(i).collect();
            // Doc ids are unique per query, so the order is total and an unstable sort is exact.
            ranked.sort_unstable_by(trec_order);
            let rels: Vec<i64> =
                ranked.iter().map(|(d, _)| j.get(*d).copied().unwrap_or(0)).collect();
            let values: Vec<f64> =
                // `+ 0.0`: an empty sum is -0.0 in Rust; trec_eval prints 0.
                measures.iter().map(|m| measure_query(m.kind, &rels, j) + 0.0).collect();
            Some((qid.clone(), values))
        })
        .collect();
    for (qid, values) in evaluated.into_iter().flatten() {
        per_query.push((qid, values));
    }
    let mut denominator = per_query.len();
    if complete {
        let in_run: std::collections::HashSet<&str> =
            run.queries.iter().map(|(q, _)| q.as_str()).collect();
        for (qid, j) in &qrels.queries {
            if !in_run.contains(qid.as_str()) {
                let values: Vec<f64> =
                    measures.iter().map(|m| measure_query(m.kind, &[], j) + 0.0).collect();
                per_query.push((qid.clone(), values));
            }
        }
        denominator = qrels.queries.len();
    }
    let means = (0..measures.len())
        .map(|i| {
            if denominator == 0 {
                0.0
            } else {
                per_query.iter().map(|(_, v)| v[i]).sum::<f64>() / denominator as f64
            }
        })
        .collect();
    Evaluation { names: measures.iter().map(|m| m.name.clone()).collect(), means, per_query }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eval1(run: &str, qrels: &str, m: &str) -> f64 {
        let run = Run::parse_str(run, "r").unwrap();
        let qrels = Qrels::parse_str(qrels, "q").unwrap();
        evaluate(&run, &qrels, &[Measure::parse(m).unwrap()], false).means[0]
    }

    #[test]
    fn measures_parse_in_both_spellings() {
        use MeasureKind::*;
        for (s, k) in [
            ("mrr@10", RecipRank(Some(10))),
            ("recip_rank", RecipRank(None)),
            ("ndcg@10", Ndcg(Some(10))),
            ("ndcg_cut.10", Ndcg(Some(10))),
            ("ndcg_cut_10", Ndcg(Some(10))),
            ("recall.100", Recall(100)),
            ("P.10", Precision(10)),
            ("p@5", Precision(5)),
            ("map", Map(None)),
            ("map_cut.100", Map(Some(100))),
        ] {
            assert_eq!(Measure::parse(s).unwrap().kind, k, "{s}");
        }
        let e = |name: &str| Measure::parse(name).unwrap_err().to_string();
        assert!(e("bpref").starts_with("unknown measure \"bpref\"; use mrr@K"), "{}", e("bpref"));
        assert_eq!(e("recall@0"), "measure \"recall@0\": cut-off \"0\" is not a positive integer");
        let names: Vec<String> =
            Measure::parse_list("recall.5,100").unwrap().into_iter().map(|m| m.name).collect();
        assert_eq!(names, ["recall.5", "recall.100"]);
        // Named bare, trec_eval's default cut-offs (pytrec_eval's ndcg_cut_5 ... ndcg_cut_1000).
        let bare = Measure::parse_list("ndcg_cut").unwrap();
        assert_eq!(bare.len(), 9);
        assert_eq!((bare[0].name.as_str(), bare[0].kind), ("ndcg_cut_5", Ndcg(Some(5))));
        assert_eq!(bare[8].kind, Ndcg(Some(1000)));
        assert_eq!(Measure::parse_list("P").unwrap()[1].kind, Precision(10));
    }

    #[test]
    fn ties_break_by_docid_descending() {
        // Both at score 1: d2 ranks before d10? No: "d2" > "d10" as strings, so d2 first.
        assert_eq!(eval1("q d10 1\nq d2 1\n", "q 0 d2 1\n", "mrr@1"), 1.0);
        assert_eq!(eval1("q d10 1\nq d2 1\n", "q 0 d10 1\n", "mrr@1"), 0.0);
        // Scores equal in single precision tie, as trec_eval holds them (pytrec_eval gives 1).
        assert_eq!(eval1("q a 0.300000001\nq b 0.3\n", "q 0 b 1\n", "mrr@1"), 1.0);
        assert_eq!(eval1("q a 0.30001\nq b 0.3\n", "q 0 b 1\n", "mrr@1"), 0.0);
    }

    #[test]
    fn ndcg_graded_by_hand() {
        // ranking: d1 (rel 2), d2 (rel 0), d3 (rel 1); ideal: 2, 1
        let dcg = 2.0 + 1.0 / 4f64.log2();
        let idcg = 2.0 + 1.0 / 3f64.log2();
        let got = eval1("q d1 3\nq d2 2\nq d3 1\n", "q 0 d1 2\nq 0 d2 0\nq 0 d3 1\n", "ndcg@10");
        assert!((got - dcg / idcg).abs() < 1e-12);
    }
}
