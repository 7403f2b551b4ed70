// Fused mean-teacher update on flat float32 buffers (CPU), one pass:
//   off <- lerp(off, on, 1 - decay)                     (EMA of the teacher, torch.lerp's formula)
//   on  <- src  where hash_uniform(seed, i) < p [and mask[i]]   (stochastic restore, optional Fisher mask)
// The uniform draw is a counter-based hash of (seed, index) so that cl/ops.py's PyTorch reference draws the
// same numbers: the kernel and the reference agree exactly on which elements are restored.
#include <torch/extension.h>
#include <cstdint>

static inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16; x *= 0x7feb352dU; x ^= x >> 15; x *= 0x846ca68bU; x ^= x >> 16; return x;
}

void mean_teacher_update_cpu(torch::Tensor off, torch::Tensor on, torch::Tensor src, torch::Tensor mask,
                             double decay, double p, int64_t seed) {
  TORCH_CHECK(off.is_contiguous() && on.is_contiguous() && off.scalar_type() == torch::kFloat32 &&
              on.scalar_type() == torch::kFloat32 && off.numel() == on.numel(), "flat contiguous float32 buffers");
  const int64_t n = off.numel();
  float* o = off.data_ptr<float>();
  float* x = on.data_ptr<float>();
  const float w = static_cast<float>(1.0 - decay);
  const bool restore = p > 0.0;
  const float* s = restore ? src.data_ptr<float>() : nullptr;
  const bool* m = (restore && mask.numel()) ? mask.data_ptr<bool>() : nullptr;
  const uint32_t sd = static_cast<uint32_t>(seed);
  const float pf = static_cast<float>(p);
  at::parallel_for(0, n, 1 << 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const float a = o[i], v = x[i];
      const float d = v - a;
      o[i] = (w < 0.5f) ? a + w * d : v - d * (1.0f - w);
      if (restore) {
        const uint32_t h = mix32(static_cast<uint32_t>(i) * 0x9E3779B9U + sd);
        const float u = static_cast<float>(h >> 8) * (1.0f / 16777216.0f);
        if (u < pf && (m == nullptr || m[i])) x[i] = s[i];
      }
    }
  });
}

#ifdef WITH_CUDA
void mean_teacher_update_cuda(torch::Tensor off, torch::Tensor on, torch::Tensor src, torch::Tensor mask,
                              double decay, double p, int64_t seed);
#endif

void mean_teacher_update(torch::Tensor off, torch::Tensor on, torch::Tensor src, torch::Tensor mask,
                         double decay, double p, int64_t seed) {
#ifdef WITH_CUDA
  if (off.is_cuda()) return mean_teacher_update_cuda(off, on, src, mask, decay, p, seed);
#endif
  TORCH_CHECK(!off.is_cuda(), "clbench_ops was built without CUDA");
  mean_teacher_update_cpu(off, on, src, mask, decay, p, seed);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("mean_teacher_update", &mean_teacher_update, "fused EMA + stochastic restore on flat buffers");
}
