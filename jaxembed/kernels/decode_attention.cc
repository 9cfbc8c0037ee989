// Decode-step attention over a KV cache, for x86-64 CPUs with AVX-512.
//
// For each row b of a decode step (one new token per sequence): writes the token's key and value
// into the cache at (slots[b], positions[b]), then
//   out[b, h] = softmax(scale * q[b, h] . K[slot, h / G, :, j]) V[slot, h / G, j, :]
// over the cache positions j the token sees: j <= its position, and within the window when one
// is given. The cache is updated in place (the outputs alias it). Keys and values are
// [S, K, M, Dh] (model.init_cache), as float32, bfloat16, or bfloat16 bits in uint16.
//
// Why: XLA spends a dozen small ops a layer on this (two scatters, two gathers of the cache's
// first kv_len positions, conversions, two products, the softmax) and each costs more in
// dispatch than in work: a one-row SmolLM2 step spent 1.5-2.5 ms of ~10 in them. Here it is one
// call per layer that reads only the positions in use, each head's as one contiguous run.
//
// Per task (row, kv head): scores of its G heads, 16 positions at a time (a vector of partial
// sums per position, summed across lanes together: Sum16), softmax, then the weighted sum of the
// value rows in register tiles of 4 heads x 64 dims.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "pool.h"
#include "vmath.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kLanes = 16;
constexpr int64_t kHeads = 4;  // query heads per register tile
constexpr int64_t kDims = 4;   // vectors of head dims per register tile
// Below this many cache entries (positions x kv heads, summed over rows) a step's attention is a
// few microseconds of work: sharing it with other threads would cost more than it saves.
constexpr int64_t kShareAbove = 1024;

// 16 cache values from p as float32 (lanes past `mask` are zero).
inline __m512 Load(const float* p, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, p); }
inline __m512 Load(const uint16_t* p, __mmask16 mask) {  // bfloat16 bits: the float's top half
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p)), 16));
}

// A float as the cache holds it; bfloat16 rounds to nearest even, as XLA's conversion does.
inline void Store(float x, float* p) { *p = x; }
inline void Store(float x, uint16_t* p) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) {  // NaN stays NaN
    *p = static_cast<uint16_t>((bits >> 16) | 0x40);
    return;
  }
  *p = static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

// Lane j of the result: the sum of v[j]'s 16 lanes. A tree of adds over pairs of vectors,
// interleaved at ever coarser grain, in place of 16 separate horizontal sums.
inline __m512 Sum16(const __m512* v) {
  __m512 a[8], b[4];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: [v2i, v2i+1, v2i, v2i+1] partial sums
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                         _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: v4i .. v4i+3, each summed over that lane
    const __m512d x = _mm512_castps_pd(a[2 * i]), y = _mm512_castps_pd(a[2 * i + 1]);
    b[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  // Then over the four 128-bit lanes: 128-bit lane i of the result is b[i] summed across them.
  const __m512 c0 = _mm512_add_ps(_mm512_shuffle_f32x4(b[0], b[1], 0x88),
                                  _mm512_shuffle_f32x4(b[0], b[1], 0xdd));
  const __m512 c1 = _mm512_add_ps(_mm512_shuffle_f32x4(b[2], b[3], 0x88),
                                  _mm512_shuffle_f32x4(b[2], b[3], 0xdd));
  return _mm512_add_ps(_mm512_shuffle_f32x4(c0, c1, 0x88), _mm512_shuffle_f32x4(c0, c1, 0xdd));
}

inline __mmask16 Lanes(int64_t n) {
  return n >= kLanes ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << n) - 1);
}

