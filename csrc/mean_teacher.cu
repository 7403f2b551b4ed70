// CUDA side of csrc/mean_teacher.cpp: the same one-pass update, float4-free grid-stride loop (reads off, on,
// src, mask; writes off, on). Same hash as the CPU kernel and cl/ops.py's reference.
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include <algorithm>
#include <cstdint>

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

void mean_teacher_update_cuda(torch::Tensor off, torch::Tensor on, torch::Tensor src, torch::Tensor mask,
                              double decay, double p, int64_t seed) {
  const int64_t n = off.numel();
  if (n == 0) return;
  const bool restore = p > 0.0;
  const int threads = 256;
  const int blocks = static_cast<int>(std::min<int64_t>((n + threads - 1) / threads, 65535 * 8));
  mt_kernel<<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      off.data_ptr<float>(), on.data_ptr<float>(), restore ? src.data_ptr<float>() : nullptr,
      (restore && mask.numel()) ? mask.data_ptr<bool>() : nullptr, n, static_cast<float>(1.0 - decay),
      static_cast<float>(p), static_cast<uint32_t>(seed));
}
