// int8 weight-only matmul on AVX-512 and AVX2 CPUs: y = (x @ q^T) * scale.
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
//
// From kDotRows rows of bfloat16 x on, the work is multiplies rather than memory,
// and converting the weights again for every 4 rows costs more than the products.
// There a block's weights are converted once per chunk of k into bfloat16 pairs
// (k, k+1) in cache, and every row takes them with AVX-512 BF16's dot product
// (vdpbf16ps: 32 products a instruction, twice float32 FMA's). int8 values and
// bfloat16 x are exact in bfloat16, so the products are exact; sums are float32.

#include "kernels.h"
#include "simd.h"

#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kBlock = 64;              // output channels per block: one cache line of int8
constexpr int64_t kPrefetchBytes = 16384;  // measured on a 2-core EPYC: 4 KB 56 GB/s, 16 KB 69 GB/s
constexpr int64_t kDotRows = 24;             // bfloat16 x from this many rows: the dot-product path
constexpr int64_t kPairsPerChunk = 256;      // k-pairs converted at a time: a 64 KB tile per thread
constexpr int kDotRowsPerPass = 6;           // 24 accumulators, 4 weight vectors, a broadcast

using namespace tokenmill::simd;

// AVX2 has 16 vector registers, not 32: it takes rows of x 2 at a time where AVX-512 takes 4.
constexpr int kRows = kRegisters == 32 ? 4 : 2;
constexpr int kVecs = kBlock / kLanes;

template <int R, typename out_t>
void block_pass(const float* x, int64_t K, int64_t N, const int8_t* w, const float* scale, int64_t block,
                out_t* y) {
  Vec acc[R][kVecs];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < kVecs; ++j) acc[r][j] = zeros();
  const int8_t* p = w + block * K * kBlock;
  for (int64_t k = 0; k < K; ++k, p += kBlock) {
    // An address, not a pointer: past the weight's end near the last block, and a prefetch never faults.
    _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(p) + kPrefetchBytes), _MM_HINT_T0);
    Vec xk[R];
    for (int r = 0; r < R; ++r) xk[r] = broadcast(x[r * K + k]);
    for (int j = 0; j < kVecs; ++j) {
      const Vec wj = load_int8(p + j * kLanes);
      for (int r = 0; r < R; ++r) acc[r][j] = fma(wj, xk[r], acc[r][j]);
    }
  }
  const int64_t n0 = block * kBlock;
  const int64_t width = std::min(kBlock, N - n0);  // the last block may be padding past N
  float out[kBlock];
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < kVecs; ++j) store(out + j * kLanes, mul(acc[r][j], load(scale + n0 + j * kLanes)));
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
#if defined(__AVX512F__)  // kRows 4
        case 2: block_pass<2>(xm, K, N, w, scale, b, ym); break;
        case 3: block_pass<3>(xm, K, N, w, scale, b, ym); break;
#endif
        default: block_pass<kRows>(xm, K, N, w, scale, b, ym); break;
      }
    }
  }
}

#define TM_BF16 __attribute__((target("avx512f,avx512bw,avx512bf16")))

// tile[4p + j] holds columns 16j..16j+15 of k-pair p: each 32-bit lane (bf16 w[2p+1] << 16) | bf16 w[2p].
TM_BF16 void convert_pairs(const int8_t* w, int64_t K, int64_t p0, int64_t p1, __m512i* tile) {
  for (int64_t p = p0; p < p1; ++p) {
    const int8_t* even = w + 2 * p * kBlock;
    const bool has_odd = 2 * p + 1 < K;  // an odd K's last pair gets a zero partner
    for (int j = 0; j < 4; ++j) {
      __m512 fe = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(even + 16 * j))));
      __m512 fo = has_odd ? _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                                _mm_loadu_si128(reinterpret_cast<const __m128i*>(even + kBlock + 16 * j))))
                          : _mm512_setzero_ps();
      // An integer of at most 8 bits is exact in bfloat16: its float32's upper half.
      __m512i lo = _mm512_srli_epi32(_mm512_castps_si512(fe), 16);
      tile[(p - p0) * 4 + j] = _mm512_mask_blend_epi16(0xAAAAAAAAu, lo, _mm512_castps_si512(fo));
    }
  }
}

