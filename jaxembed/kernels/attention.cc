// Prefill self-attention over rows that pack several sequences, for x86-64 CPUs with AVX-512.
//
// out[b, t, h] = softmax(scale * q[b, t, h] . k[b, j, h / G]) v[b, j, h / G] over the keys j a
// token sees: those of its own segment (a contiguous run of equal segment ids in the row), at or
// before it when causal, and within the window when one is given. float32 throughout.
//
// Why: XLA computes every (query block, key) score of a row and masks most of them away. A
// 1024-token row that packs a dozen sequences needs a few percent of its T x T scores; XLA also
// materializes the scores, slices and transposes, and on the CPU that made attention about half
// of an embedding step. Here each block of queries reads only the span of keys its segments
// cover, scores stay in a small per-task buffer, and the output lands in [B, T, H, Dh], ready
// for the output projection.
//
// Per task (row b, kv head, block of queries): the keys' span is copied transposed, [Dh, span],
// so that 16 keys' scores are one vector; scores go in register tiles of 6 query vectors x 32
// keys, softmax runs per query vector over its own keys, and the weighted sum of values in tiles
// of 6 query vectors x 64 dims.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <memory>
#include <vector>

#include "pool.h"
#include "vmath.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kLanes = 16;
constexpr int64_t kRows = 6;           // query vectors per register tile
constexpr int64_t kBlockVectors = 96;  // query vectors (tokens x G) per task, at most

struct Shape {
  int64_t b, t, h, kv, dh, g;
};

struct Job {
  Shape s;
  const float *q, *k, *v;
  const int32_t* seg;
  float* out;
  float scale, softcap;
  bool causal;
  int64_t window;                   // 0: none
  std::vector<int64_t> first, end;  // per token: its segment run [first, end)
  int64_t blocks_per_head, tokens_per_block;
  jaxembed::Tasks tasks;

  // The keys token i sees: [lo, hi).
  void Keys(int64_t row, int64_t i, int64_t* lo, int64_t* hi) const {
    const int64_t x = row * s.t + i;
    *lo = first[x];
    *hi = causal ? i + 1 : end[x];
    if (window > 0) {
      *lo = std::max(*lo, i - window + 1);
      *hi = std::min(*hi, i + window);
    }
  }

  void Task(int64_t task, std::vector<float>& kt, std::vector<float>& sc) const {
    const int64_t row = task / (s.kv * blocks_per_head);
    const int64_t kh = (task / blocks_per_head) % s.kv;
    const int64_t t0 = (task % blocks_per_head) * tokens_per_block;
    const int64_t t1 = std::min(s.t, t0 + tokens_per_block);
    const int64_t dh = s.dh, g = s.g, nq = (t1 - t0) * g;
    int64_t lo = s.t, hi = 0;
    for (int64_t i = t0; i < t1; ++i) {
      int64_t a, e;
      Keys(row, i, &a, &e);
      lo = std::min(lo, a);
      hi = std::max(hi, e);
    }
    const int64_t span = hi - lo, width = (span + 31) / 32 * 32;
    // Keys transposed: kt[d * width + j] = k[row, lo + j, kh, d]; zero past the span.
    kt.assign(dh * width, 0.0f);
    for (int64_t j = 0; j < span; ++j) {
      const float* src = k + ((row * s.t + lo + j) * s.kv + kh) * dh;
      for (int64_t d = 0; d < dh; ++d) kt[d * width + j] = src[d];
    }
    sc.resize(nq * width);
    // Query vector r = (token t0 + r / g, head kh * g + r % g).
    auto qrow = [&](int64_t r) {
      return q + ((row * s.t + t0 + r / g) * s.h + kh * g + r % g) * dh;
    };
    // Scores: 6 query vectors x 32 keys per register tile.
    for (int64_t r0 = 0; r0 < nq; r0 += kRows) {
      const int64_t mr = std::min(kRows, nq - r0);
      const float* qr[kRows];
      for (int64_t r = 0; r < kRows; ++r) qr[r] = qrow(r0 + std::min(r, mr - 1));
      for (int64_t j = 0; j < width; j += 32) {
        __m512 acc[kRows][2];
        for (int r = 0; r < kRows; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
        for (int64_t d = 0; d < dh; ++d) {
          const __m512 k0 = _mm512_loadu_ps(&kt[d * width + j]);
          const __m512 k1 = _mm512_loadu_ps(&kt[d * width + j + kLanes]);
          for (int r = 0; r < kRows; ++r) {
            const __m512 x = _mm512_set1_ps(qr[r][d]);
            acc[r][0] = _mm512_fmadd_ps(x, k0, acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(x, k1, acc[r][1]);
          }
        }
        for (int64_t r = 0; r < mr; ++r) {
          _mm512_storeu_ps(&sc[(r0 + r) * width + j], acc[r][0]);
          _mm512_storeu_ps(&sc[(r0 + r) * width + j + kLanes], acc[r][1]);
        }
      }
    }
    // Softmax over each query vector's own keys; the rest of its row is zero. sums[r]: 1 / sum.
    std::vector<float> inv(nq);
    for (int64_t r = 0; r < nq; ++r) {
      int64_t a, e;
      Keys(row, t0 + r / g, &a, &e);
      a -= lo;
      e -= lo;
      float* p = &sc[r * width];
      const __m512 scale_v = _mm512_set1_ps(scale);
      __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
      for (int64_t j = 0; j < width; j += kLanes) {
        __m512 x = _mm512_mul_ps(_mm512_loadu_ps(p + j), scale_v);
        if (softcap > 0) x = jaxembed::Softcap(x, softcap);
        const __m512i idx = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(j)),
                                             _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10,
                                                               11, 12, 13, 14, 15));
        const __mmask16 in =
            _mm512_cmp_epi32_mask(idx, _mm512_set1_epi32(static_cast<int>(a)), _MM_CMPINT_NLT) &
            _mm512_cmp_epi32_mask(idx, _mm512_set1_epi32(static_cast<int>(e)), _MM_CMPINT_LT);
        x = _mm512_mask_blend_ps(in, _mm512_set1_ps(-std::numeric_limits<float>::infinity()), x);
        _mm512_storeu_ps(p + j, x);
        mx = _mm512_max_ps(mx, x);
      }
      const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
      __m512 sum = _mm512_setzero_ps();
      for (int64_t j = 0; j < width; j += kLanes) {
        const __m512 x = _mm512_loadu_ps(p + j);
        const __mmask16 in = _mm512_cmp_ps_mask(
            x, _mm512_set1_ps(-std::numeric_limits<float>::infinity()), _CMP_NEQ_OQ);
        const __m512 e_ = _mm512_maskz_mov_ps(in, jaxembed::Exp(_mm512_sub_ps(x, m)));
        _mm512_storeu_ps(p + j, e_);
        sum = _mm512_add_ps(sum, e_);
      }
      inv[r] = 1.0f / _mm512_reduce_add_ps(sum);
    }
    // Output: 6 query vectors x 64 dims per register tile, over the span's values.
    for (int64_t r0 = 0; r0 < nq; r0 += kRows) {
      const int64_t mr = std::min(kRows, nq - r0);
      for (int64_t d0 = 0; d0 < dh; d0 += 4 * kLanes) {
        const int64_t nd = std::min<int64_t>(4, (dh - d0) / kLanes);
        __m512 acc[kRows][4];
        for (int r = 0; r < kRows; ++r)
          for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
        for (int64_t j = 0; j < span; ++j) {
          const float* vr = v + ((row * s.t + lo + j) * s.kv + kh) * dh + d0;
          __m512 vv[4];
          for (int c = 0; c < 4; ++c) vv[c] = c < nd ? _mm512_loadu_ps(vr + c * kLanes)
                                                     : _mm512_setzero_ps();
          for (int r = 0; r < kRows; ++r) {
            if (r >= mr) break;
            const __m512 w = _mm512_set1_ps(sc[(r0 + r) * width + j]);
            for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_fmadd_ps(w, vv[c], acc[r][c]);
          }
        }
        for (int64_t r = 0; r < mr; ++r) {
          const int64_t rr = r0 + r;
          float* o = out + ((row * s.t + t0 + rr / g) * s.h + kh * g + rr % g) * dh + d0;
          const __m512 f = _mm512_set1_ps(inv[rr]);
          for (int64_t c = 0; c < nd; ++c)
            _mm512_storeu_ps(o + c * kLanes, _mm512_mul_ps(acc[r][c], f));
        }
      }
    }
  }

  void Run() {
    std::vector<float> kt, sc;  // this thread's buffers, reused from task to task
    tasks.Run([&](int64_t t) { Task(t, kt, sc); });
  }
};

