//! Validation during training (Hugging Face's `--eval_strategy`), of two kinds that may be
//! combined:
//!
//! - retrieval: the current weights encode the validation queries and corpus in eval mode,
//!   exactly as `tevatron encode` would encode a checkpoint (the same text rules, chunks and
//!   batches), the corpus is searched exactly as `tevatron search` does (through an embeddings
//!   file and the same search), and the run is scored with `tevatron eval`'s code: nDCG@10,
//!   MRR@10 and Recall@100. So a logged `eval_ndcg@10` equals `tevatron eval` on the saved
//!   checkpoint's run.
//! - reranking (a cross-encoder's run): the current weights score the top candidates of a
//!   first-stage run in eval mode, exactly as `tevatron rerank` scores a checkpoint (the same
//!   pair text, chunks and batches), and the reranked run is scored with `tevatron eval`'s
//!   code: nDCG@10 and MRR@10 (reranking leaves Recall@depth as the first stage had it). So a
//!   logged `eval_ndcg@10` equals `tevatron rerank` + `tevatron eval` on the checkpoint.
//! - loss: the contrastive loss of a training-format file in eval mode (no dropout), each
//!   query's group drawn as in the first epoch, in batches of `--per_device_eval_batch_size`
//!   queries with in-batch negatives; the mean over queries is logged as `eval_loss`, as
//!   Hugging Face's evaluation loop averages its batches' losses.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};
use tevatron_ir::metrics::{evaluate, Measure};
use tevatron_ir::records::{RecordKind, RecordStream, TextRecord};
use tevatron_ir::rerank::{PairFormat, RunPairs};
use tevatron_ir::search::search_shard;
use tevatron_ir::trec::{Qrels, Run};
use tevatron_ir::vectors::{truncate, VecDType, VectorWriter, Vectors};
use tevatron_model::encoder::{BatchOptions, EMBED_CHUNK};
use tevatron_model::{Encoder, TextOptions};

use crate::data::TrainData;
use crate::{Error, Result};

/// The retrieval measures logged at each evaluation, as `eval_<name>`.
pub const MEASURES: [&str; 3] = ["ndcg@10", "mrr@10", "recall@100"];

/// The reranking measures logged at each evaluation of a cross-encoder, as `eval_<name>`.
pub const RERANK_MEASURES: [&str; 2] = ["ndcg@10", "mrr@10"];

/// The loss measure, logged as `eval_loss`.
pub const LOSS: &str = "loss";

/// Search depth: enough for every logged measure.
const DEPTH: usize = 100;

/// Retrieval validation data: queries searched over a corpus and scored against qrels.
pub struct RetrievalData {
    /// Validation queries, read as `tevatron encode --encode_is_query` reads them.
    pub queries: Vec<TextRecord>,
    /// Validation corpus, read as `tevatron encode` reads it.
    pub corpus: Vec<TextRecord>,
    /// Their judgements.
    pub qrels: Qrels,
    /// Narrower widths measured too, each below the full width (Matryoshka training's
    /// `--matryoshka_dims`): the representations cut to each, re-normalised when the model
    /// normalises, as `search --truncate_dim` cuts them; logged as `dim<k>_<measure>`.
    pub widths: Vec<usize>,
}

/// What the name of a measure at a cut width `k` starts with: `dim96_ndcg@10`
/// (sentence-transformers' Matryoshka evaluation writes `dim_96_...`).
pub fn width_prefix(k: usize) -> String {
    format!("dim{k}_")
}

/// Reranking validation data: the candidates of a first-stage run, rescored by the
/// cross-encoder being trained and scored against qrels.
pub struct RerankData {
    /// Each query's top candidates with their texts (`tevatron rerank --run_path`'s pairs).
    pub pairs: RunPairs,
    /// Their judgements.
    pub qrels: Qrels,
    /// How a pair becomes input, as in training.
    pub format: PairFormat,
    /// Tevatron's pair format: the query prefix (unused for text pairs).
    pub query_prefix: String,
    /// Tevatron's pair format: the passage prefix (unused for text pairs).
    pub passage_prefix: String,
}

