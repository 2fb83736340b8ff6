// SwiGLU's activation in one op: y = silu(gate) * up, where x = [gate | up] is the fused
// gate_up product ([tokens, 2 * I]). PyTorch's form (split, F.silu, mul) is two ops and a
// temporary per layer. The rounding is its own: silu in float32, rounded to x's dtype, then the
// product rounded again. silu(g) = g * sigmoid(g), with sigmoid from e^-|g| so the exponential
// never overflows; e^x is the vectorized one of simd.h (within 2 ulp of expf, where PyTorch
// uses Sleef's), so float32 results may differ from PyTorch's in the last bit.

#include "kernels.h"
#include "simd.h"

#include <ATen/Parallel.h>

#include <cmath>

namespace tokenmill {
namespace {

using simd::kLanes;
using simd::Vec;

inline float silu(float g) {
  const float e = std::exp(-std::fabs(g));
  return g * (g >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e));
}

template <typename T>
void silu_mul_row(const T* gate, const T* up, T* y, int64_t I) {
  alignas(64) float act[kLanes];
  const Vec one = simd::broadcast(1.0f), minus = simd::broadcast(-1.0f);
  int64_t i = 0;
  for (; i + kLanes <= I; i += kLanes) {
    const Vec g = simd::load(gate + i);
    const Vec e = simd::exp_nonpositive(simd::mul(simd::max(g, simd::mul(g, minus)), minus));  // e^-|g|
    const Vec inv = simd::div(one, simd::add(one, e));
    const Vec sigmoid = simd::select_negative(g, simd::mul(e, inv), inv);  // e / (1 + e) below 0
    simd::store(act, simd::mul(g, sigmoid));
    for (int64_t l = 0; l < kLanes; ++l) {
      y[i + l] = static_cast<T>(static_cast<float>(static_cast<T>(act[l])) * static_cast<float>(up[i + l]));
    }
  }
  for (; i < I; ++i) y[i] = static_cast<T>(static_cast<float>(static_cast<T>(silu(static_cast<float>(gate[i])))) *
                                            static_cast<float>(up[i]));
}

template <typename T>
void silu_mul(const at::Tensor& x, at::Tensor& y) {
  const int64_t tokens = x.size(0), I = y.size(1), row = x.stride(0);
  const T* xp = x.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  at::parallel_for(0, tokens, 8, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) silu_mul_row(xp + t * row, xp + t * row + I, yp + t * I, I);
  });
}

}  // namespace

at::Tensor silu_and_mul(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), "silu_and_mul: CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && x.size(1) % 2 == 0 && x.stride(1) == 1,
              "silu_and_mul: x must be [tokens, 2 * intermediate] with its last dim contiguous");
  at::Tensor y = at::empty({x.size(0), x.size(1) / 2}, x.options());
  dispatch_model_dtype(x.scalar_type(), "silu_and_mul", [&](auto tag) { silu_mul<decltype(tag)>(x, y); });
  return y;
}

}  // namespace tokenmill
