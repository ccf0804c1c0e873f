// Training kernels for the GPU, compiled to PTX by build.rs.
//
// Counter-based dropout (src/backbone/dropout.rs): element i is kept when the 32-bit
// half of SplitMix64 draw i / 2 after state `base` (low half for even i, high for odd) is at
// least `threshold`, exactly the decisions `SplitMix64::keep_mask` draws on the CPU. Kept
// values are scaled in float (double for f64) and rounded back to the element type.
//
// The same source also compiles as C++ against kernels/emulate.hpp (TEVATRON_EMULATE, see
// kernels/emulate.cpp), where the F32 and F64 kernels run on the CPU in `cargo test`; the
// half-precision dropouts need CUDA's types and stay GPU-only.
#include "common.cuh"

__device__ __forceinline__ uint64_t finalize(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

__device__ __forceinline__ bool keep(uint64_t base, uint64_t threshold, uint64_t i) {
  uint64_t bits = finalize(base + (i / 2 + 1) * 0x9e3779b97f4a7c15ULL);
  uint64_t half = (i & 1) ? (bits >> 32) : (bits & 0xffffffffULL);
  return half >= threshold;
}

#define DROPOUT(NAME, T, ACC, LOAD, STORE)                                                     \
  KERNEL void NAME(const T *x, T *y, uint64_t n, uint64_t base,                \
                                  uint64_t threshold, float scale) {                          \
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n;                 \
         i += (uint64_t)blockDim.x * gridDim.x) {                                             \
      y[i] = keep(base, threshold, i) ? STORE(LOAD(x[i]) * (ACC)scale) : STORE((ACC)0);       \
    }                                                                                         \
  }

#define SAME(v) (v)
DROPOUT(dropout_f32, float, float, SAME, SAME)
DROPOUT(dropout_f64, double, double, SAME, SAME)
#ifndef TEVATRON_EMULATE
DROPOUT(dropout_bf16, __nv_bfloat16, float, __bfloat162float, __float2bfloat16)
DROPOUT(dropout_f16, __half, float, __half2float, __float2half)
#endif

// ---- Row-wise training ops in F32 (the CPU twins: src/backbone/norm.rs, activation.rs, rotary.rs, attention/mod.rs, linear.rs) ----
//
// One warp per row: each lane takes every 32nd element and the warp combines the lanes'
// partial results with butterfly shuffles, so all lanes end with the same total. A launch
// covers rows with a grid-stride loop over warps (`Launch::rows` in src/cuda_kernels.rs).

__device__ __forceinline__ float warp_sum(float v) {
  for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int m = 16; m > 0; m >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, m));
  return v;
}

#define FOR_EACH_ROW(r, rows)                                                                 \
  for (uint64_t r = (blockIdx.x * (uint64_t)blockDim.x + threadIdx.x) / 32; r < (rows);       \
       r += (uint64_t)gridDim.x * blockDim.x / 32)

// Mean and 1/std of a row of h, as the CPU's row_stats: the variance from the centred values.
__device__ __forceinline__ void row_stats(const float *x, uint32_t h, float eps, float *mean,
                                          float *rstd) {
  float s = 0.0f;
  for (uint32_t j = LANE; j < h; j += 32) s += x[j];
  float m = warp_sum(s) / (float)h;
  float v = 0.0f;
  for (uint32_t j = LANE; j < h; j += 32) v += (x[j] - m) * (x[j] - m);
  *mean = m;
  *rstd = 1.0f / sqrtf(warp_sum(v) / (float)h + eps);
}

// y = (x - mean) / sqrt(var + eps) * w + b over rows of h.
KERNEL void layer_norm_f32(const float *x, const float *w, const float *b, float *y,
                           uint64_t rows, uint32_t h, float eps) {
  FOR_EACH_ROW(r, rows) {
    const float *xr = x + r * h;
    float mean, rstd;
    row_stats(xr, h, eps, &mean, &rstd);
    for (uint32_t j = LANE; j < h; j += 32) y[r * h + j] = (xr[j] - mean) * rstd * w[j] + b[j];
  }
}

