// y = x @ w^T for a bfloat16 or float16 weight [N, K] and a few rows of x: the matrix-vector
// products of decode, on CPUs where oneDNN cannot pack a 16-bit weight (it needs AVX-512 BW or
// AVX-NE-CONVERT; AVX2 machines have neither). There PyTorch's torch.mv of a bfloat16 weight reads
// about 17 GB/s on a 2-core EPYC, and an unquantized LM head is a third of an int8 model's step.
//
// The weight keeps its [N, K] layout (a tied LM head shares it with the embedding): each thread
// takes a contiguous run of rows, which is one sequential stream. Rows of the weight go 8 at a
// time against 1 row of x, or 4 against 2 (AVX2) or 4 (AVX-512), each a float32 dot product over K in vector lanes, summed at the end;
// the output is rounded once to x's dtype, as F.linear's is. Only the order of the sums differs.

#include "kernels.h"
#include "simd.h"

#include <ATen/Parallel.h>

#include <algorithm>

namespace {

using namespace tokenmill::simd;

// A pass takes kGroup rows of the weight against one row of x, or kGroup/2 of them against kRows:
// 8 independent accumulators at least (an FMA's latency is 4 cycles, 2 issue a cycle).
constexpr int kGroup = 8;
constexpr int kRows = kRegisters == 32 ? 4 : 2;  // 4 * kRows accumulators must fit beside the loads
constexpr int64_t kPrefetchBytes = 16384;        // as the int8 kernel's
constexpr int64_t kGrainBytes = 32768;           // weight a thread takes at least: waking one costs

template <bool kBf16>
inline Vec load16(const uint16_t* p) {
  if constexpr (kBf16) return load_bf16(p);
  else return load_fp16(p);
}

template <bool kBf16>
inline float scalar16(uint16_t v) {
  if constexpr (kBf16) return static_cast<float>(c10::BFloat16(v, c10::BFloat16::from_bits()));
  else return static_cast<float>(c10::Half(v, c10::Half::from_bits()));
}

// Rows n..n+W-1 of w (fewer at the end: the last row stands in for the missing ones, unstored)
// against R rows of x, into y.
template <int R, int W, bool kBf16, typename out_t>
void rows_pass(const float* x, int64_t K, int64_t N, const uint16_t* w, int64_t n, out_t* y) {
  const uint16_t* wr[W];
  for (int i = 0; i < W; ++i) wr[i] = w + std::min(n + i, N - 1) * K;
  Vec acc[R][W];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < W; ++i) acc[r][i] = zeros();
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes) {
    Vec xk[R];
    for (int r = 0; r < R; ++r) xk[r] = load(x + r * K + k);
    for (int i = 0; i < W; ++i) {
      // An address, not a pointer: it may pass the weight's end, and a prefetch never faults.
      _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(wr[i] + k) + kPrefetchBytes),
                   _MM_HINT_T0);
      const Vec wi = load16<kBf16>(wr[i] + k);
      for (int r = 0; r < R; ++r) acc[r][i] = fma(wi, xk[r], acc[r][i]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int i = 0; i < W && n + i < N; ++i) {
      float total = sum(acc[r][i]);
      for (int64_t t = k; t < K; ++t) total += x[r * K + t] * scalar16<kBf16>(wr[i][t]);
      y[r * N + n + i] = static_cast<out_t>(total);
    }
  }
}

template <bool kBf16, typename out_t>
void run(const float* x, int64_t M, int64_t K, int64_t N, const uint16_t* w, out_t* y) {
  const int64_t groups = (N + kGroup - 1) / kGroup;
  const int64_t grain = std::max<int64_t>(1, kGrainBytes / (kGroup * K * 2));
  at::parallel_for(0, groups, grain, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const int64_t n = g * kGroup;
      int64_t m = 0;
      for (; m + kRows <= M; m += kRows) {
        rows_pass<kRows, kGroup / 2, kBf16>(x + m * K, K, N, w, n, y + m * N);
        if (n + kGroup / 2 < N) rows_pass<kRows, kGroup / 2, kBf16>(x + m * K, K, N, w, n + kGroup / 2, y + m * N);
      }
      for (; m < M; ++m) rows_pass<1, kGroup, kBf16>(x + m * K, K, N, w, n, y + m * N);
    }
  });
}

}  // namespace

namespace tokenmill {

at::Tensor half_gemv(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu() && weight.device().is_cpu(),
              "half_gemv: x must be a 2-D CPU tensor");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() &&
                  (weight.scalar_type() == at::kBFloat16 || weight.scalar_type() == at::kHalf),
              "half_gemv: the weight must be a contiguous 2-D bfloat16 or float16 tensor");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "half_gemv: x and the weight must share a dtype");
  TORCH_CHECK(x.size(1) == weight.size(1), "half_gemv: x has ", x.size(1), " columns, the weight ",
              weight.size(1));
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  const at::Tensor xc = x.contiguous();
  Float32Rows rows(xc);
  at::Tensor y = at::empty({M, N}, x.options());
  const uint16_t* w = reinterpret_cast<const uint16_t*>(weight.data_ptr());
  if (weight.scalar_type() == at::kBFloat16) {
    run<true>(rows.data(), M, K, N, w, y.data_ptr<at::BFloat16>());
  } else {
    run<false>(rows.data(), M, K, N, w, y.data_ptr<at::Half>());
  }
  return y;
}

}  // namespace tokenmill
