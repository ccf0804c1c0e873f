//! Validation during training (Hugging Face's `--eval_strategy`): at each evaluation the
//! current weights encode the validation queries and corpus in eval mode, exactly as
//! `tevatron encode` would encode a checkpoint (the same text rules, chunks and batches), the
//! corpus is searched exactly as `tevatron search` does (through an embeddings file and the
//! same search), and the run is scored with `tevatron eval`'s code: nDCG@10, MRR@10 and
//! Recall@100. So a logged `eval_ndcg@10` equals `tevatron eval` on the saved checkpoint's run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use tevatron_ir::metrics::{evaluate, Measure};
use tevatron_ir::records::{RecordKind, RecordStream, TextRecord};
use tevatron_ir::search::search_shard;
use tevatron_ir::trec::{Qrels, Run};
use tevatron_ir::vectors::{VecDType, VectorWriter, Vectors};
use tevatron_model::encoder::{BatchOptions, EMBED_CHUNK};
use tevatron_model::{Encoder, TextOptions};

use crate::{Error, Result};

/// The measures logged at each evaluation, as `eval_<name>`.
pub const MEASURES: [&str; 3] = ["ndcg@10", "mrr@10", "recall@100"];

/// Search depth: enough for every logged measure.
const DEPTH: usize = 100;

/// The validation data and settings of a run.
pub struct Validation {
    /// Evaluate every this many optimizer steps.
    pub every: usize,
    /// Validation queries, read as `tevatron encode --encode_is_query` reads them.
    pub queries: Vec<TextRecord>,
    /// Validation corpus, read as `tevatron encode` reads it.
    pub corpus: Vec<TextRecord>,
    /// Their judgements.
    pub qrels: Qrels,
    /// Query tokenization (`--query_max_len`, `--query_prefix`, ...).
    pub query_text: TextOptions,
    /// Passage tokenization.
    pub passage_text: TextOptions,
    /// Query batches (`--per_device_eval_batch_size`, the token budget encode uses).
    pub query_batch: BatchOptions,
    /// Passage batches.
    pub passage_batch: BatchOptions,
    /// The measure that picks the best checkpoint (one of [`MEASURES`]).
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
            .field("queries", &self.queries.len())
            .field("corpus", &self.corpus.len())
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
        match best {
            None => true,
            Some(b) if self.greater_is_better => value > b,
            Some(b) => value < b,
        }
    }

    /// Encodes, searches and scores with the encoder's current weights; returns
    /// `eval_<measure>` values and `eval_runtime`. `scratch` is a folder for the temporary
    /// embeddings file.
    pub fn evaluate(&self, encoder: &Encoder, scratch: &Path) -> Result<BTreeMap<String, f64>> {
        let start = Instant::now();
        let q = embed(encoder, &self.queries, &self.query_text, &self.query_batch)?;
        let p = embed(encoder, &self.corpus, &self.passage_text, &self.passage_batch)?;
        let dim = encoder.hidden_size();
        let file = scratch.join(".eval-corpus.tmp.safetensors");
        let written = (|| -> Result<String> {
            let mut w = VectorWriter::create(&file, dim, VecDType::F32, BTreeMap::new())?;
            let ids: Vec<&str> = self.corpus.iter().map(|r| r.id.as_str()).collect();
            w.push(&p, &ids)?;
            w.finish()?;
            let shard = Vectors::open(&file)?;
            let hits = search_shard(&q, dim, &shard, DEPTH, 0)?;
            // The run as `tevatron search --save_text` writes it, scores formatted alike.
            let mut run = String::new();
            for (query, hits) in self.queries.iter().zip(&hits) {
                for (score, row) in hits {
                    run +=
                        &format!("{}\t{}\t{score:?}\n", query.id, shard.ids().get(*row as usize));
                }
            }
            Ok(run)
        })();
        let _ = std::fs::remove_file(&file);
        let run = Run::parse_str(&written?, PathBuf::from("(validation run)"))?;
        let measures: Vec<Measure> =
            MEASURES.iter().map(|m| Measure::parse(m)).collect::<std::result::Result<_, _>>()?;
        let result = evaluate(&run, &self.qrels, &measures, false);
        let mut out: BTreeMap<String, f64> = result
            .names
            .iter()
            .zip(&result.means)
            .map(|(n, v)| (format!("eval_{n}"), *v))
            .collect();
        out.insert("eval_runtime".into(), start.elapsed().as_secs_f64());
        Ok(out)
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
    let mut out = Vec::with_capacity(records.len() * encoder.hidden_size());
    for chunk in records.chunks(EMBED_CHUNK) {
        let texts: Vec<String> = chunk.iter().map(|r| r.text.clone()).collect();
        let seqs = tokenizer.tokenize(&texts)?;
        out.extend(encoder.embed_sequences(&seqs, batch)?);
    }
    Ok(out)
}
