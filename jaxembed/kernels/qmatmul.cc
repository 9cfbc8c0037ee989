// out[M, N] (float32) = x[M, K] (float32) @ w[N, K]^T, w a quantized weight in the layout of
// jaxembed/weights/quant.py, for x86-64 CPUs with AVX2, FMA and F16C:
//
//   w[n, k] = d[n, k / block] * sc[n, k / group] * q[n, k] - dmin[n, k / block] * m[n, k / group]
//
// How: as llama.cpp does, x is quantized per block too (int8, a float scale per block of the
// weight's `block` values), so that a product is integer dot products of 32 values (VPMADDUBSW:
// unsigned weight bytes times signed activation bytes, summed in pairs), weighted by the integer
// sub-scales (VPMADDWD) and summed in int32 over a whole block; floats come in once a block, as
// d times x's scale. The mins' part is dmin times the mins times the sums of each group of x.
// Signed weights (Q8_0, IQ4) take the sign trick: |w| times x with w's sign. A K-quant
// super-block of 256 values thus costs one float multiply-add per row and column.
//
// Precision: with `passes` 2, x is quantized twice: q1 = round(x / s), then the remainder,
// q2 = round((x / s - q1) * 254), at s / 254: x = s (q1 + q2 / 254) to within s / 508, about
// 4e-6 of the block's largest value, where one pass is within s / 2 (4e-3). One pass is
// llama.cpp's precision and suits embeddings; generation takes two, so that its greedy tokens
// are those of the float weights, at the cost of twice the integer products (which run at
// about four times float32's rate: two passes still beat float32 arithmetic).
//
// Why: the weights stay at their quantized size in memory (a decode step reads 4-6 bits a
// weight instead of 32), and the integer products run at up to four times float32's rate.
//
// Work: tasks of (up to kTaskRows rows, kTaskCols weight rows); in a task, register tiles of R
// rows by C weight rows, so each weight chunk is unpacked once per R rows and each x chunk
// loaded once per C weight rows; the task's quantized x stays in L2 across its weight rows.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "pool.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kTaskRows = 64;   // x rows per task
constexpr int64_t kTaskCols = 32;   // weight rows (output columns) per task
constexpr int64_t kQuickRows = 64;  // at most this many rows: a short job (see pool.h)
constexpr float kRemainder = 254.0f;
constexpr int64_t kPrefetchBlocks = 4;  // 256-value blocks ahead that a tile prefetches  // the second pass's scale: the first's / kRemainder

struct Layout {
  int64_t bits, group, block, min_offset;
  bool sign, scales, mins, dmin;
};

// A weight's arrays and their row strides.
struct Weight {
  Layout lay;
  int64_t n, k;
  const uint8_t* qs;
  const int8_t* sc;
  const int8_t* mn;
  const uint16_t* d;
  const uint16_t* dmin;
  int64_t qs_row() const { return k * lay.bits / 8; }
  int64_t g_row() const { return k / lay.group; }
  int64_t b_row() const { return k / lay.block; }
};

// x quantized per block of the weight's layout.
struct QuantX {
  int64_t m = 0, k = 0, block = 0, group = 0, passes = 1;
  std::vector<int8_t> q;       // [m, passes, k]
  std::vector<float> scale;    // [m, k / block]: the first pass's; the second's is / kRemainder
  std::vector<float> gsum;     // [m, k / group]: each group's sum of x as quantized
  const int8_t* row(int64_t r, int64_t pass) const { return q.data() + (r * passes + pass) * k; }
};

inline float Half(uint16_t h) { return _cvtsh_ss(h); }

inline float HSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 32 int32 (four vectors) -> 32 int8, in order.
inline __m256i PackBytes(const __m256i v[4]) {
  const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  const __m256i lo = _mm256_packs_epi32(v[0], v[1]), hi = _mm256_packs_epi32(v[2], v[3]);
  return _mm256_permutevar8x32_epi32(_mm256_packs_epi16(lo, hi), perm);
}

