//! `tevatron encode`: stream records, tokenize ahead on a second thread, encode length-sorted
//! batches and write rows to the embeddings file as they come (bounded memory on any corpus).

use std::collections::BTreeMap;
use std::sync::mpsc;

use anyhow::{bail, Result};
use tevatron_ir::records::{count_rows, shard_range, RecordKind, RecordStream};
use tevatron_ir::vectors::{truncate, VecDType, VectorWriter};
use tevatron_model::encoder::{BatchOptions, EMBED_CHUNK};
use tevatron_model::{CpuProducts, EncoderOptions, PaddingSide, TextOptions};

use super::encode_parts::Part;
use crate::args::{EncodeArgs, VecDTypeArg};
use crate::progress;

/// Validated settings of one encode run.
struct EncodeConfig {
    files: Vec<std::path::PathBuf>,
    kind: RecordKind,
    text: TextOptions,
    batch: BatchOptions,
    encoder: EncoderOptions,
    out_dtype: VecDType,
    shards: (usize, usize),
}

fn validate(a: &EncodeArgs, part: Option<Part>) -> Result<EncodeConfig> {
    if a.dataset_number_of_shards == 0 {
        bail!("--dataset_number_of_shards must be at least 1");
    }
    if a.dataset_shard_index >= a.dataset_number_of_shards {
        bail!(
            "--dataset_shard_index {} must be below --dataset_number_of_shards {}",
            a.dataset_shard_index,
            a.dataset_number_of_shards
        );
    }
    if a.encoding.per_device_eval_batch_size == 0 {
        bail!("--per_device_eval_batch_size must be at least 1");
    }
    let files = a.data.files()?;
    // Checked here, before any process of --nproc_per_node starts.
    tevatron_ir::atomic::refuse_input_as_output(
        &a.encode_output_path,
        &files,
        "--encode_output_path",
    )?;
    let (kind, max_len, prefix) = if a.encode_is_query {
        (RecordKind::Query, a.encoding.query_max_len, a.encoding.query_prefix.clone())
    } else {
        (RecordKind::Doc, a.encoding.passage_max_len, a.encoding.passage_prefix.clone())
    };
    let padding_side = PaddingSide::from(a.encoding.padding_side);
    let e = &a.encoding;
    let device_spec = match part {
        Some(p) => p.device(e.device.as_deref(), e.int8),
        None => e.device.clone(),
    };
    let (device, dtype, cpu_products) =
        super::inference_precision(device_spec.as_deref(), e.fp16, e.bf16, e.int8)?;
    Ok(EncodeConfig {
        files,
        kind,
        text: TextOptions {
            max_len,
            prefix,
            append_eos: a.encoding.append_eos_token,
            add_special_tokens: a.encoding.add_special_tokens,
        },
        batch: BatchOptions::for_encoding(
            a.encoding.per_device_eval_batch_size,
            max_len,
            a.encoding.pad_to_multiple_of,
            padding_side,
            &device,
        ),
        encoder: EncoderOptions {
            pooling: a.encoding.pooling,
            normalize: a.encoding.normalize,
            dtype,
            device,
            trainable: false,
            disable_dropout: false,
            lora: a
                .encoding
                .lora_name_or_path
                .as_deref()
                .map(|l| super::merged_adapter(l, a.encoding.cache_dir.as_deref()))
                .transpose()?,
            score_head: None,
            cpu_products,
        },
        out_dtype: match a.embedding_dtype {
            VecDTypeArg::F32 => VecDType::F32,
            VecDTypeArg::F16 => VecDType::F16,
            VecDTypeArg::Bf16 => VecDType::BF16,
        },
        shards: (a.dataset_number_of_shards, a.dataset_shard_index),
    })
}

type Chunk = (Vec<String>, Vec<Vec<u32>>);