// Layer norm's input gradient, dx = rstd (g w - mean(g w) - xhat mean(g w xhat)), and each
// row's (mean, rstd) into stats for the parameter gradients (layer_norm_param_partials_f32).
KERNEL void layer_norm_grad_f32(const float *x, const float *w, const float *g, float *dx,
                                float *stats, uint64_t rows, uint32_t h, float eps) {
  FOR_EACH_ROW(r, rows) {
    const float *xr = x + r * h, *gr = g + r * h;
    float mean, rstd;
    row_stats(xr, h, eps, &mean, &rstd);
    float m1 = 0.0f, m2 = 0.0f;
    for (uint32_t j = LANE; j < h; j += 32) {
      float dxhat = gr[j] * w[j];
      m1 += dxhat;
      m2 += dxhat * (xr[j] - mean) * rstd;
    }
    m1 = warp_sum(m1) / (float)h;
    m2 = warp_sum(m2) / (float)h;
    for (uint32_t j = LANE; j < h; j += 32)
      dx[r * h + j] = rstd * (gr[j] * w[j] - m1 - (xr[j] - mean) * rstd * m2);
    if (LANE == 0) {
      stats[2 * r] = mean;
      stats[2 * r + 1] = rstd;
    }
  }
}

// Column sums in two launches with a fixed order (so the same bits every run): the rows are cut
// into chunks of `chunk_rows`; thread (chunk, column) sums its chunk, and column_chunks_sum_f32
// adds the chunks' partials in chunk order. Blocks are numbered chunk-major over
// `column_blocks` blocks per chunk, so that a warp reads one row's consecutive columns.
#define FOR_COLUMN_OF_CHUNK(j, chunk, width, column_blocks)                                   \
  uint32_t j = (blockIdx.x % (column_blocks)) * blockDim.x + threadIdx.x;                    \
  uint64_t chunk = blockIdx.x / (column_blocks);                                              \
  if (j >= (width)) return;

// Per-chunk sums of g * xhat (dw, columns 0..h) and g (db, columns h..2h) of layer norm.
KERNEL void layer_norm_param_partials_f32(const float *x, const float *g, const float *stats,
                                          float *partial, uint64_t rows, uint32_t h,
                                          uint64_t chunk_rows, uint32_t column_blocks) {
  FOR_COLUMN_OF_CHUNK(j, chunk, h, column_blocks)
  uint64_t end = (chunk + 1) * chunk_rows < rows ? (chunk + 1) * chunk_rows : rows;
  float dw = 0.0f, db = 0.0f;
  for (uint64_t r = chunk * chunk_rows; r < end; ++r) {
    float gv = g[r * h + j];
    dw += gv * (x[r * h + j] - stats[2 * r]) * stats[2 * r + 1];
    db += gv;
  }
  partial[chunk * 2 * h + j] = dw;
  partial[chunk * 2 * h + h + j] = db;
}

// Per-chunk sums of the columns of g (rows of `width`).
KERNEL void column_partials_f32(const float *g, float *partial, uint64_t rows, uint32_t width,
                                uint64_t chunk_rows, uint32_t column_blocks) {
  FOR_COLUMN_OF_CHUNK(j, chunk, width, column_blocks)
  uint64_t end = (chunk + 1) * chunk_rows < rows ? (chunk + 1) * chunk_rows : rows;
  float s = 0.0f;
  for (uint64_t r = chunk * chunk_rows; r < end; ++r) s += g[r * width + j];
  partial[chunk * width + j] = s;
}

// out[j] = the sum over chunks of partial[chunk * width + j], in chunk order.
KERNEL void column_chunks_sum_f32(const float *partial, float *out, uint64_t chunks,
                                  uint32_t width) {
  for (uint64_t j = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; j < width;
       j += (uint64_t)blockDim.x * gridDim.x) {
    float s = 0.0f;
    for (uint64_t c = 0; c < chunks; ++c) s += partial[c * width + j];
    out[j] = s;
  }
}

