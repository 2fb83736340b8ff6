// Decode attention over the paged KV cache: one query token per sequence, K and V read in place
// from the sequence's blocks. PyTorch's route to the same product (gather the context out of its
// blocks, pad, scaled_dot_product_attention) is about ten ops and two copies of the context per
// layer; on a 125M model at batch 1 that cost ~180 us a layer, in calls and copies, for a few
// hundred 64-wide dot products.
//
// The step's new K/V (one row per sequence) are stored at their slots first, so a layer's
// decode attention is this one op. Work items are (sequence, KV head) pairs, so the query heads
// that share a KV head (GQA) find its K and V rows in cache after the first. Scores and the
// softmax are float32; the weighted sum of V is accumulated in float32 and rounded once.
// Parallelism is across items only: a single sequence with few KV heads uses few threads.

#include "kernels.h"
#include "simd.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace tokenmill {
namespace {

using simd::kLanes;
using simd::Vec;

template <typename T>
float dot(const float* q, const T* k, int64_t D) {
  Vec acc = simd::zeros();
  int64_t i = 0;
  for (; i + kLanes <= D; i += kLanes) acc = simd::fma(simd::load(q + i), simd::load(k + i), acc);
  float s = simd::sum(acc);
  for (; i < D; ++i) s += q[i] * static_cast<float>(k[i]);
  return s;
}

// Four keys' dot products with one query row: four independent chains of FMAs where one chain
// would wait on each FMA's latency.
template <typename T>
void dot4(const float* q, const T* const* k, int64_t D, float* out) {
  Vec a0 = simd::zeros(), a1 = simd::zeros(), a2 = simd::zeros(), a3 = simd::zeros();
  int64_t i = 0;
  for (; i + kLanes <= D; i += kLanes) {
    const Vec qv = simd::load(q + i);
    a0 = simd::fma(qv, simd::load(k[0] + i), a0);
    a1 = simd::fma(qv, simd::load(k[1] + i), a1);
    a2 = simd::fma(qv, simd::load(k[2] + i), a2);
    a3 = simd::fma(qv, simd::load(k[3] + i), a3);
  }
  out[0] = simd::sum(a0);
  out[1] = simd::sum(a1);
  out[2] = simd::sum(a2);
  out[3] = simd::sum(a3);
  for (; i < D; ++i) {
    for (int r = 0; r < 4; ++r) out[r] += q[i] * static_cast<float>(k[r][i]);
  }
}

// out = sum_t p[t] * v[t]: a few vectors of out held in registers across the whole context, where
// adding one row at a time would load and store all of out per row.
template <typename T>
void weighted_sum(const float* p, const T* const* v, int64_t span, int64_t D, float* out) {
  int64_t d = 0;
  for (; d + 4 * kLanes <= D; d += 4 * kLanes) {
    Vec a0 = simd::zeros(), a1 = simd::zeros(), a2 = simd::zeros(), a3 = simd::zeros();
    for (int64_t t = 0; t < span; ++t) {
      const Vec w = simd::broadcast(p[t]);
      const T* row = v[t] + d;
      a0 = simd::fma(w, simd::load(row), a0);
      a1 = simd::fma(w, simd::load(row + kLanes), a1);
      a2 = simd::fma(w, simd::load(row + 2 * kLanes), a2);
      a3 = simd::fma(w, simd::load(row + 3 * kLanes), a3);
    }
    simd::store(out + d, a0);
    simd::store(out + d + kLanes, a1);
    simd::store(out + d + 2 * kLanes, a2);
    simd::store(out + d + 3 * kLanes, a3);
  }
  for (; d + kLanes <= D; d += kLanes) {
    Vec a = simd::zeros();
    for (int64_t t = 0; t < span; ++t) a = simd::fma(simd::broadcast(p[t]), simd::load(v[t] + d), a);
    simd::store(out + d, a);
  }
  for (; d < D; ++d) {
    float a = 0.0f;
    for (int64_t t = 0; t < span; ++t) a += p[t] * static_cast<float>(v[t][d]);
    out[d] = a;
  }
}

struct Shape {
  int64_t n, heads, kv_heads, dim, block_size, num_slots, max_blocks, window;
  float scale;
};

// q, k and v arrive as views into the layer's fused qkv product: rows and heads strided, each
// head's dim contiguous. Read in place rather than copied.
struct Strided {
  at::Tensor t;
  int64_t row, head;
  explicit Strided(const at::Tensor& x) : t(x.stride(2) == 1 ? x : x.contiguous()), row(t.stride(0)), head(t.stride(1)) {}
  template <typename T>
  const T* at(int64_t i, int64_t h) const { return t.data_ptr<T>() + i * row + h * head; }
};

// The context's rows sit in blocks scattered over the pool, where the hardware prefetcher loses the
// stream at every block edge: rows kAhead keys ahead are asked for in software.
constexpr int64_t kAhead = 8;

template <int Hint, typename T>
inline void prefetch_row(const T* row, int64_t D) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t b = 0; b < D * static_cast<int64_t>(sizeof(T)); b += 64) {
    _mm_prefetch(p + b, static_cast<decltype(_MM_HINT_T0)>(Hint));
  }
}