/// Loss validation data: training-format rows whose contrastive loss is measured.
pub struct LossData {
    /// The rows, with the training run's group size and sampling seed.
    pub data: TrainData,
    /// The training temperature.
    pub temperature: f64,
    /// Queries per batch (`--per_device_eval_batch_size`), each with its group.
    pub batch_queries: usize,
}

/// The validation data and settings of a run.
pub struct Validation {
    /// Evaluate every this many optimizer steps.
    pub every: usize,
    /// Retrieval measures (`--eval_query_path`, `--eval_corpus_path`, `--eval_qrels_path`).
    pub retrieval: Option<RetrievalData>,
    /// Reranking measures of a cross-encoder (`--eval_run_path` with the queries, corpus and
    /// qrels); the pairs are tokenized with `passage_text` and batched as `passage_batch`.
    pub rerank: Option<RerankData>,
    /// `eval_loss` (`--eval_dataset_path`).
    pub loss: Option<LossData>,
    /// Query tokenization (`--query_max_len`, `--query_prefix`, ...).
    pub query_text: TextOptions,
    /// Passage tokenization.
    pub passage_text: TextOptions,
    /// Query batches (`--per_device_eval_batch_size`, the token budget encode uses).
    pub query_batch: BatchOptions,
    /// Passage batches.
    pub passage_batch: BatchOptions,
    /// The measure that picks the best checkpoint (one of [`Validation::measures`]).
    pub metric: String,
    /// Whether a higher value of `metric` is better.
    pub greater_is_better: bool,
    /// Load the best checkpoint's weights before writing the final model.
    pub load_best_model_at_end: bool,
}

impl std::fmt::Debug for Validation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Validation")
            .field("every", &self.every)
            .field("retrieval", &self.retrieval.as_ref().map(|r| (r.queries.len(), r.corpus.len())))
            .field("rerank", &self.rerank.as_ref().map(|r| r.pairs.len()))
            .field("loss", &self.loss.as_ref().map(|l| l.data.len()))
            .field("metric", &self.metric)
            .field("greater_is_better", &self.greater_is_better)
            .field("load_best_model_at_end", &self.load_best_model_at_end)
            .finish()
    }
}

/// Reads JSONL records of `kind` (queries or corpus), as `tevatron encode` does.
pub fn read_records(path: &Path, kind: RecordKind) -> Result<Vec<TextRecord>> {
    let records: Vec<TextRecord> = RecordStream::open(vec![path.to_path_buf()], kind)
        .collect::<std::result::Result<_, _>>()?;
    if records.is_empty() {
        return Err(Error::Invalid(format!("{}: no records", path.display())));
    }
    Ok(records)
}

impl Validation {
    /// Whether `value` beats `best` under `greater_is_better`.
    pub fn improves(&self, value: f64, best: Option<f64>) -> bool {
        improves(value, best, self.greater_is_better)
    }

    /// The measures this validation logs (without `eval_`): the retrieval ones when it has
    /// retrieval data, the reranking ones when it has a run to rerank, `loss` when it has loss
    /// data.
    pub fn measures(&self) -> Vec<String> {
        let mut m: Vec<String> = Vec::new();
        if let Some(r) = &self.retrieval {
            m.extend(MEASURES.map(String::from));
            for &k in &r.widths {
                m.extend(MEASURES.map(|name| format!("{}{name}", width_prefix(k))));
            }
        }
        if self.rerank.is_some() {
            m.extend(RERANK_MEASURES.map(String::from));
        }
        if self.loss.is_some() {
            m.push(LOSS.into());
        }
        m
    }

    /// Measures the encoder's current weights; returns `eval_<measure>` values and
    /// `eval_runtime`. `scratch` is a folder for the temporary embeddings file.
    pub fn evaluate(&self, encoder: &Encoder, scratch: &Path) -> Result<BTreeMap<String, f64>> {
        let start = Instant::now();
        let mut out = BTreeMap::new();
        if let Some(r) = &self.retrieval {
            out.extend(self.retrieval_measures(r, encoder, scratch)?);
        }
        if let Some(r) = &self.rerank {
            out.extend(self.rerank_measures(r, encoder)?);
        }
        if let Some(l) = &self.loss {
            out.insert("eval_loss".into(), self.loss_of(l, encoder)?);
        }
        out.insert("eval_runtime".into(), start.elapsed().as_secs_f64());
        Ok(out)
    }

