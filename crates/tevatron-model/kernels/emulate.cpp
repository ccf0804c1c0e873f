// kernels/train.cu compiled for the CPU (kernels/emulate.hpp), with one C entry point that
// launches a kernel by name as the CUDA driver's cuLaunchKernel does: a grid, a block and an
// array of pointers to the parameters. Unlike the driver, it checks each parameter's kind
// (pointer, unsigned integer, float) and size against the kernel's signature, so a Rust launch
// that would pass a u32 where the kernel takes a u64, or arguments out of order, fails in
// `cargo test` instead of reading garbage on a GPU. Built by build.rs into every build; only
// tests call it (src/kernel_emulation.rs).
#define TEVATRON_EMULATE
#include "train.cu"

namespace {
const emulate::Entry KERNELS[] = {
    ENTRY(dropout_f32),
    ENTRY(dropout_f64),
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
    ENTRY(embedding_segments_f32),
    ENTRY(embedding_rows_f32),
    ENTRY(attention_f32),
    ENTRY(attention_grad_q_f32),
    ENTRY(attention_grad_kv_f32),
};
}  // namespace

/// Launches kernel `name` of this crate's table (`emulate::launch_by_name`).
extern "C" int emu_launch(const char *name, unsigned grid, unsigned block, void **params,
                          const char *kinds, const unsigned char *sizes, std::size_t n) {
  return emulate::launch_by_name(KERNELS, name, grid, block, params, kinds, sizes, n);
}
