// out[M, N] (float32) = x[M, K] (float32) @ w, for x86-64 CPUs with AVX-512, w in one of two
// packed layouts:
//
// - bfloat16 (AVX512-BF16): x rounded to bfloat16, products accumulated in float32.
//   Layout [N / 16, K / 2, 16, 2], held as its bits in uint16 (XLA's CPU backend copies and
//   slices bfloat16 arrays element by element, 10-20x slower than plain 16-bit data: a scan's
//   per-layer slice of stacked weights). For each block of 16 output columns, K / 2 rows of 64
//   bytes: the 16 columns' weights for inputs 2k and 2k + 1, interleaved, which is the operand
//   layout VDPBF16PS takes (it multiplies 32 bf16 pairs into 16 floats per instruction: twice
//   the float32 FMA rate, from weights half the size).
// - float32: [N / 16, K / 2, 2, 16], which is [N / 16, K, 16]: for each block of 16 output
//   columns, K rows of 64 bytes, one FMA operand each.
//
// Why: XLA's CPU dot runs few-row products (a decode step's 1-16 rows) at a third to a half of
// the machine's rate, and has no path that uses the bf16 dot-product instruction. In either
// layout one zmm load is one step of one column block, and each block is one sequential stream.
//
// Register tile: up to 6 rows x 4 column blocks (24 accumulators), over the whole K, so every
// weight load feeds up to 6 instructions and the accumulators never leave registers. Work is
// split over threads in tasks of (64 columns, up to 96 rows).
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <vector>

#include "pool.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kBlock = 16;     // float32 lanes in a zmm: columns per block
constexpr int64_t kPanel = 4;      // column blocks per task and per register tile
constexpr int64_t kTileRows = 6;   // rows per register tile
constexpr int64_t kTaskRows = 96;  // rows per task (a multiple of kTileRows)
constexpr int64_t kQuickRows = 64;  // at most this many rows: a short job (see pool.h)

// The two weight types. Each has its x element (what one broadcast holds: a bf16 pair, or a
// float), its steps over K (k-pairs, or single k), and its multiply-add.
struct Bf16 {
  using X = uint32_t;  // two bf16
  using W = uint32_t;
  static constexpr int64_t kPerStep = 2;
  static __m512 Fma(__m512 acc, X x, __m512i w) {
    return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_set1_epi32(static_cast<int>(x)), (__m512bh)w);
  }
};
struct F32 {
  using X = float;
  using W = float;
  static constexpr int64_t kPerStep = 1;
  static __m512 Fma(__m512 acc, X x, __m512i w) {
    return _mm512_fmadd_ps(_mm512_set1_ps(x), _mm512_castsi512_ps(w), acc);
  }
};

// acc[r][b] += sum over steps of x step r * w step (block b); then stored to out.
// x: rows of `steps` elements; w: block b at w + b * bstride, steps x 16 lanes each.
template <typename T, int MR, int NB>
void Tile(const typename T::X* x, int64_t steps, const typename T::W* w, int64_t bstride,
          float* out, int64_t ldo) {
  __m512 acc[MR][NB];
  for (int r = 0; r < MR; ++r)
    for (int b = 0; b < NB; ++b) acc[r][b] = _mm512_setzero_ps();
  for (int64_t k = 0; k < steps; ++k) {
    __m512i wv[NB];
    for (int b = 0; b < NB; ++b)
      wv[b] = _mm512_loadu_si512(reinterpret_cast<const void*>(w + b * bstride + k * kBlock));
    for (int r = 0; r < MR; ++r) {
      const typename T::X a = x[r * steps + k];
      for (int b = 0; b < NB; ++b) acc[r][b] = T::Fma(acc[r][b], a, wv[b]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int b = 0; b < NB; ++b) _mm512_storeu_ps(out + r * ldo + b * kBlock, acc[r][b]);
}

template <typename T>
using TileFn = void (*)(const typename T::X*, int64_t, const typename T::W*, int64_t, float*,
                        int64_t);

template <typename T, int MR>
constexpr TileFn<T> kRowTiles[kPanel] = {Tile<T, MR, 1>, Tile<T, MR, 2>, Tile<T, MR, 3>,
                                         Tile<T, MR, 4>};
template <typename T>
constexpr const TileFn<T>* kTiles[kTileRows] = {kRowTiles<T, 1>, kRowTiles<T, 2>,
                                                kRowTiles<T, 3>, kRowTiles<T, 4>,
                                                kRowTiles<T, 5>, kRowTiles<T, 6>};

// float32 rows [m, k] -> bf16 (round to nearest even), k even; 16 at a time, tail masked.
void ToBf16(const float* x, int64_t m, int64_t k, uint16_t* xb) {
  for (int64_t r = 0; r < m; ++r) {
    const float* src = x + r * k;
    uint16_t* dst = xb + r * k;
    for (int64_t j = 0; j < k; j += kBlock) {
      const int64_t n = std::min(kBlock, k - j);
      const __mmask16 mask = static_cast<__mmask16>((1u << n) - 1);
      const __m256bh h = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, src + j));
      _mm256_mask_storeu_epi16(dst + j, mask, (__m256i)h);
    }
  }
}