    /// Encodes, searches and scores as `encode`, `search` and `eval` would: at the full width,
    /// and at each narrower width of `r.widths`.
    fn retrieval_measures(
        &self,
        r: &RetrievalData,
        encoder: &Encoder,
        scratch: &Path,
    ) -> Result<BTreeMap<String, f64>> {
        let q = embed(encoder, &r.queries, &self.query_text, &self.query_batch)?;
        let p = embed(encoder, &r.corpus, &self.passage_text, &self.passage_batch)?;
        let dim = encoder.output_width();
        let mut out = search_and_score(r, &q, &p, dim, "", scratch)?;
        for &k in &r.widths {
            let cut = |rows: &[f32]| truncate(rows, dim, k, encoder.normalize());
            out.extend(search_and_score(r, &cut(&q), &cut(&p), k, &width_prefix(k), scratch)?);
        }
        Ok(out)
    }

    /// Scores each candidate pair as `tevatron rerank` would (chunks of [`EMBED_CHUNK`] pairs,
    /// each cut into the same batches) and scores the reranked run as `eval` would.
    fn rerank_measures(&self, r: &RerankData, encoder: &Encoder) -> Result<BTreeMap<String, f64>> {
        let tokenizer = encoder.tokenizer().prepare(&self.passage_text)?;
        let mut run = String::new();
        for start in (0..r.pairs.len()).step_by(EMBED_CHUNK) {
            let chunk = r.pairs.get(start..(start + EMBED_CHUNK).min(r.pairs.len()));
            let prefixes = (r.query_prefix.as_str(), r.passage_prefix.as_str());
            let pairs = chunk.iter().map(|p| (p.query.as_str(), p.title.as_str(), p.text.as_str()));
            let (ids, types) = tokenizer.tokenize_cross(r.format, prefixes, pairs)?;
            let scores = encoder.embed_typed(&ids, types.as_deref(), &self.passage_batch)?;
            // The run as `tevatron rerank` writes it, scores formatted alike.
            for (p, score) in chunk.iter().zip(scores) {
                if score.is_nan() {
                    // `tevatron rerank` refuses to write such a run.
                    return Err(Error::Invalid(format!(
                        "validation: the reranker's score of query {}, passage {} is NaN; \
                         training has diverged (try a lower --learning_rate)",
                        p.query_id, p.docid
                    )));
                }
                run += &format!("{}\t{}\t{score:?}\n", p.query_id, p.docid);
            }
        }
        score_run(&run, &r.qrels, &RERANK_MEASURES, "")
    }

    /// The mean contrastive loss over the loss data's queries, in eval mode.
    fn loss_of(&self, l: &LossData, encoder: &Encoder) -> Result<f64> {
        let queries = encoder.tokenizer().prepare(&self.query_text)?;
        let passages = encoder.tokenizer().prepare(&self.passage_text)?;
        let dim = encoder.output_width();
        let items: Vec<usize> = (0..l.data.len()).collect();
        let (mut total, mut count) = (0.0f64, 0usize);
        for batch in items.chunks(l.batch_queries.max(1)) {
            let (mut qt, mut pt) = (Vec::new(), Vec::new());
            for &item in batch {
                let g = l.data.group(item, 0)?;
                pt.extend(g.joined());
                qt.push(g.query);
            }
            let q = encoder.embed_sequences(&queries.tokenize(&qt)?, &self.query_batch)?;
            let p = encoder.embed_sequences(&passages.tokenize(&pt)?, &self.passage_batch)?;
            let q = Tensor::from_vec(q, (qt.len(), dim), &Device::Cpu)?;
            let p = Tensor::from_vec(p, (pt.len(), dim), &Device::Cpu)?;
            let loss = crate::loss::contrastive(&q, &p, l.temperature)?.to_scalar::<f32>()?;
            total += f64::from(loss) * batch.len() as f64;
            count += batch.len();
        }
        Ok(total / count.max(1) as f64)
    }
}

