// CUDA side of csrc/mean_teacher.cpp: the same one-pass update as a grid-stride loop (reads off, on, src, mask;
// writes off, on), registered as the CUDA implementation of torch.ops.clbench.mean_teacher_update. Same hash as
// the CPU kernel and cl/ops.py's reference. Built only when a GPU is visible (cl/ops.py).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <algorithm>
#include <cstdint>

void mean_teacher_check(const at::Tensor& off, const at::Tensor& on, const at::Tensor& src,
                        const at::Tensor& mask, double p);  // csrc/mean_teacher.cpp

__device__ __forceinline__ uint32_t mix32_d(uint32_t x) {
  x ^= x >> 16; x *= 0x7feb352dU; x ^= x >> 15; x *= 0x846ca68bU; x ^= x >> 16; return x;
}

__global__ void mt_kernel(float* __restrict__ o, float* __restrict__ x, const float* __restrict__ s,
                          const bool* __restrict__ m, int64_t n, float w, float p, uint32_t seed) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const float a = o[i], v = x[i];
    const float d = v - a;
    o[i] = (w < 0.5f) ? a + w * d : v - d * (1.0f - w);
    if (s != nullptr) {
      const uint32_t h = mix32_d(static_cast<uint32_t>(i) * 0x9E3779B9U + seed);
      const float u = static_cast<float>(h >> 8) * (1.0f / 16777216.0f);
      if (u < p && (m == nullptr || m[i])) x[i] = s[i];
    }
  }
}

void mean_teacher_update_cuda(at::Tensor off, at::Tensor on, at::Tensor src, at::Tensor mask,
                              double decay, double p, int64_t seed) {
  mean_teacher_check(off, on, src, mask, p);
  const int64_t n = off.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(off.device());
  const bool restore = p > 0.0;
  const int threads = 256;
  const int blocks = static_cast<int>(std::min<int64_t>((n + threads - 1) / threads, 65535 * 8));
  mt_kernel<<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      off.data_ptr<float>(), on.data_ptr<float>(), restore ? src.data_ptr<float>() : nullptr,
      (restore && mask.numel()) ? mask.data_ptr<bool>() : nullptr, n, static_cast<float>(1.0 - decay),
      static_cast<float>(p), static_cast<uint32_t>(seed));
}

TORCH_LIBRARY_IMPL(clbench, CUDA, lib) {
  lib.impl("mean_teacher_update", &mean_teacher_update_cuda);
}