// One row of x, `block` values at a time: scale = max |x| / 127, q1 = round(x / scale) (as
// ggml's quantize_row_q8_K), with passes 2 the remainder q2 (see the top), and the float sums
// of each group of x as quantized.
void QuantizeRow(const float* x, int64_t k, int64_t block, int64_t group, int64_t passes,
                 int8_t* q1, int8_t* q2, float* scale, float* gsum) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const int rounding = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  for (int64_t b = 0; b < k / block; ++b) {
    const float* xb = x + b * block;
    __m256 amax = _mm256_setzero_ps();
    for (int64_t j = 0; j < block; j += 8)
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, _mm256_loadu_ps(xb + j)));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float mx = _mm_cvtss_f32(m4);
    scale[b] = mx / 127.0f;
    const __m256 inv = _mm256_set1_ps(mx > 0 ? 127.0f / mx : 0.0f);
    for (int64_t j = 0; j < block; j += 32) {
      __m256 xq[4];  // x as quantized, in units of the scale: q1 (+ q2 / kRemainder)
      __m256i v1[4], v2[4];
      for (int i = 0; i < 4; ++i) {
        const __m256 t = _mm256_mul_ps(_mm256_loadu_ps(xb + j + 8 * i), inv);
        const __m256 r = _mm256_round_ps(t, rounding);
        v1[i] = _mm256_cvtps_epi32(r);
        xq[i] = r;
        if (passes == 2) {
          const __m256 r2 = _mm256_round_ps(
              _mm256_mul_ps(_mm256_sub_ps(t, r), _mm256_set1_ps(kRemainder)), rounding);
          v2[i] = _mm256_cvtps_epi32(r2);
          xq[i] = _mm256_fmadd_ps(r2, _mm256_set1_ps(1.0f / kRemainder), r);
        }
      }
      const int64_t at = b * block + j;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q1 + at), PackBytes(v1));
      if (passes == 2) _mm256_storeu_si256(reinterpret_cast<__m256i*>(q2 + at), PackBytes(v2));
      // The mins' part takes the sums of x as quantized, not of x: its error then follows the
      // weights' own values (w = d q - m, centred) instead of the values' part alone (d q).
      const float s = scale[b];
      if (group == 16) {
        gsum[at / 16] = s * HSum(_mm256_add_ps(xq[0], xq[1]));
        gsum[at / 16 + 1] = s * HSum(_mm256_add_ps(xq[2], xq[3]));
      } else {
        gsum[at / 32] = s * HSum(_mm256_add_ps(_mm256_add_ps(xq[0], xq[1]),
                                               _mm256_add_ps(xq[2], xq[3])));
      }
    }
  }
}

// Chunk h (0 or 1) of the pair of 32-value chunks p of a weight row, as bytes. Nibbles hold 64
// values in 32 bytes, value j in the low nibble of byte j and value 32 + j in its high nibble (as
// Q4_K's own blocks do): the pair's load feeds both chunks.
template <int64_t kBits>
inline __m256i LoadChunk(const uint8_t* row, int64_t p, int h) {
  if constexpr (kBits == 4) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + p * 32));
    const __m256i mask = _mm256_set1_epi8(0x0F);
    return _mm256_and_si256(h ? _mm256_srli_epi16(v, 4) : v, mask);
  } else {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + (2 * p + h) * 32));
  }
}

// Pair sums (int16) of w times x over 32 values; signed w by the sign trick.
template <bool kSigned>
inline __m256i Products(__m256i w, __m256i wabs, __m256i x) {
  if constexpr (kSigned) return _mm256_maddubs_epi16(wabs, _mm256_sign_epi8(x, w));
  return _mm256_maddubs_epi16(w, x);
}

// The int16 sub-scales of chunk c of a 256-value block, from the block's int8 scales: for
// groups of 32, the chunk's scale in every lane (`scales` holds the 8 as int16 in both
// halves); for groups of 16, the first 8 lanes the chunk's first group's, the rest its second's
// (`scales` holds the 16 int8).
alignas(32) constexpr int8_t kShuffle32[8][32] = {
#define S(c) {2*c, 2*c+1, 2*c, 2*c+1, 2*c, 2*c+1, 2*c, 2*c+1, 2*c, 2*c+1, 2*c, 2*c+1, 2*c, 2*c+1, \
               2*c, 2*c+1, 2*c, 2*c+1, 2*c, 2*c+1, 2*c, 2*c+1, 2*c, 2*c+1, 2*c, 2*c+1, 2*c, 2*c+1, \
               2*c, 2*c+1, 2*c, 2*c+1}
    S(0), S(1), S(2), S(3), S(4), S(5), S(6), S(7)
