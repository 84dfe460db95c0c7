// Worker layer: decode attention that reads the paged KV cache in place (CPU, OpenMP).
//
// One work item is one (decode row, KV head): the query heads sharing that KV
// head (the GQA group, in passes of up to four) are handled together, so each
// key and value row is read from the cache once per pass. Keys are found
// through the row's block ids; only the visible range [begin, end) is read,
// so blocks outside a sliding window (possibly the null block) are never
// touched. Scores, softmax and the weighted sum are float32 whatever the
// cache dtype. Two passes over the keys (scores, then values) instead of an
// online softmax: a row's scores fit in a small buffer, and the code stays
// short.
//
// Built by cpu_decode_attention.py with -fopenmp; it links against the
// libgomp torch already loaded, so both share one thread pool.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

using bf16 = uint16_t;  // bfloat16 bits: the top half of a float32

// GCC/Clang vector extensions: 16 float lanes, lowered to whatever SIMD the target has.
constexpr int64_t kLanes = 16;
// The value pass keeps kChunksPerPass x kLanes output lanes per head in registers;
// head_dim must be a multiple of kLanes * kChunksPerPass (the caller checks).
constexpr int64_t kChunksPerPass = 4;
// Blocks are scattered in memory, so the hardware prefetcher loses the stream
// at every block boundary; fetching a few keys ahead hides that (15-20% faster).
constexpr int64_t kPrefetchKeys = 4;
typedef float floatv __attribute__((vector_size(kLanes * sizeof(float))));
typedef float float8 __attribute__((vector_size(8 * sizeof(float))));
typedef float float4 __attribute__((vector_size(4 * sizeof(float))));
typedef uint16_t u16v __attribute__((vector_size(kLanes * sizeof(uint16_t))));
typedef uint32_t u32v __attribute__((vector_size(kLanes * sizeof(uint32_t))));

inline floatv load(const float* p) {
  floatv v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline floatv load(const bf16* p) {
  u16v half;
  std::memcpy(&half, p, sizeof half);
  return (floatv)(__builtin_convertvector(half, u32v) << 16);
}

// A tree of halving adds: a plain loop over the lanes makes GCC emit a serial chain of 16 scalar adds.
inline float horizontal_sum(floatv v) {
  float8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
             __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  float4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

inline void store(float x, float* out) { *out = x; }

inline void store(float x, bf16* out) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) {  // NaN: keep it a (quiet) NaN rather than round it to inf
    *out = 0x7fc0;
    return;
  }
  bits += 0x7fffu + ((bits >> 16) & 1u);  // round to nearest, ties to even, as torch does
  *out = bf16(bits >> 16);
}

}  // namespace

// Mirrored field for field by _DecodeAttentionArgs in cpu_decode_attention.py.
struct DecodeAttentionArgs {
  const void* query;             // [num_tokens, num_heads, head_dim]
  const void* key_cache;         // [num_blocks, block_size, num_kv_heads, head_dim]
  const void* value_cache;       // same layout as key_cache
  void* output;                  // [num_tokens, num_heads, head_dim]
  const int64_t* token_indices;  // [num_rows] the flat-batch token of each decode row
  const int64_t* block_ids;      // [num_rows, max_blocks] key j of a row lives in block_ids[row][j / block_size]
  const int64_t* key_ranges;     // [num_rows, 2] visible keys [begin, end), counted like j above
  int64_t num_rows, max_blocks, block_size, num_heads, num_kv_heads, head_dim;
  float scale;
  float softcap;  // 0: no soft-capping
};

