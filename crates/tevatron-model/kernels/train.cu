// Training kernels for the GPU, compiled to PTX by build.rs.
//
// Counter-based dropout (src/backbone/counter_dropout.rs): element i is kept when the 32-bit
// half of SplitMix64 draw i / 2 after state `base` (low half for even i, high for odd) is at
// least `threshold`, exactly the decisions `SplitMix64::keep_mask` draws on the CPU. Kept
// values are scaled in float (double for f64) and rounded back to the element type.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

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
  extern "C" __global__ void NAME(const T *x, T *y, uint64_t n, uint64_t base,                \
                                  uint64_t threshold, float scale) {                          \
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n;                 \
         i += (uint64_t)blockDim.x * gridDim.x) {                                             \
      y[i] = keep(base, threshold, i) ? STORE(LOAD(x[i]) * (ACC)scale) : STORE((ACC)0);       \
    }                                                                                         \
  }

#define SAME(v) (v)
DROPOUT(dropout_f32, float, float, SAME, SAME)
DROPOUT(dropout_f64, double, double, SAME, SAME)
DROPOUT(dropout_bf16, __nv_bfloat16, float, __bfloat162float, __float2bfloat16)
DROPOUT(dropout_f16, __half, float, __half2float, __float2half)

// One AdamW step over a parameter (src/adamw.rs), as torch.optim.AdamW computes it in F32:
// m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2 (1 - b computed in double, as torch does); w = w * decay - step_size * m / (sqrt(v) /
// bc2_sqrt + eps). Reads w, g and the moments packed as [m | v]; writes [w | m | v] to out.
extern "C" __global__ void adamw_f32(const float *w, const float *g, const float *mv, float *out,
                                     uint64_t n, float b1, float one_minus_b1, float b2,
                                     float one_minus_b2, float eps, float bc2_sqrt,
                                     float step_size, float decay) {
  for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n;
       i += (uint64_t)blockDim.x * gridDim.x) {
    float gi = g[i];
    float m = mv[i] * b1 + gi * one_minus_b1;
    float v = mv[n + i] * b2 + gi * gi * one_minus_b2;
    float denom = sqrtf(v) / bc2_sqrt + eps;
    out[i] = w[i] * decay - m / denom * step_size;
    out[n + i] = m;
    out[2 * n + i] = v;
  }
}
