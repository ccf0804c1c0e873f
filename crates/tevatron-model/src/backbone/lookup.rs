//! Embedding lookups whose gradient on a GPU is ours. candle's backward of `index_select` is
//! `index_add`, whose CUDA kernel gives each of the table's columns one thread that walks every
//! looked-up row: 384 threads for a MiniLM. That took 3 ms per lookup of a 16k-token batch, 19
//! of a 60 ms bf16 training step (ncu on an H200). Here the host sorts the looked-up rows by
//! table row (the ids are a few thousand integers) and two kernels of `kernels/train.cu` add
//! them in that fixed order: the same bits every run, no atomics.
//!
//! Only a trainable F32 table on a GPU takes this path; the CPU, inference and
//! `TEVATRON_GPU_COMPOSED_OPS` keep candle's lookup.

use candle_core::{Result, Tensor};

#[cfg(any(test, feature = "cuda"))]
use crate::cuda_kernels::{Arg, Kernels, Launch, Operand};

/// Looked-up rows added per partial sum: enough parallel work for a row that many tokens read
/// (a token type, a position), little extra traffic for the rest.
#[cfg(any(test, feature = "cuda"))]
const SEGMENT_ROWS: u32 = 32;

/// Rows `ids` of the 2-D `table`, shaped `ids.dims() + (width,)`: candle's `Embedding`, with
/// our backward where the table trains on a GPU.
pub fn embedding(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let (_, width) = table.dims2()?;
    let mut dims = ids.dims().to_vec();
    dims.push(width);
    let ids = ids.flatten_all()?;
    #[cfg(feature = "cuda")]
    if table.device().is_cuda() && table.is_variable() && super::train_ops::has_kernel(&[table]) {
        let groups = std::sync::Arc::new(RowGroups::new(&ids.to_vec1::<u32>()?, table.dim(0)?)?);
        return table.apply_op1(gpu::Lookup { ids, groups })?.reshape(dims);
    }
    table.index_select(&ids, 0)?.reshape(dims)
}

/// Which looked-up rows add into which table row, in the order the kernels add them.
#[cfg(any(test, feature = "cuda"))]
#[derive(Debug)]
pub(crate) struct RowGroups {
    /// The looked-up rows (positions in the ids), sorted by the table row they read, stably.
    order: Vec<u32>,
    /// Segments + 1 offsets into `order`: segment `s` is `order[seg_start[s]..seg_start[s + 1]]`,
    /// at most [`SEGMENT_ROWS`] rows of one table row.
    seg_start: Vec<u32>,
    /// Table rows + 1 offsets into the segments: table row `r` sums segments
    /// `row_seg[r]..row_seg[r + 1]` (none for a row no id reads).
    row_seg: Vec<u32>,
}

#[cfg(any(test, feature = "cuda"))]
impl RowGroups {
    /// The groups of `ids` into a table of `rows` rows; an error on an id outside it.
    pub(crate) fn new(ids: &[u32], rows: usize) -> Result<Self> {
        let mut start = vec![0u32; rows + 1];
        for &id in ids {
            if id as usize >= rows {
                candle_core::bail!("embedding: id {id} is outside the table's {rows} rows");
            }
            start[id as usize + 1] += 1;
        }
        for r in 0..rows {
            start[r + 1] += start[r];
        }
        let mut next = start.clone();
        let mut order = vec![0u32; ids.len()];
        for (k, &id) in ids.iter().enumerate() {
            order[next[id as usize] as usize] = k as u32;
            next[id as usize] += 1;
        }
        let (mut seg_start, mut row_seg) = (vec![0u32], Vec::with_capacity(rows + 1));
        row_seg.push(0);
        for r in 0..rows {
            let (mut s, end) = (start[r], start[r + 1]);
            while s < end {
                s = (s + SEGMENT_ROWS).min(end);
                seg_start.push(s);
            }
            row_seg.push((seg_start.len() - 1) as u32);
        }
        Ok(Self { order, seg_start, row_seg })
    }

    fn segments(&self) -> usize {
        self.seg_start.len() - 1
    }

    /// The rows of the table.
    fn rows(&self) -> usize {
        self.row_seg.len() - 1
    }

    /// The gradient of the table, `rows` x `width`, from the lookup's output gradient `g`
    /// (`ids.len()` x `width`), added as the kernels add it: their CPU twin in the tests.
    #[cfg(test)]
    pub(crate) fn table_grad(&self, g: &[f32], width: usize) -> Vec<f32> {
        let mut partial = vec![0f32; self.segments() * width];
        for (s, out) in partial.chunks_exact_mut(width).enumerate() {
            for &k in &self.order[self.seg_start[s] as usize..self.seg_start[s + 1] as usize] {
                let row = &g[k as usize * width..][..width];
                out.iter_mut().zip(row).for_each(|(o, x)| *o += x);
            }
        }
        let mut table = vec![0f32; self.rows() * width];
        for (r, out) in table.chunks_exact_mut(width).enumerate() {
            for s in self.row_seg[r] as usize..self.row_seg[r + 1] as usize {
                out.iter_mut().zip(&partial[s * width..][..width]).for_each(|(o, x)| *o += x);
            }
        }
        table
    }
}

/// The lookup and its gradient as candle ops, on a GPU only (the CPU keeps candle's lookup).
#[cfg(feature = "cuda")]
mod gpu {
    use std::sync::Arc;

    use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

    use super::RowGroups;

    /// The lookup: candle's gather forward, our backward.
    pub(super) struct Lookup {
        /// The flat u32 ids, on the table's device.
        pub(super) ids: Tensor,
        pub(super) groups: Arc<RowGroups>,
    }

