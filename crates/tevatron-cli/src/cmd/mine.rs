//! `tevatron mine`: hard negatives for a training file. Reads the queries with their positives
//! (a training file in either of Tevatron's forms, or queries plus qrels), encodes queries and
//! corpus with the model (or takes `tevatron encode`'s embeddings), searches exactly in chunks
//! of queries over the memory-mapped shards, filters each query's candidates
//! (`tevatron_ir::mining`) and writes Tevatron's ids form under a temporary name. A summary
//! (queries short of negatives, what each filter removed, where the positives ranked) goes to
//! the log, to `<output>.summary.json` and, as a picture, to `<output>.positive_ranks.png`.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tevatron_ir::atomic::AtomicFile;
use tevatron_ir::mining::{
    fold_text, rank_buckets, select, Candidate, FilterCounts, MineOptions, Sampling,
};
use tevatron_ir::records::{RecordKind, RecordStream};
use tevatron_ir::rows::RowStore;
use tevatron_ir::search::{check_dims, check_shard_finite, merge_shards, search_checked_shard};
use tevatron_ir::trec::Qrels;
use tevatron_ir::vectors::{expand_glob, Vectors};
use tevatron_train::data::Corpus;

use crate::args::{DatasetFlags, EncodeArgs, MineArgs, SamplingArg, VecDTypeArg};
use crate::progress;

/// One query to mine for: its id and text, its positives, every document judged relevant, the
/// negatives it already has, and where it was read (for messages).
struct MineQuery {
    id: String,
    text: String,
    positives: Vec<String>,
    judged: HashSet<String>,
    negatives: Vec<String>,
    source: (PathBuf, usize),
}

fn options(a: &MineArgs) -> Result<MineOptions> {
    if a.depth == 0 {
        bail!("--depth must be at least 1");
    }
    if a.batch_size == 0 {
        bail!("--batch_size must be at least 1");
    }
    if a.range_max.is_some_and(|m| m <= a.range_min) {
        bail!("--range_max must be above --range_min ({})", a.range_min);
    }
    if a.range_min >= a.depth || a.range_max.is_some_and(|m| m > a.depth) {
        bail!(
            "--range_min ({}) and --range_max must lie within --depth ({}): ranks beyond it are never retrieved",
            a.range_min,
            a.depth
        );
    }
    if a.queries.is_some() && (a.data.dataset_path.is_some() || a.keep_existing_negatives) {
        bail!("with --queries and --qrels there is no training file: drop --dataset_path and --keep_existing_negatives");
    }
    if a.relative_margin.is_some_and(|r| !(0.0..1.0).contains(&r)) {
        bail!("--relative_margin must be in [0, 1)");
    }
    // A NaN bound would turn its filter off without a word (no score compares above NaN).
    for (name, value) in [("max_score", a.max_score), ("absolute_margin", a.absolute_margin)] {
        if value.is_some_and(|v| !v.is_finite()) {
            bail!("--{name} must be a finite number");
        }
    }
    if a.num_negatives == 0 {
        bail!("--num_negatives must be at least 1");
    }
    if a.drop_same_text && !a.corpus.given() {
        bail!("--drop_same_text needs the corpus texts: give --corpus_path (or --corpus_name)");
    }
    Ok(MineOptions {
        range_min: a.range_min,
        range_max: a.range_max,
        max_score: a.max_score,
        absolute_margin: a.absolute_margin,
        relative_margin: a.relative_margin,
        drop_same_text: a.drop_same_text,
        num_negatives: a.num_negatives,
        sampling: match a.sampling_strategy {
            SamplingArg::Top => Sampling::Top,
            SamplingArg::Random => Sampling::Random,
        },
        seed: a.seed,
    })
}

/// A temporary embeddings folder and its held lock, removed when dropped.
type TempEmbeddings = (tempfile::TempDir, std::fs::File);