// softmax(x + bias) over rows of n. Rows come in batches of `rows_per_batch` (heads x queries);
// each batch has `queries` bias rows (1 for a padding mask, one per query for a causal one),
// and row r reads bias row (r / rows_per_batch) * queries + (r % rows_per_batch) % queries.
KERNEL void masked_softmax_f32(const float *x, const float *bias, float *y, uint64_t rows,
                               uint32_t n, uint64_t rows_per_batch, uint64_t queries) {
  FOR_EACH_ROW(r, rows) {
    const float *xr = x + r * n;
    const float *br = bias + ((r / rows_per_batch) * queries + (r % rows_per_batch) % queries) * n;
    float *yr = y + r * n;
    float m = -INFINITY;
    for (uint32_t j = LANE; j < n; j += 32) m = fmaxf(m, xr[j] + br[j]);
    m = warp_max(m);
    float s = 0.0f;
    for (uint32_t j = LANE; j < n; j += 32) {
      float e = expf(xr[j] + br[j] - m);
      yr[j] = e;
      s += e;
    }
    float inv = 1.0f / warp_sum(s);
    for (uint32_t j = LANE; j < n; j += 32) yr[j] *= inv;
  }
}

// The softmax's input gradient from its output y: dx = y (g - sum(y g)).
KERNEL void softmax_grad_f32(const float *y, const float *g, float *dx, uint64_t rows,
                             uint32_t n) {
  FOR_EACH_ROW(r, rows) {
    const float *yr = y + r * n, *gr = g + r * n;
    float dot = 0.0f;
    for (uint32_t j = LANE; j < n; j += 32) dot += yr[j] * gr[j];
    dot = warp_sum(dot);
    for (uint32_t j = LANE; j < n; j += 32) dx[r * n + j] = yr[j] * (gr[j] - dot);
  }
}

// Exact GELU, x Phi(x), and its input gradient g (Phi(x) + x phi(x)).
KERNEL void gelu_f32(const float *x, float *y, uint64_t n) {
  for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n;
       i += (uint64_t)blockDim.x * gridDim.x) {
    float v = x[i];
    y[i] = 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
  }
}

KERNEL void gelu_grad_f32(const float *x, const float *g, float *dx, uint64_t n) {
  for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n;
       i += (uint64_t)blockDim.x * gridDim.x) {
    float v = x[i];
    float cdf = 0.5f * (1.0f + erff(v * 0.70710678118654752f));
    dx[i] = g[i] * (cdf + v * 0.39894228040143268f * expf(-0.5f * v * v));
  }
}

// out = y + b, with b (h) broadcast over the rows of y.
KERNEL void bias_add_f32(const float *y, const float *b, float *out, uint64_t n, uint32_t h) {
  for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n;
       i += (uint64_t)blockDim.x * gridDim.x)
    out[i] = y[i] + b[i % h];
}

// ---- Decoder ops in F32: RMSNorm, rotary positions, SwiGLU ----

// y = x / sqrt(mean(x^2) + eps) * w over rows of h.
KERNEL void rms_norm_f32(const float *x, const float *w, float *y, uint64_t rows, uint32_t h,
                         float eps) {
  FOR_EACH_ROW(r, rows) {
    const float *xr = x + r * h;
    float s = 0.0f;
    for (uint32_t j = LANE; j < h; j += 32) s += xr[j] * xr[j];
    float rstd = 1.0f / sqrtf(warp_sum(s) / (float)h + eps);
    for (uint32_t j = LANE; j < h; j += 32) y[r * h + j] = xr[j] * rstd * w[j];
  }
}