ffi::Error AttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                         ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> seg,
                         ffi::Buffer<ffi::S32> window, ffi::ResultBuffer<ffi::F32> out,
                         float scale, float softcap, bool causal) {
  const auto qd = q.dimensions(), kd = k.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || v.dimensions().size() != 4 ||
      !std::equal(kd.begin(), kd.end(), v.dimensions().begin()))
    return ffi::Error::InvalidArgument("attention: q [B, T, H, Dh], k and v [B, T, K, Dh]");
  auto job = std::make_shared<Job>();
  Shape& s = job->s;
  s = {qd[0], qd[1], qd[2], kd[2], qd[3], kd[2] ? qd[2] / kd[2] : 0};
  if (kd[0] != s.b || kd[1] != s.t || kd[3] != s.dh || s.kv == 0 || s.h % s.kv ||
      s.dh % kLanes || seg.dimensions().size() != 2 || seg.dimensions()[0] != s.b ||
      seg.dimensions()[1] != s.t)
    return ffi::Error::InvalidArgument("attention: shapes of q, k, v and segment ids disagree");
  if (s.b == 0 || s.t == 0) return ffi::Error::Success();
  job->q = q.typed_data();
  job->k = k.typed_data();
  job->v = v.typed_data();
  job->seg = seg.typed_data();
  job->out = out->typed_data();
  job->scale = scale;
  job->softcap = softcap;
  job->causal = causal;
  job->window = window.typed_data()[0];
  job->first.resize(s.b * s.t);
  job->end.resize(s.b * s.t);
  for (int64_t row = 0; row < s.b; ++row) {
    const int32_t* sr = job->seg + row * s.t;
    for (int64_t i = 0, start = 0; i < s.t; ++i) {
      if (i > 0 && sr[i] != sr[i - 1]) start = i;
      job->first[row * s.t + i] = start;
    }
    for (int64_t i = s.t - 1, stop = s.t; i >= 0; --i) {
      if (i < s.t - 1 && sr[i] != sr[i + 1]) stop = i + 1;
      job->end[row * s.t + i] = stop;
    }
  }
  job->tokens_per_block = std::max<int64_t>(1, kBlockVectors / s.g);
  job->blocks_per_head = (s.t + job->tokens_per_block - 1) / job->tokens_per_block;
  job->tasks.count = s.b * s.kv * job->blocks_per_head;
  jaxembed::Share(pool, job, /*quick=*/false);  // a prefill's: long
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxembedAttention, AttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<float>("softcap")
                                  .Attr<bool>("causal"));
