// What every kernel source of the workspace starts with (kernels/train.cu here, the optimizer's
// crates/tevatron-train/kernels/optim.cu): CUDA's headers and `KERNEL` for nvcc, or, when the
// same source is compiled for the CPU (TEVATRON_EMULATE), the stand-in emulate.hpp, where
// kernels are plain functions that the emulation's launch table calls by name.
#pragma once
#ifdef TEVATRON_EMULATE
#include "emulate.hpp"
#define KERNEL static
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#define KERNEL extern "C" __global__
#endif

// A thread's lane in its warp.
#define LANE (threadIdx.x % 32)