/// The lock file of a temporary embeddings folder, held by the run that made it.
const LOCK: &str = ".lock";

/// Removes the folders `<prefix><pid>.<random>` in `dir` (`random`: tempfile's six letters
/// and digits) that a killed `mine` left ([`tevatron_ir::atomic::orphans_in`], by the
/// folder's lock file).
fn remove_orphan_folders(dir: &Path, prefix: &str) {
    let random = |r: &str| r.len() == 6 && r.bytes().all(|b| b.is_ascii_alphanumeric());
    for folder in tevatron_ir::atomic::orphans_in(dir, prefix, random, |f| f.join(LOCK)) {
        let _ = std::fs::remove_dir_all(folder);
    }
}

/// A string id field (`query_id`, `docid`): a JSON string or an integer.
fn id_of(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) if n.is_i64() || n.is_u64() => Some(n.to_string()),
        _ => None,
    }
}

/// The document ids of a row's `<kind>_document_ids`, or of the `docid`s of its
/// `<kind>_passages`.
fn doc_ids(row: &Value, kind: &str, path: &Path, line: usize) -> Result<Vec<String>> {
    let bad = |field: String, what: &str| {
        anyhow::anyhow!("{}:{line}: field `{field}`: {what}", path.display())
    };
    if let Some(list) = row.get(format!("{kind}_document_ids")) {
        let field = format!("{kind}_document_ids");
        let items = list.as_array().ok_or_else(|| bad(field.clone(), "must be a list of ids"))?;
        return items
            .iter()
            .map(|v| id_of(v).ok_or_else(|| bad(field.clone(), "must be a list of ids")))
            .collect();
    }
    let field = format!("{kind}_passages");
    let Some(list) = row.get(&field) else { return Ok(Vec::new()) };
    let items = list.as_array().ok_or_else(|| bad(field.clone(), "must be a list of passages"))?;
    items
        .iter()
        .map(|p| {
            p.get("docid").and_then(id_of).ok_or_else(|| {
                bad(field.clone(), "a passage has no `docid`; mining needs document ids")
            })
        })
        .collect()
}

/// The queries of a training file, in either of Tevatron's forms.
fn training_queries(a: &MineArgs, cache: &Path) -> Result<Vec<MineQuery>> {
    let files = a.data.files()?;
    let rows = RowStore::open(&files, cache)?;
    if rows.is_empty() {
        let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
        bail!("no training rows in {}", names.join(", "));
    }
    let mut out = Vec::with_capacity(rows.len());
    for i in 0..rows.len() {
        let r = rows.get(i)?;
        let (path, line) = (r.path, r.line);
        let id = r.value.get("query_id").and_then(id_of).ok_or_else(|| {
            anyhow::anyhow!(
                "{}:{line}: missing field `query_id` (a string or an integer)",
                path.display()
            )
        })?;
        let text = ["query_text", "query"]
            .iter()
            .find_map(|f| r.value.get(*f).and_then(Value::as_str))
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "{}:{line}: missing field `query_text` (or `query`)",
                    path.display()
                )
            })?
            .to_string();
        let positives = doc_ids(&r.value, "positive", path, line)?;
        if positives.is_empty() {
            bail!("{}:{line}: no positive document ids (`positive_document_ids` or `positive_passages`)", path.display());
        }
        let negatives = doc_ids(&r.value, "negative", path, line)?;
        // Every positive of the query's rows: filled once all rows are read (below).
        let judged = HashSet::new();
        out.push(MineQuery {
            id,
            text,
            positives,
            judged,
            negatives,
            source: (path.to_path_buf(), line),
        });
    }
    // A query given in several rows (one positive a row, as pair files have it) is judged
    // relevant to every positive of all its rows, as sentence-transformers groups positives by
    // anchor: one row's positive is never mined as another's negative.
    let mut by_id: HashMap<String, HashSet<String>> = HashMap::new();
    for q in &out {
        by_id.entry(q.id.clone()).or_default().extend(q.positives.iter().cloned());
    }
    for q in &mut out {
        q.judged.clone_from(&by_id[&q.id]);
    }
    Ok(out)
}