namespace {

// Query heads [first_head, first_head + Heads) of one decode row, all sharing KV head `kv_head`.
template <typename T, int Heads>
void attend_heads(const DecodeAttentionArgs& a, int64_t row, int64_t kv_head, int64_t first_head) {
  const int64_t dim = a.head_dim, num_chunks = dim / kLanes;
  const int64_t begin = a.key_ranges[2 * row], num_keys = a.key_ranges[2 * row + 1] - begin;
  const int64_t token_offset = a.token_indices[row] * a.num_heads * dim;
  const int64_t* blocks = a.block_ids + row * a.max_blocks;
  auto cache_row = [&](const void* cache, int64_t i) {
    const int64_t j = begin + i, slot = blocks[j / a.block_size] * a.block_size + j % a.block_size;
    return static_cast<const T*>(cache) + (slot * a.num_kv_heads + kv_head) * dim;
  };

  std::vector<floatv> query(Heads * num_chunks);
  for (int h = 0; h < Heads; ++h) {
    const T* q = static_cast<const T*>(a.query) + token_offset + (first_head + h) * dim;
    for (int64_t c = 0; c < num_chunks; ++c) query[h * num_chunks + c] = load(q + c * kLanes) * a.scale;
  }

  // Scores of every visible key for all heads: each key row is read once.
  std::vector<float> scores(Heads * num_keys);
  for (int64_t i = 0; i < num_keys; ++i) {
    const T* key = cache_row(a.key_cache, i);
    if (i + kPrefetchKeys < num_keys) {
      const char* ahead = reinterpret_cast<const char*>(cache_row(a.key_cache, i + kPrefetchKeys));
      for (int64_t byte = 0; byte < dim * int64_t(sizeof(T)); byte += 64) __builtin_prefetch(ahead + byte);
    }
    floatv sums[Heads] = {};
    for (int64_t c = 0; c < num_chunks; ++c) {
      const floatv k = load(key + c * kLanes);
      for (int h = 0; h < Heads; ++h) sums[h] += query[h * num_chunks + c] * k;
    }
    for (int h = 0; h < Heads; ++h) {
      float score = horizontal_sum(sums[h]);
      if (a.softcap > 0.0f) score = a.softcap * std::tanh(score / a.softcap);
      scores[h * num_keys + i] = score;
    }
  }

  // Softmax per head; the normalisation is applied once at the end.
  float inv_sum[Heads];
  for (int h = 0; h < Heads; ++h) {
    float* s = &scores[h * num_keys];
    float max_score = -INFINITY, sum = 0.0f;
    for (int64_t i = 0; i < num_keys; ++i) max_score = std::max(max_score, s[i]);
    for (int64_t i = 0; i < num_keys; ++i) {
      s[i] = std::exp(s[i] - max_score);
      sum += s[i];
    }
    inv_sum[h] = 1.0f / sum;
  }

  // Weighted sum of values, a few chunks of head_dim at a time so the accumulators stay in registers.
  for (int64_t c0 = 0; c0 < num_chunks; c0 += kChunksPerPass) {
    floatv acc[Heads][kChunksPerPass] = {};
    for (int64_t i = 0; i < num_keys; ++i) {
      const T* value = cache_row(a.value_cache, i) + c0 * kLanes;
      for (int64_t c = 0; c < kChunksPerPass; ++c) {
        const floatv v = load(value + c * kLanes);
        for (int h = 0; h < Heads; ++h) acc[h][c] += scores[h * num_keys + i] * v;
      }
    }
    for (int h = 0; h < Heads; ++h) {
      T* out = static_cast<T*>(a.output) + token_offset + (first_head + h) * dim + c0 * kLanes;
      for (int64_t c = 0; c < kChunksPerPass; ++c) {
        for (int64_t l = 0; l < kLanes; ++l) store(acc[h][c][l] * inv_sum[h], &out[c * kLanes + l]);
      }
    }
  }
}

// One (row, KV head): its query heads go in passes of up to 4, each pass reading the keys and values once.
template <typename T>
void attend_row(const DecodeAttentionArgs& a, int64_t row, int64_t kv_head) {
  const int64_t group = a.num_heads / a.num_kv_heads;
  for (int64_t first = kv_head * group, end = first + group; first < end; first += 4) {
    switch (std::min<int64_t>(end - first, 4)) {
      case 1: attend_heads<T, 1>(a, row, kv_head, first); break;
      case 2: attend_heads<T, 2>(a, row, kv_head, first); break;
      case 3: attend_heads<T, 3>(a, row, kv_head, first); break;
      default: attend_heads<T, 4>(a, row, kv_head, first); break;
    }
  }
}

template <typename T>
void decode_attention(const DecodeAttentionArgs& a) {
  // Rows differ in length (ragged contexts, windows), hence dynamic scheduling.
#pragma omp parallel for collapse(2) schedule(dynamic, 1)
  for (int64_t row = 0; row < a.num_rows; ++row) {
    for (int64_t kv_head = 0; kv_head < a.num_kv_heads; ++kv_head) attend_row<T>(a, row, kv_head);
  }
}

}  // namespace

extern "C" void pagoda_decode_attention_f32(const DecodeAttentionArgs* args) { decode_attention<float>(*args); }

extern "C" void pagoda_decode_attention_bf16(const DecodeAttentionArgs* args) { decode_attention<bf16>(*args); }
