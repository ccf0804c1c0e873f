// kernels/optim.cu compiled for the CPU against tevatron-model's kernels/emulate.hpp, with one C
// entry point that launches a kernel by name and checks its parameters against the kernel's
// signature (see that crate's kernels/emulate.cpp). Built by build.rs; only tests call it.
#define TEVATRON_EMULATE
#include "optim.cu"

namespace {
const emulate::Entry KERNELS[] = {
    ENTRY(adamw_f32),
    ENTRY(squares_partials_f32),
    ENTRY(sum_f32),
};
}  // namespace

/// Launches kernel `name` of this crate's table (`emulate::launch_by_name`).
extern "C" int emu_optim_launch(const char *name, unsigned grid, unsigned block, void **params,
                                const char *kinds, const unsigned char *sizes, std::size_t n) {
  return emulate::launch_by_name(KERNELS, name, grid, block, params, kinds, sizes, n);
}
