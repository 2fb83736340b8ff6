// Rotate-half rotary embedding, in place, in one op: x = x * cos + rotate_half(x) * sin.
// PyTorch's form (layers.apply_rotary) is four ops and three temporaries per call, and a decode
// step makes one call per layer. This keeps its rounding: each product is rounded to x's dtype,
// then their sum is. ``sin`` arrives with rotate-half's sign folded into its first half
// (RotaryEmbedding.build), so rotate_half(x) is x's two halves swapped.

#include "kernels.h"

#include <ATen/Parallel.h>

namespace tokenmill {
namespace {

template <typename T>
void rotate(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t tokens = x.size(0), heads = x.size(1), D = x.size(2), half = D / 2;
  const int64_t row = x.stride(0), head = x.stride(1), table_row = cos.stride(0);
  T* xp = x.data_ptr<T>();
  const T* cp = cos.data_ptr<T>();
  const T* sp = sin.data_ptr<T>();
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T* c = cp + t * table_row;
      const T* s = sp + t * table_row;
      for (int64_t h = 0; h < heads; ++h) {
        T* v = xp + t * row + h * head;
        for (int64_t i = 0; i < half; ++i) {
          const float lo = static_cast<float>(v[i]), hi = static_cast<float>(v[i + half]);
          const T lo_cos = static_cast<T>(lo * static_cast<float>(c[i]));
          const T hi_sin = static_cast<T>(hi * static_cast<float>(s[i]));
          const T hi_cos = static_cast<T>(hi * static_cast<float>(c[i + half]));
          const T lo_sin = static_cast<T>(lo * static_cast<float>(s[i + half]));
          v[i] = static_cast<T>(static_cast<float>(lo_cos) + static_cast<float>(hi_sin));
          v[i + half] = static_cast<T>(static_cast<float>(hi_cos) + static_cast<float>(lo_sin));
        }
      }
    }
  });
}

}  // namespace

at::Tensor& rotary_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.device().is_cpu() && cos.device().is_cpu() && sin.device().is_cpu(), "rotary_: CPU tensors only");
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.size(2) % 2 == 0,
              "rotary_: x must be [tokens, heads, an even head_dim] with its last dim contiguous");
  const int64_t tokens = x.size(0), D = x.size(2);
  for (const at::Tensor* t : {&cos, &sin}) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "rotary_: cos and sin must have x's dtype");
    TORCH_CHECK(t->dim() >= 2 && t->size(0) == tokens && t->size(-1) == D && t->stride(-1) == 1 &&
                    t->numel() == tokens * D,
                "rotary_: cos and sin must be one contiguous row of head_dim per token");
  }
  TORCH_CHECK(cos.strides() == sin.strides(), "rotary_: cos and sin must share a layout");
  dispatch_model_dtype(x.scalar_type(), "rotary_", [&](auto tag) { rotate<decltype(tag)>(x, cos, sin); });
  return x;
}

}  // namespace tokenmill
