// The optimizer's kernels for the GPU, compiled to PTX by build.rs: the AdamW update and the
// global gradient norm. The same source compiles as C++ against tevatron-model's
// kernels/emulate.hpp (TEVATRON_EMULATE, see kernels/emulate.cpp), where they run on the CPU in
// `cargo test`.
#include "common.cuh"

// One AdamW step over a parameter in place (src/fused_adamw.rs), as torch.optim.AdamW computes
// it in F32, of the gradient times grad_scale (clipping's coefficient, as clip_grad_norm_ scales
// it first): m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2 (1 - b computed in double, as torch
// does); w = w * decay - step_size * m / (sqrt(v) / bc2_sqrt + eps). Each thread reads its
// elements of w, g, m and v, then writes the new w, m and v over them.
KERNEL void adamw_f32(float *w, const float *g, float *m, float *v, uint64_t n, float b1,
                      float one_minus_b1, float b2, float one_minus_b2, float eps, float bc2_sqrt,
                      float step_size, float decay, float grad_scale) {
  for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n;
       i += (uint64_t)blockDim.x * gridDim.x) {
    float gi = g[i] * grad_scale;
    float mi = m[i] * b1 + gi * one_minus_b1;
    float vi = v[i] * b2 + gi * gi * one_minus_b2;
    float denom = sqrtf(vi) / bc2_sqrt + eps;
    w[i] = w[i] * decay - mi / denom * step_size;
    m[i] = mi;
    v[i] = vi;
  }
}

// ---- The global gradient norm (src/grad_norm.rs) ----
//
// The sum of the squares of several gradients in two fixed-shape passes, so the same bits every
// run: squares_partials_f32 over one gradient with a fixed grid, each warp's sum (accumulated in
// double) into its slot of `partial`, warps in grid order; then sum_f32, one warp, over all the
// gradients' partials.

__device__ __forceinline__ double warp_sum_f64(double v) {
  for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
  return v;
}

KERNEL void squares_partials_f32(const float *g, uint64_t n, float *partial) {
  double s = 0.0;
  for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n;
       i += (uint64_t)blockDim.x * gridDim.x) {
    double v = g[i];
    s += v * v;
  }
  s = warp_sum_f64(s);
  if (LANE == 0) partial[(blockIdx.x * (uint64_t)blockDim.x + threadIdx.x) / 32] = (float)s;
}

// out[0] = the sum of x's n values, accumulated in double by the first warp in a fixed order.
KERNEL void sum_f32(const float *x, uint64_t n, float *out) {
  if (blockIdx.x != 0 || threadIdx.x >= 32) return;
  double s = 0.0;
  for (uint64_t i = LANE; i < n; i += 32) s += x[i];
  s = warp_sum_f64(s);
  if (LANE == 0) out[0] = (float)s;
}