// R rows of x (as bf16 pairs, row stride `stride` pairs) over `pairs` k-pairs of the tile, into acc [R, 64].
template <int R>
TM_BF16 void dot_pass(const __m512i* tile, int64_t pairs, const uint32_t* x, int64_t stride, float* acc) {
  __m512 a[R][4];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) a[r][j] = _mm512_loadu_ps(acc + r * kBlock + 16 * j);
  for (int64_t p = 0; p < pairs; ++p) {
    const __m512i t0 = tile[4 * p], t1 = tile[4 * p + 1], t2 = tile[4 * p + 2], t3 = tile[4 * p + 3];
    for (int r = 0; r < R; ++r) {
      const __m512bh xp = (__m512bh)_mm512_set1_epi32(static_cast<int>(x[r * stride + p]));
      a[r][0] = _mm512_dpbf16_ps(a[r][0], (__m512bh)t0, xp);
      a[r][1] = _mm512_dpbf16_ps(a[r][1], (__m512bh)t1, xp);
      a[r][2] = _mm512_dpbf16_ps(a[r][2], (__m512bh)t2, xp);
      a[r][3] = _mm512_dpbf16_ps(a[r][3], (__m512bh)t3, xp);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) _mm512_storeu_ps(acc + r * kBlock + 16 * j, a[r][j]);
}

TM_BF16 void dot_blocks(const uint32_t* xpairs, int64_t M, int64_t K, int64_t N, const int8_t* w,
                        const float* scale, int64_t begin, int64_t end, at::BFloat16* y) {
  const int64_t P = (K + 1) / 2;
  std::vector<__m512i> tile(kPairsPerChunk * 4);
  std::vector<float> acc(M * kBlock);
  for (int64_t b = begin; b < end; ++b) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    const int8_t* wb = w + b * K * kBlock;
    for (int64_t p0 = 0; p0 < P; p0 += kPairsPerChunk) {
      const int64_t p1 = std::min(P, p0 + kPairsPerChunk);
      convert_pairs(wb, K, p0, p1, tile.data());
      for (int64_t m = 0; m < M; m += kDotRowsPerPass) {
        const uint32_t* xm = xpairs + m * P + p0;
        float* am = acc.data() + m * kBlock;
        switch (std::min<int64_t>(kDotRowsPerPass, M - m)) {
          case 1: dot_pass<1>(tile.data(), p1 - p0, xm, P, am); break;
          case 2: dot_pass<2>(tile.data(), p1 - p0, xm, P, am); break;
          case 3: dot_pass<3>(tile.data(), p1 - p0, xm, P, am); break;
          case 4: dot_pass<4>(tile.data(), p1 - p0, xm, P, am); break;
          case 5: dot_pass<5>(tile.data(), p1 - p0, xm, P, am); break;
          default: dot_pass<6>(tile.data(), p1 - p0, xm, P, am); break;
        }
      }
    }
    const int64_t n0 = b * kBlock;
    const int64_t width = std::min(kBlock, N - n0);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = 0; j < width; ++j) y[m * N + n0 + j] = at::BFloat16(acc[m * kBlock + j] * scale[n0 + j]);
  }
}

at::Tensor int8_dot_bf16(const at::Tensor& x, const at::Tensor& packed, const float* scale, int64_t n) {
  const int64_t M = x.size(0), K = x.size(1), P = (K + 1) / 2;
  // x as bf16 pairs, one row of P pairs each (an odd K's last pair padded with zero).
  std::vector<uint32_t> xpairs(M * P, 0);
  const uint16_t* src = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  for (int64_t m = 0; m < M; ++m)
    std::memcpy(reinterpret_cast<uint16_t*>(xpairs.data() + m * P), src + m * K, K * sizeof(uint16_t));
  at::Tensor y = at::empty({M, n}, x.options());
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  const int8_t* wp = packed.data_ptr<int8_t>();
  at::parallel_for(0, packed.size(0), 1, [&](int64_t begin, int64_t end) {
    dot_blocks(xpairs.data(), M, K, n, wp, scale, begin, end, yp);
  });
  return y;
}

}  // namespace

namespace tokenmill {

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
  const at::Tensor xc = x.contiguous();
  static const bool has_bf16_dot = __builtin_cpu_supports("avx512bf16");
  if (xc.scalar_type() == at::kBFloat16 && M >= kDotRows && has_bf16_dot) {
    return int8_dot_bf16(xc, packed, scale.data_ptr<float>(), n);
  }
  Float32Rows rows(xc);
  const float* xp = rows.data();
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

}  // namespace tokenmill