pub fn run(a: &EncodeArgs) -> Result<()> {
    crate::tune_allocator();
    if let Some(dir) = &a.output_dir {
        tracing::info!(
            "--output_dir {} changes nothing here: the embeddings go to --encode_output_path",
            dir.display()
        );
    }
    if a.nproc_per_node == 0 {
        bail!("--nproc_per_node must be at least 1");
    }
    if a.encode_output_path.extension().is_some_and(|e| e == "pkl") {
        tracing::warn!(
            "{} is written as safetensors, not as the pickle Tevatron's encode writes: \
             tevatron search reads it, Tevatron's search does not (numpy: \
             safetensors.numpy.load_file)",
            a.encode_output_path.display()
        );
    }
    let part = Part::of_this_process()?;
    if a.nproc_per_node > 1 && part.is_none() {
        validate(a, None)?; // bad flags stop here, not in every process
        return super::encode_parts::run(a);
    }
    let cfg = validate(a, part)?;
    let output =
        part.map_or_else(|| a.encode_output_path.clone(), |p| p.path(&a.encode_output_path));
    let quiet = a.quiet || part.is_some_and(|p| !p.shows_progress());
    let encoder = super::load_encoder(
        &a.model_name_or_path,
        a.encoding.tokenizer_name.as_deref(),
        a.encoding.cache_dir.as_deref(),
        &cfg.encoder,
    )?;
    encoder.check_padding(cfg.batch.padding_side)?;
    let tokenizer = encoder.tokenizer().prepare(&cfg.text)?;

    let total = count_rows(&cfg.files)?;
    let range = shard_range(total, cfg.shards.0, cfg.shards.1);
    let range = part.map_or(range.clone(), |p| p.rows(range));
    let rows = range.len();
    tracing::info!(
        "encoding {rows} {} from {} file(s) with {} ({} pooling, normalize {})",
        if cfg.kind == RecordKind::Query { "queries" } else { "passages" },
        cfg.files.len(),
        a.model_name_or_path,
        encoder.pooling().name(),
        encoder.normalize()
    );

    let width = encoder.output_width();
    let trained = super::matryoshka_widths(
        &a.model_name_or_path,
        a.encoding.lora_name_or_path.as_deref(),
        a.encoding.cache_dir.as_deref(),
    );
    if let Some(k) = a.truncate_dim {
        if k == 0 || k > width {
            bail!("--truncate_dim {k}: the model's embeddings have {width} dimensions");
        }
        super::warn_untrained_width(k, width, trained.as_deref(), &a.model_name_or_path);
    }
    let mut meta = BTreeMap::new();
    if let Some(dims) = &trained {
        let dims: Vec<String> = dims.iter().map(usize::to_string).collect();
        meta.insert("matryoshka_dims".to_string(), dims.join(","));
    }
    if let Some(k) = a.truncate_dim {
        meta.insert("truncate_dim".to_string(), k.to_string());
    }
    match cfg.encoder.cpu_products {
        CpuProducts::F32 => {}
        products => {
            meta.insert(products.name().to_string(), "true".to_string());
        }
    }
    meta.insert("model".to_string(), a.model_name_or_path.clone());
    meta.insert("pooling".to_string(), encoder.pooling().name().to_string());
    meta.insert("normalize".to_string(), encoder.normalize().to_string());
    meta.insert("is_query".to_string(), a.encode_is_query.to_string());
    meta.insert("max_len".to_string(), cfg.text.max_len.to_string());
    meta.insert("prefix".to_string(), cfg.text.prefix.clone());
    let out_width = a.truncate_dim.unwrap_or(width);
    let mut writer = VectorWriter::create(&output, out_width, cfg.out_dtype, meta)?;

    let stream = RecordStream::open(cfg.files.clone(), cfg.kind).with_range(range);
    let (tx, rx) = mpsc::sync_channel::<Result<Chunk>>(2);
    let bar = progress::bar(
        Some(rows as u64),
        if a.encode_is_query { "queries" } else { "passages" },
        quiet || a.disable_tqdm,
    );
    std::thread::scope(|s| -> Result<()> {
        // Reader + tokenizer thread: keeps the next chunks ready while the model runs.
        s.spawn(move || {
            let mut stream = stream;
            loop {
                let mut ids = Vec::with_capacity(EMBED_CHUNK);
                let mut texts = Vec::with_capacity(EMBED_CHUNK);
                for rec in stream.by_ref().take(EMBED_CHUNK) {
                    match rec {
                        Ok(r) => {
                            ids.push(r.id);
                            texts.push(r.text);
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e.into()));
                            return;
                        }
                    }
                }
                if ids.is_empty() {
                    return;
                }
                let msg =
                    tokenizer.tokenize(&texts).map(|seqs| (ids, seqs)).map_err(anyhow::Error::from);
                if tx.send(msg).is_err() {
                    return;
                }
            }
        });
        let unit = if a.encode_is_query { "queries" } else { "passages" };
        let mut log = progress::LogProgress::new(rows, unit, quiet);
        for msg in rx {
            let (ids, seqs) = msg?;
            let mut reps = encoder.embed_sequences(&seqs, &cfg.batch)?;
            if let Some(at) = reps.iter().position(|x| !x.is_finite()) {
                // Said here, by row, rather than by search's refusal of the whole file later.
                bail!(
                    "the embedding of {:?} holds {}: the forward pass of {} overflowed (its \
                     weights or config, such as layer_norm_eps, hold values that cannot be \
                     computed with); nothing was written",
                    ids[at / width.max(1)],
                    reps[at],
                    a.model_name_or_path
                );
            }
            if out_width < width {
                reps = truncate(&reps, width, out_width, encoder.normalize());
            }
            writer.push(&reps, &ids)?;
            bar.inc(ids.len() as u64);
            log.advance(ids.len());
        }
        Ok(())
    })?;
    bar.finish_and_clear();
    let n = writer.len();
    writer.finish()?;
    tracing::info!("wrote {n} embeddings to {}", output.display());
    Ok(())
}