// RMSNorm's input gradient, dx = rstd (g w - xhat mean(g w xhat)), and each row's rstd into
// stats for the weight gradient (rms_norm_param_partials_f32).
KERNEL void rms_norm_grad_f32(const float *x, const float *w, const float *g, float *dx,
                              float *stats, uint64_t rows, uint32_t h, float eps) {
  FOR_EACH_ROW(r, rows) {
    const float *xr = x + r * h, *gr = g + r * h;
    float s = 0.0f;
    for (uint32_t j = LANE; j < h; j += 32) s += xr[j] * xr[j];
    float rstd = 1.0f / sqrtf(warp_sum(s) / (float)h + eps);
    float dot = 0.0f;
    for (uint32_t j = LANE; j < h; j += 32) dot += gr[j] * w[j] * (xr[j] * rstd);
    dot = warp_sum(dot) / (float)h;
    for (uint32_t j = LANE; j < h; j += 32)
      dx[r * h + j] = rstd * (gr[j] * w[j] - xr[j] * rstd * dot);
    if (LANE == 0) stats[r] = rstd;
  }
}

// Per-chunk sums of g * xhat, RMSNorm's weight gradient.
KERNEL void rms_norm_param_partials_f32(const float *x, const float *g, const float *stats,
                                        float *partial, uint64_t rows, uint32_t h,
                                        uint64_t chunk_rows, uint32_t column_blocks) {
  FOR_COLUMN_OF_CHUNK(j, chunk, h, column_blocks)
  uint64_t end = (chunk + 1) * chunk_rows < rows ? (chunk + 1) * chunk_rows : rows;
  float dw = 0.0f;
  for (uint64_t r = chunk * chunk_rows; r < end; ++r) dw += g[r * h + j] * (x[r * h + j] * stats[r]);
  partial[chunk * h + j] = dw;
}

// HF's rotary positions, x * cos + rotate_half(x) * sin, over rows of `width` (heads of `dim`
// side by side), row r at position r % len, cos and sin (len, dim). One thread per pair
// (j, j + dim / 2) of a head; `sign` -1 turns each pair back (the backward).
KERNEL void rotary_f32(const float *x, const float *cos, const float *sin, float *y,
                       uint64_t pairs, uint32_t width, uint32_t len, uint32_t dim, float sign) {
  uint32_t half = dim / 2, heads = width / dim;
  for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < pairs;
       i += (uint64_t)blockDim.x * gridDim.x) {
    uint64_t j = i % half, t = i / half;
    uint64_t r = t / heads, at = r * width + (t % heads) * dim;
    const float *c = cos + (r % len) * dim, *s = sin + (r % len) * dim;
    float a = x[at + j], b = x[at + half + j];
    y[at + j] = a * c[j] - b * (sign * s[j]);
    y[at + half + j] = b * c[half + j] + a * (sign * s[half + j]);
  }
}

// silu(gate) * up, and its gradients [d gate | d up] from dy.
KERNEL void swiglu_f32(const float *g, const float *u, float *y, uint64_t n) {
  for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n;
       i += (uint64_t)blockDim.x * gridDim.x)
    y[i] = g[i] * (1.0f / (1.0f + expf(-g[i]))) * u[i];
}

KERNEL void swiglu_grad_f32(const float *g, const float *u, const float *dy, float *out,
                            uint64_t n) {
  for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n;
       i += (uint64_t)blockDim.x * gridDim.x) {
    float s = 1.0f / (1.0f + expf(-g[i]));
    out[i] = dy[i] * u[i] * s * (1.0f + g[i] * (1.0f - s));
    out[n + i] = dy[i] * g[i] * s;
  }
}