/// The queries of a queries file with their qrels: positives are the documents judged above 0.
fn qrels_queries(queries: &Path, qrels_path: &Path) -> Result<Vec<MineQuery>> {
    let qrels = Qrels::read(qrels_path)?;
    let mut judged: HashMap<&str, Vec<&str>> = HashMap::new();
    for (qid, docs) in &qrels.queries {
        let mut rel: Vec<&str> =
            docs.iter().filter(|(_, r)| **r > 0).map(|(d, _)| d.as_str()).collect();
        rel.sort_unstable();
        judged.insert(qid.as_str(), rel);
    }
    let mut out = Vec::new();
    let mut without = 0;
    for rec in RecordStream::open(vec![queries.to_path_buf()], RecordKind::Query) {
        let rec = rec?;
        match judged.get(rec.id.as_str()).filter(|d| !d.is_empty()) {
            Some(docs) => {
                let positives: Vec<String> = docs.iter().map(|d| d.to_string()).collect();
                out.push(MineQuery {
                    judged: positives.iter().cloned().collect(),
                    id: rec.id,
                    text: rec.text,
                    positives,
                    negatives: Vec::new(),
                    source: (qrels_path.to_path_buf(), 0),
                });
            }
            None => without += 1,
        }
    }
    if without > 0 {
        tracing::info!(
            "{without} queries of {} have no relevant document in {}; skipped",
            queries.display(),
            qrels_path.display()
        );
    }
    if out.is_empty() {
        bail!(
            "no query of {} has a relevant document in {}",
            queries.display(),
            qrels_path.display()
        );
    }
    Ok(out)
}

/// Where a missing document id was given: the training row, or the qrels line naming it.
fn location(q: &MineQuery, docid: &str) -> String {
    let (path, line) = &q.source;
    if *line > 0 {
        return format!("{}:{line}", path.display());
    }
    let found = std::fs::read_to_string(path).ok().and_then(|text| {
        text.lines().position(|l| {
            let c: Vec<&str> = l.split_whitespace().collect();
            c.len() >= 3 && c[0] == q.id && c[2] == docid
        })
    });
    match found {
        Some(i) => format!("{}:{}", path.display(), i + 1),
        None => path.display().to_string(),
    }
}

