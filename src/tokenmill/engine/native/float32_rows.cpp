// x as float32 for the float32 kernels (see kernels.h).
#include "kernels.h"

#include <ATen/Dispatch.h>

namespace {
constexpr int64_t kInlineConvert = 1 << 16;  // elements converted here; ATen's conversion above that
}  // namespace

namespace tokenmill {

Float32Rows::Float32Rows(const at::Tensor& x) {
  TORCH_CHECK(x.is_contiguous(), "Float32Rows: x must be contiguous");
  if (x.scalar_type() == at::kFloat) {
    data_ = x.data_ptr<float>();
  } else if (x.numel() <= kInlineConvert) {
    buffer_.resize(x.numel());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "float32_rows", [&] {
      const scalar_t* src = x.data_ptr<scalar_t>();
      for (int64_t i = 0; i < x.numel(); ++i) buffer_[i] = static_cast<float>(src[i]);
    });
    data_ = buffer_.data();
  } else {
    converted_ = x.to(at::kFloat);
    data_ = converted_.data_ptr<float>();
  }
}

}  // namespace tokenmill
