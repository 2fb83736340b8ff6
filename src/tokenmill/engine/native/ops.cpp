// The operators of tokenmill's CPU kernels: torch.ops.tokenmill.<name>.
#include <torch/library.h>

#include "kernels.h"

TORCH_LIBRARY(tokenmill, m) {
  m.def("int8_gemv(Tensor x, Tensor packed, Tensor scale, int n) -> Tensor");
  m.def("half_gemv(Tensor x, Tensor weight) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def(
      "paged_decode_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) cache, Tensor slots, Tensor block_table, "
      "Tensor seq_lens, int block_size, float scale, int window) -> Tensor");
  m.def("rotary_(Tensor(a!) x, Tensor cos, Tensor sin) -> Tensor(a!)");
  m.def("silu_and_mul(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(tokenmill, CPU, m) {
  m.impl("int8_gemv", tokenmill::int8_gemv);
  m.impl("half_gemv", tokenmill::half_gemv);
  m.impl("rms_norm", tokenmill::rms_norm);
  m.impl("paged_decode_attention", tokenmill::paged_decode_attention);
  m.impl("rotary_", tokenmill::rotary_);
  m.impl("silu_and_mul", tokenmill::silu_and_mul);
}