/// Query and passage embeddings: given, or made with the model into `--embeddings_dir` (or a
/// temporary folder, removed at the end).
fn embeddings(
    a: &MineArgs,
    queries: &[MineQuery],
    corpus_files: Option<&[PathBuf]>,
) -> Result<(PathBuf, String, Option<TempEmbeddings>)> {
    if let (Some(q), Some(p)) = (&a.query_reps, &a.passage_reps) {
        tracing::info!(
            "using the embeddings {} and {p}; the encoding flags (lengths, prefixes, precision) change nothing here",
            q.display()
        );
        if let Some(dir) = &a.embeddings_dir {
            tracing::info!(
                "--embeddings_dir {} changes nothing here: the embeddings are given",
                dir.display()
            );
        }
        if a.corpus.given() && !a.drop_same_text {
            tracing::info!(
                "the corpus (--corpus_path/--corpus_name) changes nothing here: the embeddings are given and only --drop_same_text reads its texts"
            );
        }
        return Ok((q.clone(), p.clone(), None));
    }
    let Some(model) = &a.model_name_or_path else {
        bail!(
            "give a model (--model_name_or_path) or embeddings (--query_reps and --passage_reps)"
        );
    };
    let Some(corpus_files) = corpus_files else {
        bail!("encoding needs the corpus: give --corpus_path (or --corpus_name)");
    };
    let (dir, temp) = match &a.embeddings_dir {
        Some(d) => (d.clone(), None),
        None => {
            // Beside the output, on its disk (a corpus's embeddings can outgrow /tmp), named
            // with this process's id, so that what a killed run left is found and removed.
            let parent = match a.output_path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            };
            std::fs::create_dir_all(&parent)
                .with_context(|| format!("could not create {}", parent.display()))?;
            let name = a.output_path.file_name().unwrap_or_default().to_string_lossy();
            let prefix = format!(".{name}.embeddings.");
            remove_orphan_folders(&parent, &prefix);
            let t = tempfile::Builder::new()
                .prefix(&format!("{prefix}{}.", std::process::id()))
                .tempdir_in(&parent)
                .context("creating a temporary folder")?;
            // Held for the run: another machine sharing the folder tells a live folder from an
            // orphan by it (its pids are not this machine's).
            let lock = std::fs::File::create(t.path().join(LOCK))
                .with_context(|| format!("creating {}", t.path().join(LOCK).display()))?;
            let _ = lock.try_lock();
            (t.path().to_path_buf(), Some((t, lock)))
        }
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("could not create {}", dir.display()))?;
    let (q_out, p_out) = (dir.join("queries.safetensors"), dir.join("corpus.safetensors"));
    // What the embeddings were made from: reused only when all of it is the same.
    let stamp = |p: &Path| -> Value {
        let m = std::fs::metadata(p).ok();
        let modified = m
            .as_ref()
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
        json!({"file": p.display().to_string(), "bytes": m.map(|m| m.len()), "modified": modified.map(|d| d.as_nanos().to_string())})
    };
    let mut query_hash = 0xcbf2_9ce4_8422_2325u64;
    for q in queries {
        for b in q.id.bytes().chain([0]).chain(q.text.bytes()).chain([0]) {
            query_hash = (query_hash ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    }
    let manifest = json!({
        "model": model,
        "encoding": a.encoding,
        "corpus": corpus_files.iter().map(|f| stamp(f)).collect::<Vec<_>>(),
        "queries": {"count": queries.len(), "fnv1a": format!("{query_hash:016x}")},
    });
    let manifest_path = dir.join("mine-embeddings.json");
    let previous: Option<Value> =
        std::fs::read_to_string(&manifest_path).ok().and_then(|t| serde_json::from_str(&t).ok());
    let reusable = q_out.is_file() && p_out.is_file() && previous.as_ref() == Some(&manifest);
    if reusable {
        tracing::info!(
            "reusing the embeddings in {} (same model, flags, corpus and queries)",
            dir.display()
        );
    } else {
        if q_out.is_file() || p_out.is_file() {
            tracing::info!(
                "the embeddings in {} were made from other inputs; encoding again",
                dir.display()
            );
        }
        let _ = std::fs::remove_file(&manifest_path);
        // The queries as a JSONL file for the encoder, in the order they were read.
        let q_file = dir.join("queries.jsonl");
        let mut f = AtomicFile::create(&q_file)?;
        for q in queries {
            writeln!(f.writer(), "{}", json!({"query_id": q.id, "query": q.text}))
                .map_err(|e| f.err(e))?;
        }
        f.commit()?;
        // Both through `encode`'s own code, with the encoding flags as given.
        let encode = |data: DatasetFlags, is_query: bool, output: &Path| {
            super::encode::run(&EncodeArgs {
                model_name_or_path: model.clone(),
                encoding: a.encoding.clone(),
                data,
                encode_is_query: is_query,
                encode_output_path: output.to_path_buf(),
                nproc_per_node: 1,
                dataset_number_of_shards: 1,
                dataset_shard_index: 0,
                embedding_dtype: VecDTypeArg::F32,
                truncate_dim: None,
                output_dir: None,
                quiet: a.quiet,
                disable_tqdm: false,
            })
        };
        tracing::info!("encoding {} queries with {model}", queries.len());
        let queries_file = DatasetFlags {
            dataset_name: "json".into(),
            dataset_path: Some(q_file.display().to_string()),
            dataset_config: None,
            dataset_split: "train".into(),
            dataset_cache_dir: a.data.dataset_cache_dir.clone(),
        };
        encode(queries_file, true, &q_out)?;
        tracing::info!("encoding the corpus with {model}");
        encode(a.corpus.as_dataset(a.data.dataset_cache_dir.clone()), false, &p_out)
            .context("encoding the corpus (--corpus_name/--corpus_path)")?;
        let mut f = AtomicFile::create(&manifest_path)?;
        writeln!(f.writer(), "{}", serde_json::to_string_pretty(&manifest).unwrap_or_default())
            .map_err(|e| f.err(e))?;
        f.commit()?;
    }
    Ok((q_out, p_out.display().to_string(), temp))
}

/// Passage id → (shard, row), as a permutation sorted by id: 8 bytes a passage, searched by
/// bisection (no hash map of owned strings over a corpus of millions).
struct PassageIndex(Vec<(u32, u32)>);

impl PassageIndex {
    fn new(shards: &[Vectors]) -> Result<Self> {
        let mut order: Vec<(u32, u32)> = shards
            .iter()
            .enumerate()
            .flat_map(|(s, v)| (0..v.len() as u32).map(move |r| (s as u32, r)))
            .collect();
        let id = |&(s, r): &(u32, u32)| shards[s as usize].ids().get(r as usize);
        order.sort_unstable_by(|x, y| id(x).cmp(id(y)));
        if let Some(w) = order.windows(2).find(|w| id(&w[0]) == id(&w[1])) {
            let (a, b) = (shards[w[0].0 as usize].path(), shards[w[1].0 as usize].path());
            bail!(
                "passage id {:?} is in the passage embeddings twice ({} and {})",
                id(&w[0]),
                a.display(),
                b.display()
            );
        }
        Ok(Self(order))
    }

    fn find(&self, shards: &[Vectors], docid: &str) -> Option<(u32, u32)> {
        self.0
            .binary_search_by(|&(s, r)| shards[s as usize].ids().get(r as usize).cmp(docid))
            .ok()
            .map(|i| self.0[i])
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// What the run found, for the log and `<output>.summary.json`.
#[derive(serde::Serialize)]
struct Summary {
    queries: usize,
    num_negatives: usize,
    negatives_written: usize,
    queries_short_of_negatives: usize,
    /// Rows with no negative at all are left out of the output: Tevatron's `train` fails on
    /// such a row (it draws from an empty list), and so does ours with a group above 1.
    queries_left_out_without_negatives: usize,
    removed: FilterCounts,
    positive_ranks: Vec<(String, usize)>,
}

pub fn run(a: &MineArgs) -> Result<()> {
    let opts = options(a)?;
    let cache = super::train::index_cache(a.data.dataset_cache_dir.as_deref());
    let queries = match (&a.queries, &a.qrels) {
        (Some(q), Some(r)) => qrels_queries(q, r)?,
        (None, None) => training_queries(a, &cache)?,
        _ => {
            bail!("--queries and --qrels go together (or give a training file with --dataset_path)")
        }
    };
    // The corpus files, resolved once for encoding and for --drop_same_text, and only when one
    // of them reads it (a hub corpus is not fetched to be said to change nothing).
    let given = a.query_reps.is_some() && a.passage_reps.is_some();
    let corpus_files = match a.drop_same_text || !given {
        true => a.corpus.files(a.data.dataset_cache_dir.as_deref())?,
        false => None,
    };
    // The training file may be mined in place; the corpus and the embeddings may not be
    // written over.
    let given_shards = match (&a.passage_reps, given) {
        (Some(p), true) => Some(expand_glob(p).context("resolving the passage embeddings")?),
        _ => None,
    };
    let mut inputs = corpus_files.clone().unwrap_or_default();
    inputs.extend(a.query_reps.iter().cloned());
    inputs.extend(a.queries.iter().chain(&a.qrels).cloned());
    inputs.extend(given_shards.iter().flatten().cloned());
    tevatron_ir::atomic::refuse_input_as_output(&a.output_path, &inputs, "--output_path")?;
    let (q_path, p_pattern, _temp) = embeddings(a, &queries, corpus_files.as_deref())?;
    let qv = Vectors::open(&q_path).context("reading the query embeddings")?;
    let shard_files = match given_shards {
        Some(files) => files,
        None => expand_glob(&p_pattern).context("resolving the passage embeddings")?,
    };
    let shards = shard_files.iter().map(|f| Vectors::open(f)).collect::<Result<Vec<_>, _>>()?;
    for s in &shards {
        check_dims(&qv, s)?;
        check_shard_finite(s)?;
    }
    if shards.iter().all(Vectors::is_empty) {
        bail!(
            "the passage embeddings {} hold no passage: there are no candidates to mine",
            p_pattern
        );
    }
    let dim = qv.dim();
    let q_rows: HashMap<&str, usize> = qv.ids().iter().enumerate().map(|(i, id)| (id, i)).collect();
    let index = PassageIndex::new(&shards)?;
    let row_of = |docid: &str, buf: &mut Vec<f32>| -> bool {
        match index.find(&shards, docid) {
            Some((s, r)) => {
                shards[s as usize].rows().to_f32(dim, r as usize, r as usize + 1, buf);
                true
            }
            None => false,
        }
    };
    // Every id must be known before any work: the query embeddings and the positives.
    let mut buf = Vec::new();
    for q in &queries {
        if !q_rows.contains_key(q.id.as_str()) {
            bail!(
                "{}: query id {:?} is not in the query embeddings {}",
                location(q, ""),
                q.id,
                q_path.display()
            );
        }
        let r = q_rows[q.id.as_str()];
        qv.rows().to_f32(dim, r, r + 1, &mut buf);
        tevatron_ir::search::check_finite(&buf, dim, r, &q_path)?;
        for p in q.positives.iter().chain(q.negatives.iter().filter(|_| a.keep_existing_negatives))
        {
            if index.find(&shards, p).is_none() {
                bail!(
                    "{}: query {:?}: document id {p:?} is not in the corpus ({})",
                    location(q, p),
                    q.id,
                    p_pattern
                );
            }
        }
    }
    let corpus = match (a.drop_same_text, &corpus_files) {
        (true, Some(files)) => Some(Corpus::open(files, &cache)?),
        _ => None,
    };
    let folded = |docid: &str| -> Result<Option<String>> {
        match &corpus {
            Some(c) => Ok(c.text(docid)?.map(|t| fold_text(&t))),
            None => Ok(None),
        }
    };

    let buckets = rank_buckets(a.depth);
    let mut histogram = vec![0usize; buckets.len()];
    let mut removed = FilterCounts::default();
    let (mut short, mut written, mut left_out) = (0, 0, 0);
    let mut out = AtomicFile::create(&a.output_path)?;
    let bar = progress::bar(Some(queries.len() as u64), "queries", a.quiet);
    for chunk in queries.chunks(a.batch_size) {
        let mut qbuf = Vec::with_capacity(chunk.len() * dim);
        for q in chunk {
            let r = q_rows[q.id.as_str()];
            qv.rows().to_f32(dim, r, r + 1, &mut buf);
            qbuf.extend_from_slice(&buf);
        }
        let ranking = merge_shards(chunk.len(), shards.iter().map(Ok), a.depth, |s| {
            search_checked_shard(&qbuf, dim, s, a.depth, 0)
        })?;
        for (i, q) in chunk.iter().enumerate() {
            let qvec = &qbuf[i * dim..(i + 1) * dim];
            let candidates: Vec<Candidate> = ranking.hits[i]
                .iter()
                .enumerate()
                .map(|(k, h)| Candidate {
                    docid: ranking.docid(h).to_string(),
                    score: h.score,
                    rank: k + 1,
                })
                .collect();
            // The margins' reference: the lowest score of any positive of the query.
            let mut positive_score = f32::INFINITY;
            for p in &q.judged {
                row_of(p, &mut buf);
                positive_score = positive_score.min(dot(qvec, &buf));
            }
            for p in &q.positives {
                let rank = candidates.iter().find(|c| c.docid == *p).map_or(usize::MAX, |c| c.rank);
                let b = buckets
                    .iter()
                    .position(|(_, lo, hi)| (*lo..=*hi).contains(&rank))
                    .unwrap_or(buckets.len() - 1);
                histogram[b] += 1;
            }
            let same: HashSet<String> = if a.drop_same_text {
                let positives: HashSet<String> =
                    q.judged.iter().filter_map(|p| folded(p).transpose()).collect::<Result<_>>()?;
                let mut same = HashSet::new();
                for c in &candidates {
                    if folded(&c.docid)?.is_some_and(|t| positives.contains(&t)) {
                        same.insert(c.docid.clone());
                    }
                }
                same
            } else {
                HashSet::new()
            };
            let (chosen, counts) = select(
                &q.id,
                &candidates,
                &q.judged,
                Some(positive_score),
                |d| same.contains(d),
                &opts,
            );
            removed.add(&counts);
            let mut negatives: Vec<String> = chosen.into_iter().map(|c| c.docid).collect();
            if a.keep_existing_negatives {
                for n in &q.negatives {
                    if !negatives.contains(n) && !q.judged.contains(n) {
                        negatives.push(n.clone());
                    }
                }
            }
            if negatives.is_empty() {
                left_out += 1;
                continue;
            }
            if negatives.len() < opts.num_negatives {
                short += 1;
            }
            written += negatives.len();
            let row = json!({
                "query_id": q.id,
                "query_text": q.text,
                "positive_document_ids": q.positives,
                "negative_document_ids": negatives,
            });
            writeln!(out.writer(), "{row}").map_err(|e| out.err(e))?;
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    out.commit()?;
    let summary = Summary {
        queries: queries.len(),
        num_negatives: opts.num_negatives,
        negatives_written: written,
        queries_short_of_negatives: short,
        queries_left_out_without_negatives: left_out,
        removed,
        positive_ranks: buckets.iter().map(|b| b.0.clone()).zip(histogram).collect(),
    };
    let stem = a.output_path.display().to_string();
    let summary_path = PathBuf::from(format!("{stem}.summary.json"));
    let mut f = AtomicFile::create(&summary_path)?;
    writeln!(f.writer(), "{}", serde_json::to_string_pretty(&summary).unwrap_or_default())
        .map_err(|e| f.err(e))?;
    f.commit()?;
    let picture = PathBuf::from(format!("{stem}.positive_ranks.png"));
    crate::plot::plot_rank_histogram(&picture, &summary.positive_ranks, a.depth)?;
    tracing::info!(
        "wrote {} queries with {written} negatives to {}; {short} have fewer than {}",
        summary.queries - left_out,
        a.output_path.display(),
        opts.num_negatives
    );
    if left_out > 0 {
        tracing::warn!(
            "left out {left_out} queries whose candidates the filters removed entirely (a row without negatives fails training with --train_group_size above 1); a larger --depth or looser filters keep them"
        );
    }
    tracing::info!(
        "removed by filter: {}",
        serde_json::to_string(&summary.removed).unwrap_or_default()
    );
    let ranks: Vec<String> =
        summary.positive_ranks.iter().map(|(l, n)| format!("{l}: {n}")).collect();
    tracing::info!("positives by rank: {} (picture: {})", ranks.join(", "), picture.display());
    Ok(())
}