#undef S
};
alignas(16) constexpr int8_t kShuffle16[8][16] = {
#define S(c) {2*c, 2*c, 2*c, 2*c, 2*c, 2*c, 2*c, 2*c, 2*c+1, 2*c+1, 2*c+1, 2*c+1, 2*c+1, 2*c+1, \
               2*c+1, 2*c+1}
    S(0), S(1), S(2), S(3), S(4), S(5), S(6), S(7)
#undef S
};

template <int64_t kGroup>
inline __m256i BlockScales(const int8_t* sb) {
  if constexpr (kGroup == 32) {
    const __m128i s = _mm_cvtepi8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(sb)));
    return _mm256_set_m128i(s, s);
  } else {
    return _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sb)));
  }
}

template <int64_t kGroup>
inline __m256i ChunkScales(__m256i scales, int64_t c) {
  if constexpr (kGroup == 32)
    return _mm256_shuffle_epi8(scales, _mm256_load_si256(
        reinterpret_cast<const __m256i*>(kShuffle32[c])));
  else
    return _mm256_cvtepi8_epi16(_mm_shuffle_epi8(
        _mm256_castsi256_si128(scales),
        _mm_load_si128(reinterpret_cast<const __m128i*>(kShuffle16[c]))));
}

// The mins of a 256-value block's groups, as floats times -dmin: 8 (groups of 32) or 16.
template <int64_t kGroup>
inline void BlockMins(const Layout& L, const int8_t* sb, const int8_t* mb, float dm,
                      __m256 out[2]) {
  const int8_t* src = mb ? mb : sb;
  const __m256 scale = _mm256_set1_ps(mb ? -dm : -dm * static_cast<float>(L.min_offset));
  for (int h = 0; h < (kGroup == 16 ? 2 : 1); ++h) {
    const __m256i m = _mm256_cvtepi8_epi32(
        _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + 8 * h)));
    out[h] = _mm256_mul_ps(_mm256_cvtepi32_ps(m), scale);
  }
}

// Blocks of 256 with integer sub-scales (K-quants, IQ4_XS): tile rows r0..r0+R against weight
// rows n0..n0+C, out[r][n] for each. Per pair of 32-value chunks each weight row's chunks are
// unpacked once and each row's x chunks loaded once; the integer sums stay in registers.
template <int64_t kBits, bool kSigned, int64_t kGroup, int P, int R, int C>
void SuperTile(const Weight& w, const QuantX& xq, int64_t r0, int64_t n0, float* out,
               int64_t ldo) {
  constexpr int64_t kGroups = 256 / kGroup;
  constexpr int kMinVectors = kGroup == 16 ? 2 : 1;
  const Layout& L = w.lay;
  const int64_t blocks = w.k / 256, qrow = w.qs_row(), grow = w.g_row(), brow = w.b_row();
  const bool has_min = L.mins || L.min_offset != 0;
  const int8_t* xrow[P][R];
  const float* xscale[R];
  const float* xgsum[R];
  for (int r = 0; r < R; ++r) {
    for (int p = 0; p < P; ++p) xrow[p][r] = xq.row(r0 + r, p);
    xscale[r] = xq.scale.data() + (r0 + r) * blocks;
    xgsum[r] = xq.gsum.data() + (r0 + r) * (w.k / kGroup);
  }
  __m256 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* qb[C];
    __m256i scales[C];
    for (int c = 0; c < C; ++c) {
      qb[c] = w.qs + (n0 + c) * qrow + b * 256 * kBits / 8;
      scales[c] = BlockScales<kGroup>(w.sc + (n0 + c) * grow + b * kGroups);
      // The weights stream from memory once a step (a decode step's few rows): ask for them a
      // few blocks ahead, past what the hardware prefetcher runs ahead of several streams.
      for (int64_t line = 0; line < 256 * kBits / 8; line += 64)
        _mm_prefetch(reinterpret_cast<const char*>(qb[c] + kPrefetchBlocks * 256 * kBits / 8 +
                                                   line), _MM_HINT_T0);
    }
    // The block's sub-scales as int16 vectors, one a chunk and weight row: read from L1 in the
    // loop below, so the registers hold only the sums, a chunk's weights and x.
    alignas(32) __m256i sv[C][8];
    for (int c = 0; c < C; ++c)
      for (int ch = 0; ch < 8; ++ch) sv[c][ch] = ChunkScales<kGroup>(scales[c], ch);
    __m256i isum[P][R][C];
    for (int p = 0; p < P; ++p)
      for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) isum[p][r][c] = _mm256_setzero_si256();
