// out[M, N] (float32) = x[M, K] (float32, rounded to bfloat16) @ w (bfloat16), accumulated in
// float32, for x86-64 CPUs with AVX512-BF16.
//
// Why: XLA's CPU dot runs few-row products (a decode step's 1-16 rows) at a third to a half of
// the machine's rate, and has no path that uses the bf16 dot-product instruction. VDPBF16PS
// multiplies 32 bf16 pairs and accumulates into 16 floats per instruction: twice the float32
// FMA rate, from weights half the size.
//
// Weight layout ("packed", made by jaxembed.kernels.pack): [N / 16, K / 2, 16, 2] bfloat16, held
// as its bits in uint16 (XLA's CPU backend copies and slices bfloat16 arrays element by element,
// 10-20x slower than plain 16-bit data: a scan's per-layer slice of stacked weights). For each
// block of 16 output columns, K / 2 rows of 64 bytes: the 16 columns' weights for inputs 2k and
// 2k + 1, interleaved, which is the operand layout VDPBF16PS takes. One zmm load is one k-pair
// of one column block, and each block is one sequential stream.
//
// Register tile: up to 6 rows x 4 column blocks (24 accumulators), over the whole K, so every
// weight load feeds up to 6 instructions and the accumulators never leave registers. Work is
// split over XLA's own CPU thread pool in tasks of (64 columns, up to 96 rows).
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

#include "pool.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kBlock = 16;     // float32 lanes in a zmm: columns per block
constexpr int64_t kPanel = 4;      // column blocks per task and per register tile
constexpr int64_t kTileRows = 6;   // rows per register tile
constexpr int64_t kTaskRows = 96;  // rows per task (a multiple of kTileRows)

// acc[r][b] += sum over k-pairs of x pair r * w pair (block b); then stored to out.
// xb: rows of kp uint32 (bf16 pairs); w: block b at w + b * bstride, kp x 16 uint32 each.
template <int MR, int NB>
void Tile(const uint32_t* xb, int64_t kp, const uint32_t* w, int64_t bstride, float* out,
          int64_t ldo) {
  __m512 acc[MR][NB];
  for (int r = 0; r < MR; ++r)
    for (int b = 0; b < NB; ++b) acc[r][b] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kp; ++k) {
    __m512i wv[NB];
    for (int b = 0; b < NB; ++b)
      wv[b] = _mm512_loadu_si512(reinterpret_cast<const void*>(w + b * bstride + k * kBlock));
    for (int r = 0; r < MR; ++r) {
      const __m512i a = _mm512_set1_epi32(static_cast<int>(xb[r * kp + k]));
      for (int b = 0; b < NB; ++b)
        acc[r][b] = _mm512_dpbf16_ps(acc[r][b], (__m512bh)a, (__m512bh)wv[b]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int b = 0; b < NB; ++b) _mm512_storeu_ps(out + r * ldo + b * kBlock, acc[r][b]);
}

using TileFn = void (*)(const uint32_t*, int64_t, const uint32_t*, int64_t, float*, int64_t);

template <int MR>
constexpr TileFn kRowTiles[kPanel] = {Tile<MR, 1>, Tile<MR, 2>, Tile<MR, 3>, Tile<MR, 4>};
constexpr const TileFn* kTiles[kTileRows] = {kRowTiles<1>, kRowTiles<2>, kRowTiles<3>,
                                            kRowTiles<4>, kRowTiles<5>, kRowTiles<6>};

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

struct Job {
  std::vector<uint16_t> xb;  // [m, k] bf16
  const uint32_t* w;
  float* out;
  int64_t m, kp, blocks, row_tasks;
  jaxembed::Tasks tasks;

  void Task(int64_t t) const {
    const int64_t panel = t / row_tasks, lo = (t % row_tasks) * kTaskRows;
    const int64_t hi = std::min(m, lo + kTaskRows);
    const int64_t b0 = panel * kPanel, nb = std::min(kPanel, blocks - b0);
    const int64_t bstride = kp * kBlock, n = blocks * kBlock;
    const uint32_t* xp = reinterpret_cast<const uint32_t*>(xb.data());
    for (int64_t r = lo; r < hi; r += kTileRows) {
      const int64_t mr = std::min(kTileRows, hi - r);
      kTiles[mr - 1][nb - 1](xp + r * kp, kp, w + b0 * bstride, bstride,
                             out + r * n + b0 * kBlock, n);
    }
  }

  void Run() {
    tasks.Run([this](int64_t t) { Task(t); });
  }
};

ffi::Error Bf16MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                          ffi::Buffer<ffi::U16> w, ffi::ResultBuffer<ffi::F32> out) {
  const auto xd = x.dimensions(), wd = w.dimensions(), od = out->dimensions();
  if (xd.size() != 2 || wd.size() != 4 || od.size() != 2)
    return ffi::Error::InvalidArgument("bf16_matmul: x [M, K], w [N/16, K/2, 16, 2]");
  const int64_t m = xd[0], k = xd[1];
  if (wd[1] * 2 != k || wd[2] != kBlock || wd[3] != 2 || od[0] != m || od[1] != wd[0] * kBlock)
    return ffi::Error::InvalidArgument("bf16_matmul: shapes of x, w and out do not agree");
  if (m == 0 || wd[0] == 0) return ffi::Error::Success();

  auto job = std::make_shared<Job>();
  job->xb.resize(m * k);
  ToBf16(x.typed_data(), m, k, job->xb.data());
  job->w = reinterpret_cast<const uint32_t*>(w.typed_data());
  job->out = out->typed_data();
  job->m = m;
  job->kp = k / 2;
  job->blocks = wd[0];
  job->row_tasks = (m + kTaskRows - 1) / kTaskRows;
  job->tasks.count = job->row_tasks * ((job->blocks + kPanel - 1) / kPanel);
  jaxembed::Share(pool, job);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxembedBf16Matmul, Bf16MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