// Scores of NG heads (q: NG rows of Dh) against 16 key rows from `key` (nj of them; the rest
// score zero), to sc[i * width] for head i: each position's partial sums over Dh in one vector,
// then all 16 summed across lanes at once.
template <int NG, typename T>
void Scores16(const float* q, int64_t dh, const T* key, int64_t nj, float* sc, int64_t width) {
  __m512 part[NG][kLanes];
  for (int64_t p = 0; p < kLanes; ++p) {
    __m512 acc[NG];
    for (int i = 0; i < NG; ++i) acc[i] = _mm512_setzero_ps();
    if (p < nj)
      for (int64_t c = 0; c < dh; c += kLanes) {
        const __m512 k = Load(key + p * dh + c, Lanes(kLanes));
        for (int i = 0; i < NG; ++i)
          acc[i] = _mm512_fmadd_ps(_mm512_loadu_ps(q + i * dh + c), k, acc[i]);
      }
    for (int i = 0; i < NG; ++i) part[i][p] = acc[i];
  }
  for (int i = 0; i < NG; ++i) _mm512_storeu_ps(sc + i * width, Sum16(part[i]));
}

// out[i, :16 ND] = inv[i] * sum over j < n of w[i * width + j] * values[j, :16 ND], for NG heads:
// one register tile over all n value rows (rows dh apart).
template <int NG, int ND, typename T>
void Weighted(const float* w, int64_t width, const T* values, int64_t dh, int64_t n,
              const float* inv, float* out, int64_t out_stride) {
  __m512 acc[NG][ND];
  for (int i = 0; i < NG; ++i)
    for (int c = 0; c < ND; ++c) acc[i][c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    __m512 v[ND];
    for (int c = 0; c < ND; ++c) v[c] = Load(values + j * dh + c * kLanes, Lanes(kLanes));
    for (int i = 0; i < NG; ++i) {
      const __m512 x = _mm512_set1_ps(w[i * width + j]);
      for (int c = 0; c < ND; ++c) acc[i][c] = _mm512_fmadd_ps(x, v[c], acc[i][c]);
    }
  }
  for (int i = 0; i < NG; ++i)
    for (int c = 0; c < ND; ++c)
      _mm512_storeu_ps(out + i * out_stride + c * kLanes,
                       _mm512_mul_ps(acc[i][c], _mm512_set1_ps(inv[i])));
}

template <typename T>
using ScoresFn = void (*)(const float*, int64_t, const T*, int64_t, float*, int64_t);
template <typename T>
constexpr ScoresFn<T> kScores[kHeads] = {Scores16<1, T>, Scores16<2, T>, Scores16<3, T>,
                                         Scores16<4, T>};
template <typename T>
using WeightedFn = void (*)(const float*, int64_t, const T*, int64_t, int64_t, const float*,
                            float*, int64_t);
template <int NG, typename T>
constexpr WeightedFn<T> kWeightedRow[kDims] = {Weighted<NG, 1, T>, Weighted<NG, 2, T>,
                                               Weighted<NG, 3, T>, Weighted<NG, 4, T>};
template <typename T>
constexpr const WeightedFn<T>* kWeighted[kHeads] = {kWeightedRow<1, T>, kWeightedRow<2, T>,
                                                    kWeightedRow<3, T>, kWeightedRow<4, T>};

struct Shape {
  int64_t b, h, kv, g, dh, slots, m;
};

template <typename T>
struct Job {
  Shape s;
  const float* q;
  T *kc, *vc;
  const int32_t *slot, *pos;
  float* out;
  float scale, softcap;
  int64_t window;  // 0: none
  jaxembed::Tasks tasks;

  // The key (or value) cache of (slot, kv head): [M, Dh].
  T* Keys(int64_t slot, int64_t kh) const { return kc + (slot * s.kv + kh) * s.m * s.dh; }
  T* Values(int64_t slot, int64_t kh) const { return vc + (slot * s.kv + kh) * s.m * s.dh; }

  void Write(const float* k, const float* v) const {
    for (int64_t r = 0; r < s.b; ++r)
      for (int64_t kh = 0; kh < s.kv; ++kh) {
        const float* kr = k + (r * s.kv + kh) * s.dh;
        const float* vr = v + (r * s.kv + kh) * s.dh;
        T* keys = Keys(slot[r], kh) + pos[r] * s.dh;
        T* values = Values(slot[r], kh) + pos[r] * s.dh;
        for (int64_t d = 0; d < s.dh; ++d) {
          Store(kr[d], keys + d);
          Store(vr[d], values + d);
        }
      }
  }