#pragma GCC unroll 1
    for (int64_t pair = 0; pair < 4; ++pair)
      for (int h = 0; h < 2; ++h) {
        const int64_t ch = 2 * pair + h;
        __m256i wv[C], wa[C];
        for (int c = 0; c < C; ++c) {
          wv[c] = LoadChunk<kBits>(qb[c], pair, h);
          wa[c] = kSigned ? _mm256_sign_epi8(wv[c], wv[c]) : wv[c];
        }
        for (int p = 0; p < P; ++p)
          for (int r = 0; r < R; ++r) {
            const __m256i xv = _mm256_loadu_si256(
                reinterpret_cast<const __m256i*>(xrow[p][r] + b * 256 + ch * 32));
            for (int c = 0; c < C; ++c)
              isum[p][r][c] = _mm256_add_epi32(
                  isum[p][r][c],
                  _mm256_madd_epi16(Products<kSigned>(wv[c], wa[c], xv), sv[c][ch]));
          }
      }
    for (int c = 0; c < C; ++c) {
      const float d = Half(w.d[(n0 + c) * brow + b]);
      __m256 mins[2];
      if (has_min)
        BlockMins<kGroup>(L, w.sc + (n0 + c) * grow + b * kGroups,
                          L.mins ? w.mn + (n0 + c) * grow + b * kGroups : nullptr,
                          Half((L.dmin ? w.dmin : w.d)[(n0 + c) * brow + b]), mins);
      for (int r = 0; r < R; ++r) {
        const float ds = d * xscale[r][b];
        acc[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[0][r][c]), _mm256_set1_ps(ds),
                                    acc[r][c]);
        if constexpr (P == 2)
          acc[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[1][r][c]),
                                      _mm256_set1_ps(ds / kRemainder), acc[r][c]);
        if (has_min)
          for (int h = 0; h < kMinVectors; ++h)
            acc[r][c] = _mm256_fmadd_ps(mins[h], _mm256_loadu_ps(xgsum[r] + b * kGroups + 8 * h),
                                        acc[r][c]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) out[r * ldo + n0 + c] = HSum(acc[r][c]);
}

// Blocks of 32 with one float scale each (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL): the mins are
// min_offset * dmin per block, a float dot product with x's block sums after the loop.
template <int64_t kBits, bool kSigned, int P, int R, int C>
void SimpleTile(const Weight& w, const QuantX& xq, int64_t r0, int64_t n0, float* out,
                int64_t ldo) {
  const Layout& L = w.lay;
  const int64_t blocks = w.k / 32, qrow = w.qs_row(), brow = w.b_row();
  const __m256i ones = _mm256_set1_epi16(1);
  const int8_t* xrow[P][R];
  const float* xscale[R];
  for (int r = 0; r < R; ++r) {
    for (int p = 0; p < P; ++p) xrow[p][r] = xq.row(r0 + r, p);
    xscale[r] = xq.scale.data() + (r0 + r) * blocks;
  }
  __m256 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
#pragma GCC unroll 1
  for (int64_t pair = 0; pair < blocks / 2; ++pair)
    for (int h = 0; h < 2; ++h) {
      const int64_t blk = 2 * pair + h;
      __m256i wv[C], wa[C];
      float d[C];
      for (int c = 0; c < C; ++c) {
        wv[c] = LoadChunk<kBits>(w.qs + (n0 + c) * qrow, pair, h);
        wa[c] = kSigned ? _mm256_sign_epi8(wv[c], wv[c]) : wv[c];
        d[c] = Half(w.d[(n0 + c) * brow + blk]);
      }
      for (int r = 0; r < R; ++r) {
        const float xs = xscale[r][blk];
        __m256i sum[P][C];
        for (int p = 0; p < P; ++p) {
          const __m256i xv = _mm256_loadu_si256(
              reinterpret_cast<const __m256i*>(xrow[p][r] + blk * 32));
          for (int c = 0; c < C; ++c)
            sum[p][c] = _mm256_madd_epi16(Products<kSigned>(wv[c], wa[c], xv), ones);
        }
        for (int c = 0; c < C; ++c) {
          __m256 f = _mm256_cvtepi32_ps(sum[0][c]);
          if constexpr (P == 2)
            f = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[1][c]),
                                _mm256_set1_ps(1.0f / kRemainder), f);
          acc[r][c] = _mm256_fmadd_ps(f, _mm256_set1_ps(d[c] * xs), acc[r][c]);
        }
      }
    }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      float mins = 0.0f;
      if (L.min_offset != 0) {
        const uint16_t* dm = (L.dmin ? w.dmin : w.d) + (n0 + c) * brow;
        const float* bs = xq.gsum.data() + (r0 + r) * blocks;
        __m256 m = _mm256_setzero_ps();
        int64_t b = 0;
        for (; b + 8 <= blocks; b += 8)
          m = _mm256_fmadd_ps(
              _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(dm + b))),
              _mm256_loadu_ps(bs + b), m);
        mins = HSum(m);
        for (; b < blocks; ++b) mins += Half(dm[b]) * bs[b];
        mins *= static_cast<float>(L.min_offset);
      }
      out[r * ldo + n0 + c] = HSum(acc[r][c]) - mins;
    }
}

