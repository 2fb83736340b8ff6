// tokenmill's CPU kernels, registered as torch operators ``torch.ops.tokenmill.*`` by ops.cpp.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace tokenmill {

// y = (x @ q^T) * scale, q int8 in pack_int8_blocks' layout [ceil(n/64), K, 64] (int8_gemv.cpp).
at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale, int64_t n);

// y = x @ w^T for a bfloat16 or float16 weight [N, K] and a few rows of x of its dtype (half_gemv.cpp).
at::Tensor half_gemv(const at::Tensor& x, const at::Tensor& weight);

// Llama's RMSNorm over the last dim, in the model's rounding (rms_norm.cpp).
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);

// Stores the step's k, v ([n, kv_heads, dim]) at slots, then attends each sequence's one query row
// (q [n, heads, dim]) over its context in the paged cache [2, slots, kv_heads, dim]; window > 0
// keeps only the last window positions (paged_attention.cpp).
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  at::Tensor& cache, const at::Tensor& slots, const at::Tensor& block_table,
                                  const at::Tensor& seq_lens, int64_t block_size, double scale, int64_t window);

// x = x * cos + rotate_half(x) * sin in place, x [tokens, heads, head_dim] (last dim contiguous),
// sin with rotate-half's sign folded into its first half (rotary.cpp).
at::Tensor& rotary_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);

// silu(gate) * up for x = [gate | up] [tokens, 2 * I], in the rounding of its PyTorch form (silu_and_mul.cpp).
at::Tensor silu_and_mul(const at::Tensor& x);

// Calls f(T{}) with T the C++ type of a model dtype: float32, bfloat16 or float16 (the kernels that
// load float32 lanes through simd.h take no float64, which ATen's dispatch macros include).
template <typename F>
void dispatch_model_dtype(at::ScalarType dtype, const char* op, F&& f) {
  switch (dtype) {
    case at::kFloat:
      f(float{});
      break;
    case at::kBFloat16:
      f(at::BFloat16{});
      break;
    case at::kHalf:
      f(at::Half{});
      break;
    default:
      TORCH_CHECK(false, op, ": dtype ", dtype, " is not float32, bfloat16 or float16");
  }
}

// A contiguous x's values as float32, for kernels that multiply in float32 (float32_rows.cpp).
// A decode step's few rows are converted in place here: an ATen conversion costs more in
// dispatch and allocation than the conversion itself, and this runs for every layer of a step.
class Float32Rows {
 public:
  explicit Float32Rows(const at::Tensor& x);
  const float* data() const { return data_; }

 private:
  at::Tensor converted_;
  std::vector<float> buffer_;
  const float* data_;
};

}  // namespace tokenmill
