// A CPU stand-in for the CUDA features that the kernel sources use (kernels/train.cu here,
// crates/tevatron-train/kernels/optim.cu), so that the kernels' own source runs in `cargo test`
// on a machine without a GPU (src/kernel_emulation.rs of each crate).
//
// A launch runs its blocks one after another; each block runs as one OS thread per CUDA thread,
// so lanes really run concurrently. `__shfl_xor_sync` meets the other 31 lanes of its warp at a
// barrier, as the hardware exchanges registers in lock step: every lane of a warp must call it
// the same number of times (the CUDA rule for a full mask, which the kernels follow). Nothing
// else of CUDA is emulated: no shared memory, no `__syncthreads`, no atomics.
#pragma once

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};

namespace emulate {
/// What a warp's lanes exchange through: one slot per lane and the barrier they meet at.
struct Warp {
  std::barrier<> meet{32};
  uint64_t slot[32] = {};
};
inline thread_local dim3 thread_idx;
inline thread_local dim3 block_idx;
inline thread_local Warp *warp = nullptr;
// Per thread too, as the launch sets them for its own threads: launches from several test
// threads at once must not see each other's shapes.
inline thread_local dim3 block_dim;
inline thread_local dim3 grid_dim;
}  // namespace emulate

#define threadIdx (emulate::thread_idx)
#define blockIdx (emulate::block_idx)
#define blockDim (emulate::block_dim)
#define gridDim (emulate::grid_dim)
#define __global__
#define __device__
#define __forceinline__ inline

/// Lane `lane ^ mask`'s value of `v`, as the hardware's butterfly shuffle returns it.
template <class T>
T __shfl_xor_sync(unsigned, T v, int mask) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "one slot per lane");
  emulate::Warp &w = *emulate::warp;
  unsigned lane = threadIdx.x % 32;
  std::memcpy(&w.slot[lane], &v, sizeof(T));
  w.meet.arrive_and_wait();
  T other;
  std::memcpy(&other, &w.slot[lane ^ unsigned(mask)], sizeof(T));
  w.meet.arrive_and_wait();  // nobody overwrites a slot before every lane has read it
  return other;
}

inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }

namespace emulate {
/// Runs `kernel` over a 1-D grid of `grid` blocks of `block` threads (a multiple of 32).
template <class Kernel>
void launch(unsigned grid, unsigned block, Kernel kernel) {
  for (unsigned b = 0; b < grid; ++b) {
    std::vector<std::unique_ptr<Warp>> warps;
    for (unsigned w = 0; w < (block + 31) / 32; ++w) warps.push_back(std::make_unique<Warp>());
    std::vector<std::thread> threads;
    threads.reserve(block);
    for (unsigned t = 0; t < block; ++t) {
      threads.emplace_back([&, b, t] {
        grid_dim = dim3{grid, 1, 1};
        block_dim = dim3{block, 1, 1};
        block_idx = dim3{b, 0, 0};
        thread_idx = dim3{t, 0, 0};
        warp = warps[t / 32].get();
        kernel();
      });
    }
    for (auto &t : threads) t.join();
  }
}
}  // namespace emulate

// ---- Launching a kernel by name, as the CUDA driver's cuLaunchKernel does (the emulations'
// entry points, kernels/emulate.cpp of each crate) ----

namespace emulate {
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

/// Launches kernel `name` of `table` over `grid` blocks of `block` threads with `n` parameters
/// (`params[i]` points at parameter i, of kind `kinds[i]` and `sizes[i]` bytes). Returns 0, -2
/// for an unknown kernel, or `run`'s mismatch code.
template <std::size_t N>
int launch_by_name(const Entry (&table)[N], const char *name, unsigned grid, unsigned block,
                   void **params, const char *kinds, const unsigned char *sizes,
                   std::size_t n) {
  for (const Entry &e : table)
    if (std::strcmp(e.name, name) == 0) return e.run(grid, block, params, kinds, sizes, n);
  return -2;
}
}  // namespace emulate

/// A launch table's entry for kernel `K`.
#define ENTRY(K)                                                                               \
  emulate::Entry {                                                                             \
    #K, [](unsigned g, unsigned b, void **p, const char *k, const unsigned char *s,            \
           std::size_t n) { return emulate::run(K, g, b, p, k, s, n); }                        \
  }