// The gradient of an embedding lookup, in two passes and a fixed order (no atomics). The host
// sorts the lookup's output rows by table row (`order`) and cuts each table row's run into
// segments (`seg_start`: segments + 1 offsets into `order`).
// partial[s] = the sum of the gradient rows order[seg_start[s]..seg_start[s + 1]], in order.
KERNEL void embedding_segments_f32(const float *g, uint32_t width, const uint32_t *order,
                                   const uint32_t *seg_start, uint64_t segments,
                                   float *partial) {
  for (uint64_t s = blockIdx.x; s < segments; s += gridDim.x) {
    for (uint32_t j = threadIdx.x; j < width; j += blockDim.x) {
      float sum = 0.0f;
      for (uint32_t k = seg_start[s]; k < seg_start[s + 1]; ++k)
        sum += g[(uint64_t)order[k] * width + j];
      partial[s * width + j] = sum;
    }
  }
}

// out[r] = the sum of partial[row_seg[r]..row_seg[r + 1]] in order (zero for a table row no
// lookup read), for each of the table's `rows` rows (`row_seg`: rows + 1 offsets).
KERNEL void embedding_rows_f32(const float *partial, uint32_t width, const uint32_t *row_seg,
                               uint64_t rows, float *out) {
  for (uint64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    for (uint32_t j = threadIdx.x; j < width; j += blockDim.x) {
      float sum = 0.0f;
      for (uint32_t s = row_seg[r]; s < row_seg[r + 1]; ++s) sum += partial[(uint64_t)s * width + j];
      out[r * width + j] = sum;
    }
  }
}

// ---- Fused attention, forward and backward (the CPU twin: src/backbone/attention/kernel.rs) ----
//
// softmax(q k^T * scale + mask) v without an l x l block anywhere: one warp per (sequence,
// query head, query row), its lanes holding the row's `dim` values (lane j takes columns
// j, j + 32, ...: up to ATTN_PER_LANE each, head widths up to 256), the keys taken one at a
// time with a running maximum and sum (FlashAttention's online softmax). Memory is linear in
// the sequence length; the backward recomputes the probabilities from three numbers per row.
// q is (b*l, query*dim) and k, v (b*l, kv*dim), row-major, head h in columns h*dim..; query
// head h reads key/value head h / (query/kv) (grouped-query attention). The additive mask is
// per key, (b, l) (mask_stride 0), or per query and key, (b, l, l) (mask_stride l): padding,
// causal and sliding-window masks alike. Dropout on the probabilities keeps entry (sequence,
// head, row, key) when `keep` of its index ((seq*query + head)*l + row)*l + key from `base`
// does, the byte mask the CPU draws from the same stream position; threshold 0 keeps all.
#define ATTN_PER_LANE 8

// Where query row r = (seq*query + head)*l + i of an attention reads: its q row, key/value
// row 0 of its head, its mask row (key t at mask_at + t), and its row index i.
struct AttnRow {
  uint64_t q_at, kv_at, mask_at;
  uint32_t i;
};

__device__ __forceinline__ AttnRow attn_row(uint64_t r, uint32_t l, uint32_t query, uint32_t kv,
                                            uint32_t dim, uint32_t mask_stride) {
  uint64_t task = r / l, seq = task / query, head = task % query;
  AttnRow a;
  a.i = (uint32_t)(r % l);
  a.q_at = (seq * l + a.i) * query * dim + head * dim;
  a.kv_at = seq * l * kv * dim + (head / (query / kv)) * dim;
  a.mask_at = seq * l * (mask_stride > 0 ? mask_stride : 1) + (uint64_t)a.i * mask_stride;
  return a;
}

// This lane's columns of a row of `dim` at x.
__device__ __forceinline__ void attn_load(const float *x, uint32_t dim, float *out) {
  for (uint32_t c = 0; c < ATTN_PER_LANE; ++c) {
    uint32_t j = LANE + 32 * c;
    out[c] = j < dim ? x[j] : 0.0f;
  }
}

// The dot product of this lane's columns `a` with row x, summed over the warp.
__device__ __forceinline__ float attn_dot(const float *a, const float *x, uint32_t dim) {
  float s = 0.0f;
  for (uint32_t c = 0; c < ATTN_PER_LANE; ++c) {
    uint32_t j = LANE + 32 * c;
    if (j < dim) s += a[c] * x[j];
  }
  return warp_sum(s);
}

