// kernels/train.cu compiled for the CPU (kernels/emulate.hpp), with one C entry point that
// launches a kernel by name as the CUDA driver's cuLaunchKernel does: a grid, a block and an
// array of pointers to the parameters. Unlike the driver, it checks each parameter's kind
// (pointer, unsigned integer, float) and size against the kernel's signature, so a Rust launch
// that would pass a u32 where the kernel takes a u64, or arguments out of order, fails in
// `cargo test` instead of reading garbage on a GPU. Built by build.rs into every build; only
// tests call it (src/kernel_emulation.rs).
#define TEVATRON_EMULATE
#include "train.cu"

#include <cstddef>
#include <cstring>
#include <type_traits>
#include <utility>

namespace {
/// 'p' for a pointer, 'f' for a float, 'u' for an unsigned integer: the kinds Rust passes.
template <class T>
constexpr char kind() {
  if constexpr (std::is_pointer_v<T>) {
    return 'p';
  } else if constexpr (std::is_floating_point_v<T>) {
    return 'f';
  } else {
    static_assert(std::is_unsigned_v<T>, "kernel parameters are pointers, floats or unsigned");
    return 'u';
  }
}

/// Calls `k` with the values `params` point at, taking them as the kernel's own types.
template <class... A, std::size_t... I>
void call(void (*k)(A...), void **params, std::index_sequence<I...>) {
  k(*static_cast<A *>(params[I])...);
}

/// 0 after running `k` with `params`; -1 if their count, or i + 1 if parameter i's kind or
/// size, differs from the kernel's signature.
template <class... A>
int run(void (*k)(A...), unsigned grid, unsigned block, void **params, const char *kinds,
        const unsigned char *sizes, std::size_t n) {
  if (n != sizeof...(A)) return -1;
  const char want_kinds[] = {kind<A>()...};
  const std::size_t want_sizes[] = {sizeof(A)...};
  for (std::size_t i = 0; i < n; ++i)
    if (kinds[i] != want_kinds[i] || sizes[i] != want_sizes[i]) return int(i) + 1;
  emulate::launch(grid, block, [&] { call(k, params, std::index_sequence_for<A...>{}); });
  return 0;
}

using Runner = int (*)(unsigned, unsigned, void **, const char *, const unsigned char *,
                       std::size_t);

struct Entry {
  const char *name;
  Runner run;
};

#define ENTRY(K)                                                                               \
  Entry {                                                                                      \
    #K, [](unsigned g, unsigned b, void **p, const char *k, const unsigned char *s,            \
           std::size_t n) { return run(K, g, b, p, k, s, n); }                                 \
  }

const Entry KERNELS[] = {
    ENTRY(dropout_f32),
    ENTRY(dropout_f64),
    ENTRY(adamw_f32),
    ENTRY(layer_norm_f32),
    ENTRY(layer_norm_grad_f32),
    ENTRY(layer_norm_param_partials_f32),
    ENTRY(column_partials_f32),
    ENTRY(column_chunks_sum_f32),
    ENTRY(masked_softmax_f32),
    ENTRY(softmax_grad_f32),
    ENTRY(gelu_f32),
    ENTRY(gelu_grad_f32),
    ENTRY(bias_add_f32),
    ENTRY(rms_norm_f32),
    ENTRY(rms_norm_grad_f32),
    ENTRY(rms_norm_param_partials_f32),
    ENTRY(rotary_f32),
    ENTRY(swiglu_f32),
    ENTRY(swiglu_grad_f32),
    ENTRY(squares_partials_f32),
    ENTRY(sum_f32),
    ENTRY(embedding_segments_f32),
    ENTRY(embedding_rows_f32),
};
}  // namespace

/// Launches kernel `name` over `grid` blocks of `block` threads with `n` parameters
/// (`params[i]` points at parameter i, of kind `kinds[i]` and `sizes[i]` bytes). Returns 0, -2
/// for an unknown kernel, or `run`'s mismatch code.
extern "C" int emu_launch(const char *name, unsigned grid, unsigned block, void **params,
                          const char *kinds, const unsigned char *sizes, std::size_t n) {
  for (const Entry &e : KERNELS)
    if (std::strcmp(e.name, name) == 0) return e.run(grid, block, params, kinds, sizes, n);
  return -2;
}
