// kernels/train.cu compiled for the CPU (kernels/emulate.hpp): one C entry point per kernel,
// `emu_<kernel>(grid, block, <the kernel's own arguments>)`, that src/kernel_emulation.rs calls
// with the launch shapes of src/cuda_kernels.rs. Built by build.rs into every build; only tests
// call it.
#define TEVATRON_EMULATE
#include "train.cu"

#define EMULATE(NAME, PARAMS, ARGS)                                                           \
  extern "C" void emu_##NAME(unsigned grid, unsigned block, PARAMS) {                         \
    emulate::launch(grid, block, [&] { NAME ARGS; });                                         \
  }
#define P(...) __VA_ARGS__

EMULATE(dropout_f32,
        P(const float *x, float *y, uint64_t n, uint64_t base, uint64_t threshold, float scale),
        (x, y, n, base, threshold, scale))
EMULATE(dropout_f64,
        P(const double *x, double *y, uint64_t n, uint64_t base, uint64_t threshold, float scale),
        (x, y, n, base, threshold, scale))
EMULATE(adamw_f32,
        P(const float *w, const float *g, const float *mv, float *out, uint64_t n, float b1,
          float one_minus_b1, float b2, float one_minus_b2, float eps, float bc2_sqrt,
          float step_size, float decay),
        (w, g, mv, out, n, b1, one_minus_b1, b2, one_minus_b2, eps, bc2_sqrt, step_size, decay))
EMULATE(layer_norm_f32,
        P(const float *x, const float *w, const float *b, float *y, uint64_t rows, uint32_t h,
          float eps),
        (x, w, b, y, rows, h, eps))
EMULATE(layer_norm_grad_f32,
        P(const float *x, const float *w, const float *g, float *dx, float *stats, uint64_t rows,
          uint32_t h, float eps),
        (x, w, g, dx, stats, rows, h, eps))
EMULATE(layer_norm_param_partials_f32,
        P(const float *x, const float *g, const float *stats, float *partial, uint64_t rows,
          uint32_t h, uint64_t chunk_rows, uint32_t column_blocks),
        (x, g, stats, partial, rows, h, chunk_rows, column_blocks))
EMULATE(column_partials_f32,
        P(const float *g, float *partial, uint64_t rows, uint32_t width, uint64_t chunk_rows,
          uint32_t column_blocks),
        (g, partial, rows, width, chunk_rows, column_blocks))
EMULATE(column_chunks_sum_f32, P(const float *partial, float *out, uint64_t chunks, uint32_t width),
        (partial, out, chunks, width))
EMULATE(masked_softmax_f32,
        P(const float *x, const float *bias, float *y, uint64_t rows, uint32_t n,
          uint64_t rows_per_batch, uint64_t queries),
        (x, bias, y, rows, n, rows_per_batch, queries))
EMULATE(softmax_grad_f32, P(const float *y, const float *g, float *dx, uint64_t rows, uint32_t n),
        (y, g, dx, rows, n))
EMULATE(gelu_f32, P(const float *x, float *y, uint64_t n), (x, y, n))
EMULATE(gelu_grad_f32, P(const float *x, const float *g, float *dx, uint64_t n), (x, g, dx, n))
EMULATE(bias_add_f32, P(const float *y, const float *b, float *out, uint64_t n, uint32_t h),
        (y, b, out, n, h))
EMULATE(rms_norm_f32,
        P(const float *x, const float *w, float *y, uint64_t rows, uint32_t h, float eps),
        (x, w, y, rows, h, eps))
EMULATE(rms_norm_grad_f32,
        P(const float *x, const float *w, const float *g, float *dx, float *stats, uint64_t rows,
          uint32_t h, float eps),
        (x, w, g, dx, stats, rows, h, eps))
EMULATE(rms_norm_param_partials_f32,
        P(const float *x, const float *g, const float *stats, float *partial, uint64_t rows,
          uint32_t h, uint64_t chunk_rows, uint32_t column_blocks),
        (x, g, stats, partial, rows, h, chunk_rows, column_blocks))
EMULATE(rotary_f32,
        P(const float *x, const float *cos, const float *sin, float *y, uint64_t pairs,
          uint32_t width, uint32_t len, uint32_t dim, float sign),
        (x, cos, sin, y, pairs, width, len, dim, sign))
EMULATE(swiglu_f32, P(const float *g, const float *u, float *y, uint64_t n), (g, u, y, n))
EMULATE(swiglu_grad_f32, P(const float *g, const float *u, const float *dy, float *out, uint64_t n),
        (g, u, dy, out, n))