  // Row r, kv head kh: its G heads' scores over the positions [lo, hi), softmax, weighted sum.
  void Task(int64_t task, std::vector<float>& sc) const {
    const int64_t r = task / s.kv, kh = task % s.kv;
    const int64_t hi = pos[r] + 1, lo = window > 0 ? std::max<int64_t>(0, hi - window) : 0;
    const int64_t n = hi - lo, width = (n + kLanes - 1) / kLanes * kLanes;
    const T* keys = Keys(slot[r], kh);
    const T* values = Values(slot[r], kh);
    const float* qr = q + (r * s.h + kh * s.g) * s.dh;  // [G, Dh]
    sc.resize(s.g * (width + 1));
    // Scores, per block of 16 positions and up to 4 heads.
    for (int64_t j = 0; j < n; j += kLanes)
      for (int64_t g0 = 0; g0 < s.g; g0 += kHeads)
        kScores<T>[std::min(kHeads, s.g - g0) - 1](qr + g0 * s.dh, s.dh, keys + (lo + j) * s.dh,
                                                   std::min(kLanes, n - j), &sc[g0 * width + j],
                                                   width);
    // Softmax per head over its n positions; 1 / sum goes to the output.
    const float minus_inf = -std::numeric_limits<float>::infinity();
    float* inv = &sc[s.g * width];  // per head: 1 / its sum
    for (int64_t i = 0; i < s.g; ++i) {
      float* p = &sc[i * width];
      __m512 mx = _mm512_set1_ps(minus_inf);
      for (int64_t j = 0; j < width; j += kLanes) {
        __m512 x = _mm512_mul_ps(_mm512_loadu_ps(p + j), _mm512_set1_ps(scale));
        if (softcap > 0) x = jaxembed::Softcap(x, softcap);
        x = _mm512_mask_blend_ps(Lanes(n - j), _mm512_set1_ps(minus_inf), x);
        _mm512_storeu_ps(p + j, x);
        mx = _mm512_max_ps(mx, x);
      }
      const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
      __m512 sum = _mm512_setzero_ps();
      for (int64_t j = 0; j < width; j += kLanes) {
        const __m512 e = _mm512_maskz_mov_ps(
            Lanes(n - j), jaxembed::Exp(_mm512_sub_ps(_mm512_loadu_ps(p + j), m)));
        _mm512_storeu_ps(p + j, e);
        sum = _mm512_add_ps(sum, e);
      }
      inv[i] = 1.0f / _mm512_reduce_add_ps(sum);
    }
    // Output: up to 4 heads x 64 dims per register tile.
    for (int64_t g0 = 0; g0 < s.g; g0 += kHeads)
      for (int64_t d0 = 0; d0 < s.dh; d0 += kDims * kLanes)
        kWeighted<T>[std::min(kHeads, s.g - g0) - 1][std::min(kDims, (s.dh - d0) / kLanes) - 1](
            &sc[g0 * width], width, values + lo * s.dh + d0, s.dh, n, &inv[g0],
            out + (r * s.h + kh * s.g + g0) * s.dh + d0, s.dh);
  }

  void Run() {
    std::vector<float> sc;  // this thread's scores, reused from task to task
    tasks.Run([&](int64_t t) { Task(t, sc); });
  }
};