// One sequence's query heads that share KV head g, over its context [first, len).
template <typename T>
void attend(const Shape& s, const Strided& q, int64_t i, const T* keys, const T* values, const int64_t* table,
            int64_t len, int64_t g, T* out) {
  const int64_t group = s.heads / s.kv_heads;
  const int64_t D = s.dim;
  const int64_t first = s.window > 0 ? std::max<int64_t>(0, len - s.window) : 0;
  const int64_t span = len - first;
  // Each thread's buffers live across calls: a step runs this for every (sequence, KV head) of every layer.
  thread_local std::vector<float> qf, acc, scores;
  thread_local std::vector<const T*> k, v;  // the context's rows of KV head g, through the block table
  qf.resize(group * D);
  acc.resize(D);
  scores.resize(group * span);
  k.resize(span);
  v.resize(span);
  for (int64_t t = 0; t < span; ++t) {
    const int64_t pos = first + t;
    const int64_t offset = ((table[pos / s.block_size] * s.block_size + pos % s.block_size) * s.kv_heads + g) * D;
    k[t] = keys + offset;
    v[t] = values + offset;
  }
  for (int64_t j = 0; j < group; ++j) {
    const T* head = q.at<T>(i, g * group + j);
    for (int64_t d = 0; d < D; ++d) qf[j * D + d] = static_cast<float>(head[d]) * s.scale;
  }
  // Scores, four keys at a time: each key row is read once for the whole group, from L1.
  int64_t t = 0;
  for (; t + 4 <= span; t += 4) {
    for (int r = 0; r < 4; ++r) {
      if (t + kAhead + r < span) prefetch_row<_MM_HINT_T0>(k[t + kAhead + r], D);
      prefetch_row<_MM_HINT_T1>(v[t + r], D);  // V's turn comes after the softmax: on its way meanwhile
    }
    for (int64_t j = 0; j < group; ++j) {
      float four[4];
      dot4(qf.data() + j * D, k.data() + t, D, four);
      std::copy_n(four, 4, scores.data() + j * span + t);
    }
  }
  for (; t < span; ++t) {
    for (int64_t j = 0; j < group; ++j) scores[j * span + t] = dot(qf.data() + j * D, k[t], D);
  }
  for (int64_t j = 0; j < group; ++j) {
    float* p = scores.data() + j * span;
    const float top = *std::max_element(p, p + span);
    const Vec shift = simd::broadcast(-top);
    Vec sums = simd::zeros();
    int64_t u = 0;
    for (; u + kLanes <= span; u += kLanes) {
      const Vec e = simd::exp_nonpositive(simd::add(simd::load(p + u), shift));
      simd::store(p + u, e);
      sums = simd::add(sums, e);
    }
    float total = simd::sum(sums);
    for (; u < span; ++u) {
      p[u] = std::exp(p[u] - top);
      total += p[u];
    }
    weighted_sum(p, v.data(), span, D, acc.data());
    const float inv = 1.0f / total;
    T* o = out + (g * group + j) * D;
    for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(acc[d] * inv);
  }
}