    impl CustomOp1 for Lookup {
        fn name(&self) -> &'static str {
            "embedding"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            candle_core::bail!("embedding: the CPU takes candle's lookup (lookup::embedding)")
        }

        fn cuda_fwd(
            &self,
            s: &candle_core::CudaStorage,
            l: &Layout,
        ) -> Result<(candle_core::CudaStorage, Shape)> {
            use candle_core::backend::BackendStorage;
            let (ids, ids_layout) = self.ids.storage_and_layout();
            let candle_core::Storage::Cuda(ids) = &*ids else {
                candle_core::bail!("embedding: the ids are not on the table's GPU");
            };
            let out = s.index_select(ids, l, ids_layout, 0)?;
            Ok((out, Shape::from((self.ids.elem_count(), l.dims()[1]))))
        }

        fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
            let op = LookupGrad { groups: self.groups.clone() };
            Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&op)?))
        }
    }

    /// The table's gradient from the lookup's output gradient.
    struct LookupGrad {
        groups: Arc<RowGroups>,
    }

    impl CustomOp1 for LookupGrad {
        fn name(&self) -> &'static str {
            "embedding-grad"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            candle_core::bail!("embedding-grad: the CPU takes candle's lookup (lookup::embedding)")
        }

        fn cuda_fwd(
            &self,
            s: &candle_core::CudaStorage,
            l: &Layout,
        ) -> Result<(candle_core::CudaStorage, Shape)> {
            let width = l.dims()[1];
            let shape = Shape::from((self.groups.rows(), width));
            crate::cuda_kernels::run(self.name(), [(s, l)], &shape, |d, [g]| {
                super::table_grad(d, g, width, &self.groups)
            })
        }
    }
}

/// `values` as the bits of F32 cells, for a kernel that reads them as `uint32_t`.
#[cfg(any(test, feature = "cuda"))]
fn as_cells(values: &[u32]) -> Vec<f32> {
    values.iter().map(|&v| f32::from_bits(v)).collect()
}

/// [`RowGroups::table_grad`] on `k`: the partial sums of the segments, then each table row's.
#[cfg(any(test, feature = "cuda"))]
pub(crate) fn table_grad<K: Kernels>(
    k: &K,
    g: Operand,
    width: usize,
    groups: &RowGroups,
) -> Result<K::Buffer> {
    let op = "embedding-grad";
    if width == 0 || g.len != groups.order.len() * width {
        candle_core::bail!(
            "{op}: {} elements are not {} rows of {width}",
            g.len,
            groups.order.len()
        );
    }
    let (segments, rows) = (groups.segments(), groups.rows());
    let order = k.upload(&as_cells(&groups.order))?;
    let seg_start = k.upload(&as_cells(&groups.seg_start))?;
    let row_seg = k.upload(&as_cells(&groups.row_seg))?;
    let partial = k.alloc(segments.max(1) * width)?;
    let out = k.alloc(rows * width)?;
    let args = [
        g.arg(),
        Arg::U32(width as u32),
        k.operand(&order).arg(),
        k.operand(&seg_start).arg(),
        Arg::U64(segments as u64),
        k.operand(&partial).arg(),
    ];
    // SAFETY: embedding_segments_f32(g, width, order, seg_start, segments, partial); order's
    // entries are rows of g, seg_start holds segments + 1 offsets into order, partial
    // `segments` rows of width.
    unsafe { k.launch("embedding_segments_f32", Launch::blocks(segments as u64), &args) }?;
    let args = [
        k.operand(&partial).arg(),
        Arg::U32(width as u32),
        k.operand(&row_seg).arg(),
        Arg::U64(rows as u64),
        k.operand(&out).arg(),
    ];
    // SAFETY: embedding_rows_f32(partial, width, row_seg, rows, out); row_seg holds rows + 1
    // offsets into partial's segments, out rows of width.
    unsafe { k.launch("embedding_rows_f32", Launch::blocks(rows as u64), &args) }?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The grouping puts every looked-up row under the table row it reads, in order, cut into
    /// segments of at most SEGMENT_ROWS; the gradient adds each output row into its table row.
    #[test]
    fn groups_add_each_looked_up_row_into_its_table_row() {
        let ids: Vec<u32> =
            (0..100).map(|k| if k % 3 == 0 { 4 } else { (k * 7 % 5) as u32 }).collect();
        let groups = RowGroups::new(&ids, 6).unwrap();
        assert_eq!(groups.order.len(), 100);
        for r in 0..6 {
            let segs = groups.row_seg[r] as usize..groups.row_seg[r + 1] as usize;
            let rows: Vec<u32> = segs
                .flat_map(|s| {
                    groups.order[groups.seg_start[s] as usize..groups.seg_start[s + 1] as usize]
                        .to_vec()
                })
                .collect();
            let want: Vec<u32> = (0..100).filter(|&k| ids[k as usize] as usize == r).collect();
            assert_eq!(rows, want, "table row {r}");
        }
        assert!(groups.seg_start.windows(2).all(|w| w[1] > w[0] && w[1] - w[0] <= SEGMENT_ROWS));
        let width = 3;
        let g: Vec<f32> = (0..100 * width).map(|i| i as f32).collect();
        let table = groups.table_grad(&g, width);
        for r in 0..6 {
            for j in 0..width {
                let want: f32 =
                    (0..100).filter(|&k| ids[k] as usize == r).map(|k| g[k * width + j]).sum();
                assert_eq!(table[r * width + j], want);
            }
        }
        let e = RowGroups::new(&[6], 6).err().unwrap().to_string();
        assert!(e.contains("embedding: id 6 is outside the table's 6 rows"), "{e}");
    }
}
