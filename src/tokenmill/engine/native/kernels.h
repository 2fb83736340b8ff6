// tokenmill's CPU kernels, registered as torch operators ``torch.ops.tokenmill.*`` by ops.cpp.
#pragma once

#include <ATen/ATen.h>

namespace tokenmill {

// y = (x @ q^T) * scale, q int8 in pack_int8_blocks' layout [ceil(n/64), K, 64] (int8_gemv.cpp).
at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale, int64_t n);

// Llama's RMSNorm over the last dim, in the model's rounding (rms_norm.cpp).
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);

}  // namespace tokenmill
