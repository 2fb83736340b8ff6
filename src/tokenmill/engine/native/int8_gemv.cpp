// int8 weight-only matmul for small batches on AVX-512 CPUs: y = (x @ q^T) * scale.
//
// Decode at batch 1 reads every weight once per token, so its speed is the speed
// at which weights stream from memory. PyTorch's _weight_int8pack_mm walks a few
// rows of the [N, K] weight at a time, each row a short stream (K bytes): on a
// 768-wide model the hardware prefetchers never get going and it reads about
// 30 GB/s where memory gives 66. Here the weight is stored in blocks of 64
// output channels, k-major inside a block ([N/64, K, 64]), so each thread reads
// one long sequential stream, and a software prefetch runs 16 KB ahead of it.
//
// Per k: one 64-byte line of weights becomes 4 x 16 float32 lanes, and each row
// of x adds x[m, k] * w into its 4 accumulators: float32 products and sums, the
// arithmetic of the dequantized reference up to summation order. Rows of x come
// 4 at a time; the block's weights are still in cache for the next 4.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kBlock = 64;              // output channels per block: one cache line of int8
constexpr int64_t kPrefetchBytes = 16384;  // measured on a 2-core EPYC: 4 KB 56 GB/s, 16 KB 69 GB/s
constexpr int kRows = 4;                    // rows of x per pass over a block
constexpr int64_t kInlineConvert = 1 << 16;  // elements of x converted to float32 here, not by ATen

template <int R, typename out_t>
void block_pass(const float* x, int64_t K, int64_t N, const int8_t* w, const float* scale, int64_t block,
                out_t* y) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_ps();
  const int8_t* p = w + block * K * kBlock;
  for (int64_t k = 0; k < K; ++k, p += kBlock) {
    // An address, not a pointer: past the weight's end near the last block, and a prefetch never faults.
    _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(p) + kPrefetchBytes), _MM_HINT_T0);
    __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
    __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16))));
    __m512 w2 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 32))));
    __m512 w3 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 48))));
    for (int r = 0; r < R; ++r) {
      __m512 xk = _mm512_set1_ps(x[r * K + k]);
      acc[r][0] = _mm512_fmadd_ps(w0, xk, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(w1, xk, acc[r][1]);
      acc[r][2] = _mm512_fmadd_ps(w2, xk, acc[r][2]);
      acc[r][3] = _mm512_fmadd_ps(w3, xk, acc[r][3]);
    }
  }
  const int64_t n0 = block * kBlock;
  const int64_t width = std::min(kBlock, N - n0);  // the last block may be padding past N
  alignas(64) float out[kBlock];
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < 4; ++j)
      _mm512_store_ps(out + 16 * j, _mm512_mul_ps(acc[r][j], _mm512_loadu_ps(scale + n0 + 16 * j)));
    out_t* row = y + r * N + n0;
    for (int64_t j = 0; j < width; ++j) row[j] = static_cast<out_t>(out[j]);
  }
}

template <typename out_t>
void blocks(const float* x, int64_t M, int64_t K, int64_t N, const int8_t* w, const float* scale,
            int64_t begin, int64_t end, out_t* y) {
  for (int64_t b = begin; b < end; ++b) {
    for (int64_t m = 0; m < M; m += kRows) {
      const float* xm = x + m * K;
      out_t* ym = y + m * N;
      switch (std::min<int64_t>(kRows, M - m)) {
        case 1: block_pass<1>(xm, K, N, w, scale, b, ym); break;
        case 2: block_pass<2>(xm, K, N, w, scale, b, ym); break;
        case 3: block_pass<3>(xm, K, N, w, scale, b, ym); break;
        default: block_pass<4>(xm, K, N, w, scale, b, ym); break;
      }
    }
  }
}

at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale, int64_t n) {
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu(), "int8_gemv: x must be a 2-D CPU tensor");
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kChar && packed.size(2) == kBlock &&
                  packed.is_contiguous(),
              "int8_gemv: the weight must be int8 [N/64, K, 64], contiguous (pack_int8_blocks)");
  const int64_t M = x.size(0), K = x.size(1), nblocks = packed.size(0);
  TORCH_CHECK(packed.size(1) == K, "int8_gemv: x has ", K, " columns, the weight ", packed.size(1));
  TORCH_CHECK(n > (nblocks - 1) * kBlock && n <= nblocks * kBlock, "int8_gemv: n=", n, " does not fit ",
              nblocks, " blocks");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() >= nblocks * kBlock,
              "int8_gemv: scales must be float32, one per padded output channel");
  // x as float32. A decode step's few rows are converted here: an ATen conversion costs more in
  // dispatch and allocation than the conversion itself, and this runs for every layer of every step.
  const at::Tensor xc = x.contiguous();
  at::Tensor xf;
  std::vector<float> xbuf;
  const float* xp;
  if (xc.scalar_type() == at::kFloat) {
    xp = xc.data_ptr<float>();
  } else if (M * K <= kInlineConvert) {
    xbuf.resize(M * K);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xc.scalar_type(), "int8_gemv_x", [&] {
      const scalar_t* src = xc.data_ptr<scalar_t>();
      for (int64_t i = 0; i < M * K; ++i) xbuf[i] = static_cast<float>(src[i]);
    });
    xp = xbuf.data();
  } else {
    xf = xc.to(at::kFloat);
    xp = xf.data_ptr<float>();
  }
  at::Tensor y = at::empty({M, n}, x.options());
  const int8_t* wp = packed.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  // Blocks split evenly between threads: each reads one contiguous run of the weight.
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "int8_gemv", [&] {
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, nblocks, 1, [&](int64_t begin, int64_t end) {
      blocks<scalar_t>(xp, M, K, n, wp, sp, begin, end, yp);
    });
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(tokenmill, m) {
  m.def("int8_gemv(Tensor x, Tensor packed, Tensor scale, int n) -> Tensor");
}

TORCH_LIBRARY_IMPL(tokenmill, CPU, m) { m.impl("int8_gemv", int8_gemv); }
