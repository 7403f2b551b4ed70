// Fused mean-teacher update on flat float32 buffers (CPU), one pass:
//   off <- lerp(off, on, 1 - decay)                             (EMA of the teacher, torch.lerp's formula)
//   on  <- src  where hash_uniform(seed, i) < p [and mask[i]]   (stochastic restore, optional Fisher mask)
// The uniform draw is a counter-based hash of (seed, index) so that cl/ops.py's PyTorch reference draws the
// same numbers: the kernel and the reference agree exactly on which elements are restored.
//
// Registered as the operator torch.ops.clbench.mean_teacher_update (TORCH_LIBRARY), not as a pybind11 module:
// only ATen's core headers are compiled (no torch/extension.h, no pybind11), which keeps the cold CPU build
// short enough for CI (docs/speed.md). csrc/mean_teacher.cu registers the CUDA implementation of the same op.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <cstdint>

static inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16; x *= 0x7feb352dU; x ^= x >> 15; x *= 0x846ca68bU; x ^= x >> 16; return x;
}

// Checks shared by the CPU and CUDA implementations (declared in both translation units' op schema).
void mean_teacher_check(const at::Tensor& off, const at::Tensor& on, const at::Tensor& src,
                        const at::Tensor& mask, double p) {
  TORCH_CHECK(off.scalar_type() == at::kFloat && on.scalar_type() == at::kFloat,
              "mean_teacher_update: off and on must be float32");
  TORCH_CHECK(off.is_contiguous() && on.is_contiguous(), "mean_teacher_update: off and on must be contiguous");
  TORCH_CHECK(off.numel() == on.numel(), "mean_teacher_update: off and on differ in size");
  TORCH_CHECK(off.device() == on.device(), "mean_teacher_update: off and on on different devices");
  if (p > 0.0) {
    TORCH_CHECK(src.scalar_type() == at::kFloat && src.is_contiguous() && src.numel() == on.numel() &&
                src.device() == on.device(), "mean_teacher_update: src must be a contiguous float32 buffer like on");
    if (mask.numel()) {
      TORCH_CHECK(mask.scalar_type() == at::kBool && mask.is_contiguous() && mask.numel() == on.numel() &&
                  mask.device() == on.device(), "mean_teacher_update: mask must be a contiguous bool buffer like on");
    }
  }
}

void mean_teacher_update_cpu(at::Tensor off, at::Tensor on, at::Tensor src, at::Tensor mask,
                             double decay, double p, int64_t seed) {
  mean_teacher_check(off, on, src, mask, p);
  const int64_t n = off.numel();
  if (n == 0) return;
  float* o = off.data_ptr<float>();
  float* x = on.data_ptr<float>();
  const float w = static_cast<float>(1.0 - decay);
  const bool restore = p > 0.0;
  const float* s = restore ? src.data_ptr<float>() : nullptr;
  const bool* m = (restore && mask.numel()) ? mask.data_ptr<bool>() : nullptr;
  const uint32_t sd = static_cast<uint32_t>(seed);
  const float pf = static_cast<float>(p);
  // Branch-free loop bodies so that the compiler vectorises them: lerp's formula switch (w < 0.5) and the mask
  // test are hoisted out of the loops, both values are loaded before the select, and the uint32 -> float of the
  // 24-bit draw goes through int32 (exact below 2^24; SSE/AVX have no unsigned conversion).
  at::parallel_for(0, n, 1 << 16, [&](int64_t b, int64_t e) {
    if (w < 0.5f) {
      for (int64_t i = b; i < e; ++i) o[i] = o[i] + w * (x[i] - o[i]);
    } else {
      const float w1 = 1.0f - w;
      for (int64_t i = b; i < e; ++i) o[i] = x[i] - (x[i] - o[i]) * w1;
    }
    if (!restore) return;
    const uint32_t b32 = static_cast<uint32_t>(b);
    const int64_t len = e - b;
    float* xb = x + b;
    const float* sb = s + b;
    if (m == nullptr) {
      for (int64_t j = 0; j < len; ++j) {
        const uint32_t h = mix32((b32 + static_cast<uint32_t>(j)) * 0x9E3779B9U + sd);
        const float u = static_cast<float>(static_cast<int32_t>(h >> 8)) * (1.0f / 16777216.0f);
        const float xv = xb[j], sv = sb[j];
        xb[j] = (u < pf) ? sv : xv;
      }
    } else {
      const bool* mb = m + b;
      for (int64_t j = 0; j < len; ++j) {
        const uint32_t h = mix32((b32 + static_cast<uint32_t>(j)) * 0x9E3779B9U + sd);
        const float u = static_cast<float>(static_cast<int32_t>(h >> 8)) * (1.0f / 16777216.0f);
        const float xv = xb[j], sv = sb[j];
        xb[j] = ((u < pf) & mb[j]) ? sv : xv;
      }
    }
  });
}

TORCH_LIBRARY(clbench, lib) {
  lib.def("mean_teacher_update(Tensor(a!) off, Tensor(b!) on, Tensor src, Tensor mask, float decay, float p, "
          "int seed) -> ()");
}

TORCH_LIBRARY_IMPL(clbench, CPU, lib) {
  lib.impl("mean_teacher_update", &mean_teacher_update_cpu);
}