template <typename T>
struct Job {
  const typename T::X* x;  // [m, steps]
  const typename T::W* w;
  float* out;
  int64_t m, steps, blocks, row_tasks;
  std::vector<uint16_t> xb;  // x rounded to bf16, for Bf16
  jaxembed::Tasks tasks;

  void Task(int64_t t) const {
    const int64_t panel = t / row_tasks, lo = (t % row_tasks) * kTaskRows;
    const int64_t hi = std::min(m, lo + kTaskRows);
    const int64_t b0 = panel * kPanel, nb = std::min(kPanel, blocks - b0);
    const int64_t bstride = steps * kBlock, n = blocks * kBlock;
    for (int64_t r = lo; r < hi; r += kTileRows) {
      const int64_t mr = std::min(kTileRows, hi - r);
      kTiles<T>[mr - 1][nb - 1](x + r * steps, steps, w + b0 * bstride, bstride,
                                out + r * n + b0 * kBlock, n);
    }
  }

  void Run() {
    tasks.Run([this](int64_t t) { Task(t); });
  }
};

template <typename T>
ffi::Error Matmul(ffi::ThreadPool& pool, const float* x, int64_t m, int64_t k, const void* w,
                  int64_t blocks, float* out) {
  if (m == 0 || blocks == 0) return ffi::Error::Success();
  auto job = std::make_shared<Job<T>>();
  if constexpr (std::is_same_v<T, Bf16>) {
    job->xb.resize(m * k);
    ToBf16(x, m, k, job->xb.data());
    job->x = reinterpret_cast<const uint32_t*>(job->xb.data());
  } else {
    job->x = x;
  }
  job->w = static_cast<const typename T::W*>(w);
  job->out = out;
  job->m = m;
  job->steps = k / T::kPerStep;
  job->blocks = blocks;
  job->row_tasks = (m + kTaskRows - 1) / kTaskRows;
  job->tasks.count = job->row_tasks * ((blocks + kPanel - 1) / kPanel);
  // A decode step's rows (up to 64) make short jobs; an embedding step's hundreds, long ones.
  jaxembed::Share(pool, job, /*quick=*/m <= kQuickRows);
  return ffi::Error::Success();
}

ffi::Error Bf16MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                          ffi::Buffer<ffi::U16> w, ffi::ResultBuffer<ffi::F32> out) {
  const auto xd = x.dimensions(), wd = w.dimensions(), od = out->dimensions();
  if (xd.size() != 2 || wd.size() != 4 || od.size() != 2)
    return ffi::Error::InvalidArgument("bf16_matmul: x [M, K], w [N/16, K/2, 16, 2]");
  if (wd[1] * 2 != xd[1] || wd[2] != kBlock || wd[3] != 2 || od[0] != xd[0] ||
      od[1] != wd[0] * kBlock)
    return ffi::Error::InvalidArgument("bf16_matmul: shapes of x, w and out do not agree");
  return Matmul<Bf16>(pool, x.typed_data(), xd[0], xd[1], w.typed_data(), wd[0],
                      out->typed_data());
}

ffi::Error F32MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                         ffi::ResultBuffer<ffi::F32> out) {
  const auto xd = x.dimensions(), wd = w.dimensions(), od = out->dimensions();
  if (xd.size() != 2 || wd.size() != 4 || od.size() != 2)
    return ffi::Error::InvalidArgument("f32_matmul: x [M, K], w [N/16, K/2, 2, 16]");
  if (wd[1] * 2 != xd[1] || wd[2] != 2 || wd[3] != kBlock || od[0] != xd[0] ||
      od[1] != wd[0] * kBlock)
    return ffi::Error::InvalidArgument("f32_matmul: shapes of x, w and out do not agree");
  return Matmul<F32>(pool, x.typed_data(), xd[0], xd[1], w.typed_data(), wd[0],
                     out->typed_data());
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxembedBf16Matmul, Bf16MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxembedF32Matmul, F32MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
