//! Exact search on a GPU (`tevatron search` with a CUDA device), in the model crate because it
//! needs candle, which `tevatron-ir` does not take. Each shard goes to the device once, in fp16 by default (as
//! Tevatron's FAISS GPU index; `--gpu_float32` keeps f32), and every query batch is scored
//! against it with cuBLAS in f32, one block of rows at a time; the top-k of each block is
//! taken on the host by the CPU search's own heap and tie rule ([`top_k_of_blocks`]), so the
//! ranking is the CPU's up to the rounding of the scores. Device memory holds one shard and
//! one block of scores.

use candle_core::{DType, Device, Tensor};
use tevatron_ir::search::{
    check_finite, check_width, queries_per_batch, top_k_of_blocks, ScoreBlock,
};
use tevatron_ir::vectors::Vectors;
use tevatron_ir::{Error, Result};

/// Rows per device block: a 128-query batch's scores are 32 MiB.
const DEVICE_BLOCK: usize = 1 << 16;

fn device_error(e: candle_core::Error) -> Error {
    Error::Invalid(format!(
        "device search: {e}; if the shard does not fit on the GPU, encode into more shards or pass --cpu_search"
    ))
}

/// Each query's best `depth` `(score, row)` pairs of `shard`, best first, scored on `device`
/// with the corpus held in `index_dtype`. `batch_size` queries are scored per pass (0: all).
pub fn search_shard_on(
    device: &Device,
    index_dtype: DType,
    queries: &[f32],
    dim: usize,
    shard: &Vectors,
    depth: usize,
    batch_size: usize,
) -> Result<Vec<Vec<(f32, u32)>>> {
    check_width(shard, dim)?;
    let n = shard.len();
    let mut blocks = Vec::with_capacity(n.div_ceil(DEVICE_BLOCK));
    let mut rows = Vec::new();
    for start in (0..n).step_by(DEVICE_BLOCK) {
        let end = (start + DEVICE_BLOCK).min(n);
        shard.rows().to_f32(dim, start, end, &mut rows);
        check_finite(&rows, dim, start, shard.path())?;
        let block = Tensor::from_slice(&rows, (end - start, dim), device)
            .and_then(|t| t.to_dtype(index_dtype))
            .map_err(device_error)?;
        blocks.push((start, block));
    }
    let nq = queries.len() / dim;
    let batch = queries_per_batch(batch_size, nq);
    let mut out = Vec::with_capacity(nq);
    for qb in queries.chunks(batch * dim) {
        let bq = qb.len() / dim;
        let q = Tensor::from_slice(qb, (bq, dim), device).map_err(device_error)?;
        let scored = blocks.iter().map(|(start, block)| {
            let scores = block
                .to_dtype(DType::F32)
                .and_then(|b| q.matmul(&b.t()?))
                .and_then(|s| s.flatten_all()?.to_vec1::<f32>())
                .map_err(device_error)?;
            Ok(ScoreBlock { start: *start, len: scores.len() / bq.max(1), scores })
        });
        out.extend(top_k_of_blocks(shard.ids(), bq, depth, scored)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use tevatron_ir::search::search_shard;
    use tevatron_ir::vectors::{VecDType, VectorWriter};

    fn shard(dir: &std::path::Path, rows: &[f32], dim: usize, dt: VecDType) -> Vectors {
        let path = dir.join(format!("c.{}.safetensors", dt.name()));
        let ids: Vec<String> = (0..rows.len() / dim).map(|i| format!("d{i}")).collect();
        let mut w = VectorWriter::create(&path, dim, dt, BTreeMap::new()).unwrap();
        w.push(rows, &ids).unwrap();
        w.finish().unwrap();
        Vectors::open(&path).unwrap()
    }

    /// A corpus of well-separated scores (no near-ties), so that two summation orders give
    /// the same ranking.
    fn data(n: usize, nq: usize, dim: usize) -> (Vec<f32>, Vec<f32>) {
        let mut x = 0x2545F4914F6CDD1Du64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        let docs = (0..n * dim).map(|_| next()).collect();
        let queries = (0..nq * dim).map(|_| next()).collect();
        (docs, queries)
    }

    /// The device path (run here on the CPU device) ranks as the CPU search does: with an f32
    /// index the same rows in the same order, with an f16 index those of the CPU search over
    /// the f16-rounded corpus; several query batches and a shard spanning two device blocks.
    #[test]
    fn device_search_ranks_as_the_cpu_search() {
        let dir = tempfile::tempdir().unwrap();
        let (dim, n, nq, depth) = (8, DEVICE_BLOCK + 300, 5, 20);
        let (docs, queries) = data(n, nq, dim);
        for (dt, index) in [(VecDType::F32, DType::F32), (VecDType::F16, DType::F16)] {
            let v = shard(dir.path(), &docs, dim, dt);
            let want = search_shard(&queries, dim, &v, depth, 2).unwrap();
            let got = search_shard_on(&Device::Cpu, index, &queries, dim, &v, depth, 2).unwrap();
            assert_eq!(got.len(), nq);
            for (g, w) in got.iter().zip(&want) {
                let rows = |h: &[(f32, u32)]| h.iter().map(|x| x.1).collect::<Vec<_>>();
                assert_eq!(rows(g), rows(w), "{dt:?}");
                for (a, b) in g.iter().zip(w) {
                    assert!((a.0 - b.0).abs() <= 1e-5, "{a:?} vs {b:?}");
                }
            }
        }
        // An f16 index of an f32 file ranks as the CPU does on the rounded rows.
        let rounded: Vec<f32> = docs.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect();
        let v32 = shard(dir.path(), &docs, dim, VecDType::F32);
        let got = search_shard_on(&Device::Cpu, DType::F16, &queries, dim, &v32, depth, 0).unwrap();
        let sub = tempfile::tempdir().unwrap();
        let want =
            search_shard(&queries, dim, &shard(sub.path(), &rounded, dim, VecDType::F32), depth, 0)
                .unwrap();
        assert_eq!(
            got.iter().map(|h| h.iter().map(|x| x.1).collect::<Vec<_>>()).collect::<Vec<_>>(),
            want.iter().map(|h| h.iter().map(|x| x.1).collect::<Vec<_>>()).collect::<Vec<_>>()
        );
    }

    #[test]
    fn bad_rows_and_dimensions_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let v = shard(dir.path(), &[1.0, f32::NAN, 0.0, 1.0], 2, VecDType::F32);
        let e = search_shard_on(&Device::Cpu, DType::F32, &[1.0, 0.0], 2, &v, 1, 0).unwrap_err();
        assert!(e.to_string().contains("row 0 holds a NaN"), "{e}");
        let e = search_shard_on(&Device::Cpu, DType::F32, &[1.0, 0.0, 0.0], 3, &v, 1, 0);
        let e = e.unwrap_err().to_string();
        assert!(e.starts_with("query dimension 3 does not match passage dimension 2 of "), "{e}");
    }
}