/// Searches `dim`-wide query rows `q` over corpus rows `p` (through a temporary embeddings
/// file in `scratch`, as `tevatron search` reads one) and scores the run as `eval` would, each
/// measure named `eval_<prefix><measure>`.
fn search_and_score(
    r: &RetrievalData,
    q: &[f32],
    p: &[f32],
    dim: usize,
    prefix: &str,
    scratch: &Path,
) -> Result<BTreeMap<String, f64>> {
    let file = scratch.join(".eval-corpus.tmp.safetensors");
    let written = (|| -> Result<String> {
        let mut w = VectorWriter::create(&file, dim, VecDType::F32, BTreeMap::new())?;
        let ids: Vec<&str> = r.corpus.iter().map(|r| r.id.as_str()).collect();
        w.push(p, &ids)?;
        w.finish()?;
        let shard = Vectors::open(&file)?;
        let hits = search_shard(q, dim, &shard, DEPTH, 0)?;
        // The run as `tevatron search --save_text` writes it, scores formatted alike.
        let mut run = String::new();
        for (query, hits) in r.queries.iter().zip(&hits) {
            for (score, row) in hits {
                run += &format!("{}\t{}\t{score:?}\n", query.id, shard.ids().get(*row as usize));
            }
        }
        Ok(run)
    })();
    let _ = std::fs::remove_file(&file);
    score_run(&written?, &r.qrels, &MEASURES, prefix)
}

/// `tevatron eval`'s `measures` of a run in text form, as `eval_<prefix><measure>` values.
fn score_run(
    run: &str,
    qrels: &Qrels,
    measures: &[&str],
    prefix: &str,
) -> Result<BTreeMap<String, f64>> {
    let run = Run::parse_str(run, PathBuf::from("(validation run)"))?;
    let measures: Vec<Measure> =
        measures.iter().map(|m| Measure::parse(m)).collect::<std::result::Result<_, _>>()?;
    let result = evaluate(&run, qrels, &measures, false);
    Ok(result
        .names
        .iter()
        .zip(&result.means)
        .map(|(n, v)| (format!("eval_{prefix}{n}"), *v))
        .collect())
}

/// Hugging Face's rule for a new best metric: better than the best so far (any finite value
/// when there is none); a value that is not a number never becomes the best (Hugging Face
/// starts from -inf or +inf and compares with greater or less).
fn improves(value: f64, best: Option<f64>, greater_is_better: bool) -> bool {
    if !value.is_finite() {
        return false;
    }
    match best {
        None => true,
        Some(b) if greater_is_better => value > b,
        Some(b) => value < b,
    }
}

/// Embeds records in chunks of [`EMBED_CHUNK`], as `tevatron encode` does, so the batches and
/// thus the vectors are the same.
fn embed(
    encoder: &Encoder,
    records: &[TextRecord],
    text: &TextOptions,
    batch: &BatchOptions,
) -> Result<Vec<f32>> {
    let tokenizer = encoder.tokenizer().prepare(text)?;
    let mut out = Vec::with_capacity(records.len() * encoder.output_width());
    for chunk in records.chunks(EMBED_CHUNK) {
        let texts: Vec<String> = chunk.iter().map(|r| r.text.clone()).collect();
        let seqs = tokenizer.tokenize(&texts)?;
        out.extend(encoder.embed_sequences(&seqs, batch)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::improves;

    #[test]
    fn a_nan_never_becomes_the_best_and_ties_do_not_improve() {
        assert!(improves(0.5, None, true));
        assert!(!improves(f64::NAN, None, true));
        assert!(!improves(f64::NAN, Some(0.5), false));
        assert!(!improves(f64::INFINITY, Some(0.5), true));
        assert!(improves(0.6, Some(0.5), true) && !improves(0.5, Some(0.5), true));
        assert!(improves(0.4, Some(0.5), false) && !improves(0.6, Some(0.5), false));
    }
}