using TileFn = void (*)(const Weight&, const QuantX&, int64_t, int64_t, float*, int64_t);

template <int P, int R, int C>
TileFn PickTile(const Layout& L) {
  if (L.block == 256) {
    if (L.bits == 4)
      return L.group == 16 ? SuperTile<4, false, 16, P, R, C> : SuperTile<4, false, 32, P, R, C>;
    if (L.sign)
      return L.group == 16 ? SuperTile<8, true, 16, P, R, C> : SuperTile<8, true, 32, P, R, C>;
    return L.group == 16 ? SuperTile<8, false, 16, P, R, C> : SuperTile<8, false, 32, P, R, C>;
  }
  if (L.bits == 4) return SimpleTile<4, false, P, R, C>;
  return L.sign ? SimpleTile<8, true, P, R, C> : SimpleTile<8, false, P, R, C>;
}

// The register tiles for a layout and a number of passes: rows x weight rows for the body of a
// task (main), for its last rows (edge), and for a task of single rows (a decode step of one
// stream: several weight rows at once, for independent sums to overlap).
struct Tiles {
  int64_t rows, cols, one_cols;
  TileFn main, main_edge, one, one_edge;
};

Tiles PickTiles(const Layout& L, int64_t passes) {
  // Two passes double the integer sums a tile keeps: half the weight rows per tile.
  if (passes == 2)
    return {4, 1, 2, PickTile<2, 4, 1>(L), PickTile<2, 4, 1>(L), PickTile<2, 1, 2>(L),
            PickTile<2, 1, 1>(L)};
  return {4, 2, 4, PickTile<1, 4, 2>(L), PickTile<1, 4, 1>(L), PickTile<1, 1, 4>(L),
          PickTile<1, 1, 1>(L)};
}

struct Job {
  Weight w;
  const QuantX* xq;
  float* out;
  int64_t m, row_tasks;
  Tiles tiles;
  jaxembed::Tasks tasks;

  void Task(int64_t t) const {
    const int64_t lo = (t % row_tasks) * kTaskRows, hi = std::min(m, lo + kTaskRows);
    const int64_t c0 = (t / row_tasks) * kTaskCols, c1 = std::min(w.n, c0 + kTaskCols);
    const Tiles& T = tiles;
    int64_t r = lo;
    for (; r + T.rows <= hi; r += T.rows) {
      int64_t n = c0;
      for (; n + T.cols <= c1; n += T.cols) T.main(w, *xq, r, n, out + r * w.n, w.n);
      for (; n < c1; ++n) T.main_edge(w, *xq, r, n, out + r * w.n, w.n);
    }
    for (; r < hi; ++r) {
      int64_t n = c0;
      for (; n + T.one_cols <= c1; n += T.one_cols) T.one(w, *xq, r, n, out + r * w.n, w.n);
      for (; n < c1; ++n) T.one_edge(w, *xq, r, n, out + r * w.n, w.n);
    }
  }

