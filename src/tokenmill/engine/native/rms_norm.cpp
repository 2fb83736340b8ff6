// Llama's RMSNorm in one pass per row, with the rounding of its PyTorch form:
//   y = weight * to_dtype(x32 * rsqrt(mean(x32^2) + eps)),  x32 = float32(x)
// (the normalized row is rounded to the model dtype, then multiplied by the weight and rounded
// again, as transformers' LlamaRMSNorm does). In PyTorch that is eight ops and four temporary
// tensors per norm, and a decode step runs 2 per layer: one op here is 8% of a 125M model's
// batch-1 decode. Sums are float32, in another order than torch.mean's.

#include "kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>

namespace tokenmill {

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "rms_norm: CPU tensors only");
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 1 && weight.size(0) == x.size(-1),
              "rms_norm: the weight must have the size of x's last dim");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "rms_norm: x and the weight must share a dtype");
  const at::Tensor xc = x.contiguous();
  const at::Tensor wc = weight.contiguous();
  const int64_t D = xc.size(-1);
  const int64_t rows = D == 0 ? 0 : xc.numel() / D;
  at::Tensor y = at::empty_like(xc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xc.scalar_type(), "rms_norm", [&] {
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    const scalar_t* wp = wc.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    // Rows split between threads only when there are enough to pay for waking them (prefill).
    at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* row = xp + r * D;
        float squares = 0.0f;
        for (int64_t i = 0; i < D; ++i) {
          const float v = static_cast<float>(row[i]);
          squares += v * v;
        }
        const float inv = 1.0f / std::sqrt(squares / static_cast<float>(D) + static_cast<float>(eps));
        scalar_t* out = yp + r * D;
        for (int64_t i = 0; i < D; ++i) {
          const scalar_t normed = static_cast<scalar_t>(static_cast<float>(row[i]) * inv);
          out[i] = static_cast<scalar_t>(static_cast<float>(wp[i]) * static_cast<float>(normed));
        }
      }
    });
  });
  return y;
}

}  // namespace tokenmill
