//! `tevatron eval`: trec_eval-equal measures of a run against qrels.

use anyhow::{Context, Result};
use tevatron_ir::metrics::{evaluate, Measure};
use tevatron_ir::trec::{Qrels, Run};

use crate::args::EvalArgs;

pub fn run(a: &EvalArgs) -> Result<()> {
    let specs: Vec<String> = if a.metric.is_empty() {
        ["mrr@10", "ndcg@10", "recall@100", "recall@1000"].map(String::from).to_vec()
    } else {
        a.metric.clone()
    };
    let mut measures = Vec::new();
    for s in &specs {
        measures.extend(Measure::parse_list(s)?);
    }
    let qrels = Qrels::read(&a.qrels).context("reading --qrels")?;
    let run = Run::read(&a.run).context("reading --run")?;
    let judged: std::collections::HashSet<&str> =
        qrels.queries.iter().map(|(q, _)| q.as_str()).collect();
    if !run.queries.is_empty() && !run.queries.iter().any(|(q, _)| judged.contains(q.as_str())) {
        // Every measure would be 0 (or nothing averaged): most often ids that differ in form.
        tracing::warn!(
            "none of the {} queries of {} is judged in {}: check that the two name queries alike",
            run.queries.len(),
            a.run.display(),
            a.qrels.display()
        );
    }
    let result = evaluate(&run, &qrels, &measures, a.complete);
    let mut out = String::new();
    if a.json {
        let mut obj = serde_json::Map::new();
        for (n, v) in result.names.iter().zip(&result.means) {
            obj.insert(n.clone(), serde_json::json!(v));
        }
        if a.per_query {
            let mut per = serde_json::Map::new();
            for (q, vals) in &result.per_query {
                let m: serde_json::Map<String, serde_json::Value> = result
                    .names
                    .iter()
                    .zip(vals)
                    .map(|(n, v)| (n.clone(), serde_json::json!(v)))
                    .collect();
                per.insert(q.clone(), m.into());
            }
            obj.insert("per_query".into(), per.into());
        }
        out.push_str(&serde_json::to_string_pretty(&obj)?);
        out.push('\n');
    } else {
        let width = result.names.iter().map(String::len).max().unwrap_or(0).max(8);
        if a.per_query {
            for (q, vals) in &result.per_query {
                for (n, v) in result.names.iter().zip(vals) {
                    out.push_str(&format!("{n:<width$}\t{q}\t{v:.4}\n"));
                }
            }
        }
        let used = result.per_query.len();
        out.push_str(&format!("{:<width$}\tall\t{used}\n", "num_q"));
        for (n, v) in result.names.iter().zip(&result.means) {
            out.push_str(&format!("{n:<width$}\tall\t{v:.4}\n"));
        }
    }
    use std::io::Write;
    std::io::stdout().lock().write_all(out.as_bytes())?;
    Ok(())
}