template <typename T>
ffi::Error Attend(ffi::ThreadPool& pool, const Shape& s, const float* q, const float* k,
                  const float* v, const void* kc_in, const void* vc_in, void* kc, void* vc,
                  const int32_t* slot, const int32_t* pos, int64_t window, float* out,
                  float scale, float softcap) {
  const size_t kc_bytes = s.slots * s.kv * s.dh * s.m * sizeof(T);
  // The outputs alias the cache; should XLA ever give them buffers of their own, they start as
  // copies of it.
  if (kc != kc_in) std::memcpy(kc, kc_in, kc_bytes);
  if (vc != vc_in) std::memcpy(vc, vc_in, kc_bytes);
  auto job = std::make_shared<Job<T>>();
  job->s = s;
  job->q = q;
  job->kc = static_cast<T*>(kc);
  job->vc = static_cast<T*>(vc);
  job->slot = slot;
  job->pos = pos;
  job->out = out;
  job->scale = scale;
  job->softcap = softcap;
  job->window = window;
  job->Write(k, v);
  job->tasks.count = s.b * s.kv;
  int64_t entries = 0;
  for (int64_t r = 0; r < s.b; ++r) entries += (pos[r] + 1) * s.kv;
  if (entries > kShareAbove) {
    jaxembed::Share(pool, job, /*quick=*/true);
  } else {
    job->Run();
  }
  return ffi::Error::Success();
}

ffi::Error DecodeAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                               ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                               ffi::AnyBuffer kc_in, ffi::AnyBuffer vc_in,
                               ffi::Buffer<ffi::S32> slots, ffi::Buffer<ffi::S32> positions,
                               ffi::Buffer<ffi::S32> window, ffi::ResultBuffer<ffi::F32> out,
                               ffi::Result<ffi::AnyBuffer> kc, ffi::Result<ffi::AnyBuffer> vc,
                               float scale, float softcap) {
  const auto qd = q.dimensions(), kd = k.dimensions(), cd = kc_in.dimensions();
  if (qd.size() != 3 || kd.size() != 3 || cd.size() != 4 || vc_in.dimensions().size() != 4)
    return ffi::Error::InvalidArgument(
        "decode_attention: q [B, H, Dh], k and v [B, K, Dh], caches [S, K, M, Dh]");
  const Shape s{qd[0], qd[1], kd[1], kd[1] ? qd[1] / kd[1] : 0, qd[2], cd[0], cd[2]};
  const auto vd = vc_in.dimensions();
  if (kd[0] != s.b || kd[2] != s.dh || s.kv == 0 || s.h % s.kv || s.dh % kLanes ||
      !std::equal(kd.begin(), kd.end(), v.dimensions().begin()) || cd[1] != s.kv ||
      cd[3] != s.dh || !std::equal(cd.begin(), cd.end(), vd.begin()) ||
      slots.element_count() != s.b || positions.element_count() != s.b ||
      kc_in.element_type() != vc_in.element_type())
    return ffi::Error::InvalidArgument("decode_attention: shapes of q, k, v and caches disagree");
  const int32_t* slot = slots.typed_data();
  const int32_t* pos = positions.typed_data();
  for (int64_t r = 0; r < s.b; ++r)  // a bad index would write outside the cache
    if (slot[r] < 0 || slot[r] >= s.slots || pos[r] < 0 || pos[r] >= s.m)
      return ffi::Error::InvalidArgument("decode_attention: a slot or position is out of range");
  const int64_t w = window.typed_data()[0];
  switch (kc_in.element_type()) {
    case ffi::DataType::F32:
      return Attend<float>(pool, s, q.typed_data(), k.typed_data(), v.typed_data(),
                           kc_in.untyped_data(), vc_in.untyped_data(), kc->untyped_data(),
                           vc->untyped_data(), slot, pos, w, out->typed_data(), scale, softcap);
    case ffi::DataType::BF16:
    case ffi::DataType::U16:
      return Attend<uint16_t>(pool, s, q.typed_data(), k.typed_data(), v.typed_data(),
                              kc_in.untyped_data(), vc_in.untyped_data(), kc->untyped_data(),
                              vc->untyped_data(), slot, pos, w, out->typed_data(), scale,
                              softcap);
    default:
      return ffi::Error::InvalidArgument(
          "decode_attention: the cache is float32, bfloat16 or uint16 (bfloat16 bits)");
  }
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxembedDecodeAttention, DecodeAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<float>("scale")
                                  .Attr<float>("softcap"));