// Query row `a`'s softmax statistics over its l keys: the maximum score and 1 / the sum of
// exp(score - maximum), so probability t is exp(score_t - max) * inv. (A row whose keys are all
// masked has equal scores and gets equal probabilities, as the CPU's softmax gives it.)
__device__ __forceinline__ void attn_stats(const float *qr, const float *k, const float *mask,
                                           AttnRow a, uint32_t l, uint32_t kw, uint32_t dim,
                                           float scale, float *max, float *inv) {
  float m = -INFINITY, s = 0.0f;
  for (uint32_t t = 0; t < l; ++t) {
    float x = attn_dot(qr, k + a.kv_at + (uint64_t)t * kw, dim) * scale + mask[a.mask_at + t];
    float m2 = fmaxf(m, x);
    s = s * expf(m - m2) + expf(x - m2);
    m = m2;
  }
  *max = m;
  *inv = 1.0f / s;
}

// ctx = softmax(q k^T * scale + mask) v (dropout on the probabilities), (b*l, query*dim).
KERNEL void attention_f32(const float *q, const float *k, const float *v, const float *mask,
                          float *ctx, uint32_t b, uint32_t l, uint32_t query, uint32_t kv,
                          uint32_t dim, uint32_t mask_stride, float scale, uint64_t base,
                          uint64_t threshold, float drop_scale) {
  uint32_t kw = kv * dim;
  FOR_EACH_ROW(r, (uint64_t)b * query * l) {
    AttnRow a = attn_row(r, l, query, kv, dim, mask_stride);
    float qr[ATTN_PER_LANE], acc[ATTN_PER_LANE] = {};
    attn_load(q + a.q_at, dim, qr);
    float m = -INFINITY, s = 0.0f;
    for (uint32_t t = 0; t < l; ++t) {
      const float *kt = k + a.kv_at + (uint64_t)t * kw, *vt = v + a.kv_at + (uint64_t)t * kw;
      float x = attn_dot(qr, kt, dim) * scale + mask[a.mask_at + t];
      float m2 = fmaxf(m, x), corr = expf(m - m2), e = expf(x - m2);
      s = s * corr + e;
      float w = keep(base, threshold, r * l + t) ? e * drop_scale : 0.0f;
      for (uint32_t c = 0; c < ATTN_PER_LANE; ++c) {
        uint32_t j = LANE + 32 * c;
        acc[c] = acc[c] * corr + (j < dim ? w * vt[j] : 0.0f);
      }
      m = m2;
    }
    for (uint32_t c = 0; c < ATTN_PER_LANE; ++c) {
      uint32_t j = LANE + 32 * c;
      if (j < dim) ctx[a.q_at + j] = acc[c] / s;
    }
  }
}

