// Vector math for the attention kernels (AVX-512, float32).
#pragma once

#include <immintrin.h>

namespace jaxembed {

// e^x for x <= 0 (scores minus their max), as Cephes' expf: 2^n * p(r), |error| ~ 2 ulp.
inline __m512 Exp(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// softcap * tanh(x / softcap), with tanh(y) = 1 - 2 / (e^2y + 1); e^2y for either sign from
// e^-|2y|, so that Exp's argument stays <= 0.
inline __m512 Softcap(__m512 x, float softcap) {
  const __m512 y = _mm512_mul_ps(x, _mm512_set1_ps(2.0f / softcap));
  const __m512 em = Exp(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(y)));
  const __m512 t = _mm512_div_ps(_mm512_sub_ps(_mm512_set1_ps(1.0f), em),
                                 _mm512_add_ps(_mm512_set1_ps(1.0f), em));
  const __mmask16 neg = _mm512_cmp_ps_mask(y, _mm512_setzero_ps(), _CMP_LT_OQ);
  return _mm512_mul_ps(_mm512_mask_sub_ps(t, neg, _mm512_setzero_ps(), t),
                       _mm512_set1_ps(softcap));
}

}  // namespace jaxembed