  void Run() {
    tasks.Run([this](int64_t t) { Task(t); });
  }
};

// The quantized x of the calling thread, reused from call to call (a fresh allocation per call
// would fault its pages in every time: megabytes for an embedding step).
QuantX& Quantize(const float* x, int64_t m, int64_t k, int64_t block, int64_t group,
                 int64_t passes) {
  thread_local QuantX xq;
  xq.m = m, xq.k = k, xq.block = block, xq.group = group, xq.passes = passes;
  xq.q.resize(m * passes * k);
  xq.scale.resize(m * (k / block));
  xq.gsum.resize(m * (k / group));
  for (int64_t r = 0; r < m; ++r)
    QuantizeRow(x + r * k, k, block, group, passes, xq.q.data() + r * passes * k,
                xq.q.data() + (r * passes + passes - 1) * k, xq.scale.data() + r * (k / block),
                xq.gsum.data() + r * (k / group));
  return xq;
}

ffi::Error QMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer qs,
                       ffi::AnyBuffer sc, ffi::AnyBuffer mn, ffi::Buffer<ffi::F16> d,
                       ffi::AnyBuffer dmin, ffi::ResultBuffer<ffi::F32> out, int64_t bits,
                       bool sign, int64_t group, int64_t block, bool scales, bool mins,
                       int64_t min_offset, bool has_dmin, int64_t passes) {
  const auto xd = x.dimensions(), od = out->dimensions();
  if (xd.size() != 2 || od.size() != 2 || od[0] != xd[0])
    return ffi::Error::InvalidArgument("qmatmul: x [M, K], out [M, N]");
  const int64_t m = xd[0], k = xd[1], n = od[1];
  if ((bits != 4 && bits != 8) || (group != 16 && group != 32) ||
      (block != 32 && block != 256) || (passes != 1 && passes != 2))
    return ffi::Error::InvalidArgument("qmatmul: unknown layout or passes");
  if (block == 32 && (scales || mins || group != 32))
    return ffi::Error::InvalidArgument("qmatmul: 32-value blocks have no sub-scales");
  if (block == 256 && !scales)
    return ffi::Error::InvalidArgument("qmatmul: 256-value blocks need sub-scales");
  if (k % block != 0 || k % 64 != 0 || qs.element_count() != n * k * bits / 8 ||
      d.element_count() != n * (k / block) ||
      (scales && sc.element_count() != n * (k / group)) ||
      (mins && mn.element_count() != n * (k / group)) ||
      (has_dmin && dmin.element_count() != n * (k / block)))
    return ffi::Error::InvalidArgument("qmatmul: shapes of x, the weight and out do not agree");
  if (m == 0 || n == 0) return ffi::Error::Success();
  auto job = std::make_shared<Job>();
  job->w = Weight{Layout{bits, group, block, min_offset, sign, scales, mins, has_dmin},
                  n,
                  k,
                  static_cast<const uint8_t*>(qs.untyped_data()),
                  static_cast<const int8_t*>(sc.untyped_data()),
                  static_cast<const int8_t*>(mn.untyped_data()),
                  reinterpret_cast<const uint16_t*>(d.typed_data()),
                  static_cast<const uint16_t*>(dmin.untyped_data())};
  job->xq = &Quantize(x.typed_data(), m, k, block, group, passes);
  job->out = out->typed_data();
  job->m = m;
  job->tiles = PickTiles(job->w.lay, passes);
  job->row_tasks = (m + kTaskRows - 1) / kTaskRows;
  job->tasks.count = job->row_tasks * ((n + kTaskCols - 1) / kTaskCols);
  jaxembed::Share(pool, job, /*quick=*/m <= kQuickRows);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxembedQMatmul, QMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("bits")
                                  .Attr<bool>("sign")
                                  .Attr<int64_t>("group")
                                  .Attr<int64_t>("block")
                                  .Attr<bool>("scales")
                                  .Attr<bool>("mins")
                                  .Attr<int64_t>("min_offset")
                                  .Attr<bool>("has_dmin")
                                  .Attr<int64_t>("passes"));