// The query gradient dq = scale * sum_t dS_t k_t, dS_t = P_t (dP_t - D), dP_t = (g . v_t) times
// the dropout mask and scale, D = g . ctx (the row's output gradient g and output ctx); and
// each row's (max, inv, D) into stats for attention_grad_kv_f32.
KERNEL void attention_grad_q_f32(const float *q, const float *k, const float *v,
                                 const float *mask, const float *g, const float *ctx, float *dq,
                                 float *stats, uint32_t b, uint32_t l, uint32_t query,
                                 uint32_t kv, uint32_t dim, uint32_t mask_stride, float scale,
                                 uint64_t base, uint64_t threshold, float drop_scale) {
  uint32_t kw = kv * dim;
  FOR_EACH_ROW(r, (uint64_t)b * query * l) {
    AttnRow a = attn_row(r, l, query, kv, dim, mask_stride);
    float qr[ATTN_PER_LANE], gr[ATTN_PER_LANE], acc[ATTN_PER_LANE] = {};
    attn_load(q + a.q_at, dim, qr);
    attn_load(g + a.q_at, dim, gr);
    float d = attn_dot(gr, ctx + a.q_at, dim), m, inv;
    attn_stats(qr, k, mask, a, l, kw, dim, scale, &m, &inv);
    for (uint32_t t = 0; t < l; ++t) {
      const float *kt = k + a.kv_at + (uint64_t)t * kw, *vt = v + a.kv_at + (uint64_t)t * kw;
      float p = expf(attn_dot(qr, kt, dim) * scale + mask[a.mask_at + t] - m) * inv;
      float dp = keep(base, threshold, r * l + t) ? attn_dot(gr, vt, dim) * drop_scale : 0.0f;
      float ds = p * (dp - d);
      for (uint32_t c = 0; c < ATTN_PER_LANE; ++c) {
        uint32_t j = LANE + 32 * c;
        if (j < dim) acc[c] += ds * kt[j];
      }
    }
    for (uint32_t c = 0; c < ATTN_PER_LANE; ++c) {
      uint32_t j = LANE + 32 * c;
      if (j < dim) dq[a.q_at + j] = acc[c] * scale;
    }
    if (LANE == 0) {
      stats[3 * r] = m;
      stats[3 * r + 1] = inv;
      stats[3 * r + 2] = d;
    }
  }
}

// The key and value gradients, one warp per (sequence, key/value head, key row t): over the
// query heads sharing it, in order, and their rows i, dk_t = scale * sum dS_it q_i and
// dv_t = sum P'_it g_i (P' the probability after dropout), from attention_grad_q_f32's stats.
// A fixed order and no atomics: the same bits on every run.
KERNEL void attention_grad_kv_f32(const float *q, const float *k, const float *v,
                                  const float *mask, const float *g, const float *stats,
                                  float *dk, float *dv, uint32_t b, uint32_t l, uint32_t query,
                                  uint32_t kv, uint32_t dim, uint32_t mask_stride, float scale,
                                  uint64_t base, uint64_t threshold, float drop_scale) {
  uint32_t kw = kv * dim, qw = query * dim, group = query / kv;
  FOR_EACH_ROW(r, (uint64_t)b * kv * l) {
    uint64_t task = r / l, seq = task / kv, head_kv = task % kv;
    uint32_t t = (uint32_t)(r % l);
    uint64_t at = (seq * l + t) * kw + head_kv * dim;
    uint64_t mask_block = seq * l * (mask_stride > 0 ? mask_stride : 1) + t;
    float kr[ATTN_PER_LANE], vr[ATTN_PER_LANE];
    float dkr[ATTN_PER_LANE] = {}, dvr[ATTN_PER_LANE] = {};
    attn_load(k + at, dim, kr);
    attn_load(v + at, dim, vr);
    for (uint32_t h = head_kv * group; h < (head_kv + 1) * group; ++h) {
      for (uint32_t i = 0; i < l; ++i) {
        uint64_t row = (seq * query + h) * l + i, q_at = (seq * l + i) * qw + h * dim;
        float x = attn_dot(kr, q + q_at, dim) * scale + mask[mask_block + (uint64_t)i * mask_stride];
        float p = expf(x - stats[3 * row]) * stats[3 * row + 1];
        bool kept = keep(base, threshold, row * l + t);
        float dp = kept ? attn_dot(vr, g + q_at, dim) * drop_scale : 0.0f;
        float ds = p * (dp - stats[3 * row + 2]), pk = kept ? p * drop_scale : 0.0f;
        for (uint32_t c = 0; c < ATTN_PER_LANE; ++c) {
          uint32_t j = LANE + 32 * c;
          if (j < dim) {
            dkr[c] += ds * q[q_at + j];
            dvr[c] += pk * g[q_at + j];
          }
        }
      }
    }
    for (uint32_t c = 0; c < ATTN_PER_LANE; ++c) {
      uint32_t j = LANE + 32 * c;
      if (j < dim) {
        dk[at + j] = dkr[c] * scale;
        dv[at + j] = dvr[c];
      }
    }
  }
}
