//! `tevatron annotate`: a reranker (the teacher) scores every passage of a training file and
//! the rows are written back with each passage's `score`, as Tevatron's
//! `utils.annotate_with_teacher` does for its distillation data, each pair given to the model as
//! `tevatron rerank` gives it (`--pair_format`). The output is Tevatron's inline
//! training form (`query`, `positive_passages`, `negative_passages`, each passage with `docid`,
//! `title`, `text` and `score`), which `tevatron train --distillation` and Tevatron's
//! `DistilTrainDataset` read.

use std::io::Write;

use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};
use tevatron_ir::atomic::AtomicFile;
use tevatron_ir::rerank::RerankPair;
use tevatron_train::data::{Corpus, FullRow, Passage, TrainData};

use super::rerank::{load_reranker, PairInput};
use crate::args::AnnotateArgs;
use crate::progress;

/// Rows scored together: enough pairs for length-sorted batches, few enough to stream.
const ROWS_PER_CHUNK: usize = 64;

/// An f32 score as JSON in its shortest decimal form (`3.1`, not the f64 widening
/// `3.0999999046325684`).
fn shortest(score: f32) -> Value {
    format!("{score}")
        .parse::<f64>()
        .ok()
        .and_then(serde_json::Number::from_f64)
        .map_or(Value::Null, Value::Number)
}

/// A passage as the annotated row holds it; with `titled`, a passage without a title gets an
/// empty one, so that every passage of the file has the same keys (Hugging Face `datasets`
/// gives a missing key `None` when others have it, and Tevatron's distillation dataset then
/// joins `None` to the text and fails).
fn passage_json(p: &Passage, score: f32, titled: bool) -> Value {
    let mut m = Map::new();
    if let Some(d) = &p.docid {
        m.insert("docid".into(), d.clone().into());
    }
    match &p.title {
        Some(t) => {
            m.insert("title".into(), t.clone().into());
        }
        None if titled => {
            m.insert("title".into(), "".into());
        }
        None => {}
    }
    m.insert("text".into(), p.text.clone().into());
    m.insert("score".into(), shortest(score));
    Value::Object(m)
}

/// Runs `tevatron annotate`.
pub fn run(a: &AnnotateArgs) -> Result<()> {
    crate::tune_allocator();
    let (enc, batches) = load_reranker(&a.model)?;
    let files = a.data.files().context("resolving the training data")?;
    let cache = super::train::index_cache(a.data.dataset_cache_dir.as_deref());
    let corpus = match a.corpus.files(a.data.dataset_cache_dir.as_deref())? {
        Some(files) => {
            // The training file may be annotated in place; the corpus may not be written over.
            tevatron_ir::atomic::refuse_input_as_output(&a.output_path, &files, "--output_path")?;
            Some(std::sync::Arc::new(Corpus::open(&files, &cache)?))
        }
        None => None,
    };
    // Group size 1: every row is read whole, negatives or not.
    let data = TrainData::open(&files, corpus, &cache, 1, 0)?;
    let input = PairInput::new(&a.model, &enc)?;
    let keep = a.max_negatives.unwrap_or(usize::MAX);
    // Whether any passage kept has a title: then every passage written gets the key.
    let mut titled = false;
    for i in 0..data.len() {
        let r = data.full_row(i)?;
        let kept = r.positives.iter().chain(r.negatives.iter().take(keep));
        if kept.into_iter().any(|p| p.title.is_some()) {
            titled = true;
            break;
        }
    }
    if keep == 0 {
        tracing::warn!(
            "--max_negatives 0 keeps no negative: each row is written with its positives' \
             scores only, from which `train --distillation` learns nothing against negatives"
        );
    }
    let bar = progress::bar(Some(data.len() as u64), "rows", a.quiet);
    let mut log = progress::LogProgress::new(data.len(), "rows", a.quiet);
    let mut out = AtomicFile::create(&a.output_path)?;
    let (mut pairs_done, start) = (0usize, std::time::Instant::now());
    for first in (0..data.len()).step_by(ROWS_PER_CHUNK) {
        let items = first..(first + ROWS_PER_CHUNK).min(data.len());
        let mut rows: Vec<FullRow> =
            items.clone().map(|i| data.full_row(i)).collect::<std::result::Result<_, _>>()?;
        for r in &mut rows {
            r.negatives.truncate(keep);
        }
        let pairs: Vec<RerankPair> = rows
            .iter()
            .flat_map(|r| {
                r.positives.iter().chain(&r.negatives).map(|p| RerankPair {
                    query_id: r.query_id.clone().unwrap_or_default(),
                    docid: p.docid.clone().unwrap_or_default(),
                    query: r.query.clone(),
                    title: p.title.clone().unwrap_or_default(),
                    text: p.text.clone(),
                })
            })
            .collect();
        let (ids, types) = input.tokenize(&pairs)?;
        let scores = enc.embed_typed(&ids, types.as_deref(), &batches)?;
        let mut at = scores.iter().copied();
        for (item, r) in items.clone().zip(&rows) {
            let mut scored = |list: &[Passage]| -> Result<Vec<Value>> {
                list.iter()
                    .map(|p| {
                        let s = at.next().unwrap_or(f32::NAN);
                        if !s.is_finite() {
                            let (path, line) = data.location(item);
                            bail!(
                                "{}:{line}: the teacher's score of a passage is {s}",
                                path.display()
                            );
                        }
                        Ok(passage_json(p, s, titled))
                    })
                    .collect()
            };
            let mut row = Map::new();
            if let Some(q) = &r.query_id {
                row.insert("query_id".into(), q.clone().into());
            }
            row.insert("query".into(), r.query.clone().into());
            row.insert("positive_passages".into(), scored(&r.positives)?.into());
            row.insert("negative_passages".into(), scored(&r.negatives)?.into());
            writeln!(out.writer(), "{}", Value::Object(row)).map_err(|e| out.err(e))?;
        }
        pairs_done += pairs.len();
        bar.inc(rows.len() as u64);
        log.advance(rows.len());
    }
    bar.finish_and_clear();
    out.commit()?;
    let secs = start.elapsed().as_secs_f64();
    tracing::info!(
        "scored {pairs_done} passages of {} rows in {secs:.1} s ({:.1} pairs/s) into {}",
        data.len(),
        pairs_done as f64 / secs.max(1e-9),
        a.output_path.display()
    );
    Ok(())
}