void check_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cache,
                const at::Tensor& slots, const at::Tensor& block_table, const at::Tensor& seq_lens,
                int64_t block_size) {
  for (const at::Tensor* t : {&q, &k, &v, &cache, &slots, &block_table, &seq_lens}) {
    TORCH_CHECK(t->device().is_cpu(), "paged_decode_attention: CPU tensors only");
  }
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "paged_decode_attention: q, k, v must be [n, heads, dim]");
  TORCH_CHECK(cache.dim() == 4 && cache.size(0) == 2 && cache.is_contiguous(),
              "paged_decode_attention: the cache must be a contiguous [2, slots, kv_heads, dim]");
  TORCH_CHECK(q.scalar_type() == cache.scalar_type() && k.scalar_type() == cache.scalar_type() &&
                  v.scalar_type() == cache.scalar_type(),
              "paged_decode_attention: q, k, v and the cache must share a dtype");
  const int64_t n = q.size(0), kv_heads = cache.size(2), dim = cache.size(3);
  TORCH_CHECK(q.size(2) == dim && q.size(1) % kv_heads == 0,
              "paged_decode_attention: q must be [n, a multiple of the cache's kv_heads, its dim]");
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == n && k.size(1) == kv_heads && k.size(2) == dim,
              "paged_decode_attention: k and v must be [n, kv_heads, dim] like the cache");
  TORCH_CHECK(slots.dim() == 1 && slots.size(0) == n && slots.scalar_type() == at::kLong,
              "paged_decode_attention: slots must be int64 [n]");
  TORCH_CHECK(block_table.dim() == 2 && block_table.size(0) == n && block_table.scalar_type() == at::kLong,
              "paged_decode_attention: block_table must be int64 [n, max_blocks]");
  TORCH_CHECK(seq_lens.dim() == 1 && seq_lens.size(0) == n && seq_lens.scalar_type() == at::kLong,
              "paged_decode_attention: seq_lens must be int64 [n]");
  TORCH_CHECK(block_size > 0 && cache.size(1) % block_size == 0,
              "paged_decode_attention: block_size must divide the cache's slots");
}

// Every slot the op will touch is checked before any is: a bad table or length is an error, not a
// read or write outside the cache.
void check_bounds(const Shape& s, const int64_t* slots, const int64_t* table, const int64_t* lens) {
  const int64_t num_blocks = s.num_slots / s.block_size;
  for (int64_t i = 0; i < s.n; ++i) {
    TORCH_CHECK(slots[i] >= 0 && slots[i] < s.num_slots, "paged_decode_attention: slot ", slots[i],
                " is outside the cache's ", s.num_slots);
    TORCH_CHECK(lens[i] >= 1 && lens[i] <= s.max_blocks * s.block_size, "paged_decode_attention: seq_len ",
                lens[i], " does not fit the block table's ", s.max_blocks, " blocks");
    const int64_t used = (lens[i] + s.block_size - 1) / s.block_size;
    for (int64_t b = 0; b < used; ++b) {
      const int64_t block = table[i * s.max_blocks + b];
      TORCH_CHECK(block >= 0 && block < num_blocks, "paged_decode_attention: block ", block,
                  " is outside the cache's ", num_blocks);
    }
  }
}

template <typename T>
void store_and_attend(const Shape& s, const Strided& q, const Strided& k, const Strided& v, at::Tensor& cache,
                      const int64_t* slot, const int64_t* table, const int64_t* lens, T* out) {
  T* keys = cache.data_ptr<T>();
  T* values = keys + s.num_slots * s.kv_heads * s.dim;
  for (int64_t i = 0; i < s.n; ++i) {
    for (int64_t h = 0; h < s.kv_heads; ++h) {
      const int64_t at_slot = (slot[i] * s.kv_heads + h) * s.dim;
      std::copy_n(k.at<T>(i, h), s.dim, keys + at_slot);
      std::copy_n(v.at<T>(i, h), s.dim, values + at_slot);
    }
  }
  const int64_t q_row = s.heads * s.dim;
  at::parallel_for(0, s.n * s.kv_heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t i = item / s.kv_heads, g = item % s.kv_heads;
      attend<T>(s, q, i, keys, values, table + i * s.max_blocks, lens[i], g, out + i * q_row);
    }
  });
}

}  // namespace

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& cache,
                                  const at::Tensor& slots, const at::Tensor& block_table, const at::Tensor& seq_lens,
                                  int64_t block_size, double scale, int64_t window) {
  check_args(q, k, v, cache, slots, block_table, seq_lens, block_size);
  const Strided qs(q), ks(k), vs(v);
  const at::Tensor sc = slots.contiguous(), tc = block_table.contiguous(), lc = seq_lens.contiguous();
  const Shape s{q.size(0),     q.size(1),  cache.size(2), cache.size(3), block_size,
                cache.size(1), tc.size(1), window,        static_cast<float>(scale)};
  const int64_t* slot = sc.data_ptr<int64_t>();
  const int64_t* table = tc.data_ptr<int64_t>();
  const int64_t* lens = lc.data_ptr<int64_t>();
  check_bounds(s, slot, table, lens);
  at::Tensor out = at::empty(q.sizes(), q.options());
  dispatch_model_dtype(q.scalar_type(), "paged_decode_attention", [&](auto tag) {
    store_and_attend(s, qs, ks, vs, cache, slot, table, lens, out.data_ptr<decltype(tag)>());
  });
  return out;
}

}  // namespace tokenmill
