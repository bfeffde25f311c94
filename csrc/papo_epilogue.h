// The math of the fast path's epilogue, once: per-row statistics and the gradient with respect to the
// logits for a clean/masked row pair (shared PAPO_SPEC.md, "Gradients"; the contract is
// papo_kernels/fast_path/epilogues/contract.py).
//
// Every function is a template over a value type V, either a scalar (float, double) or a vector of
// lanes (at::vec::Vectorized<T>, added by papo_epilogue_cpu.cpp), and uses only + - * / and the
// functions of Ops<V>. The CPU sweeps call them on vectors and on the scalar tail of a row; a CUDA
// build can call the same functions per thread (PAPO_HOST_DEVICE).
//
// Notation for one row of raw logits x: z = (x + b) / tau, m = max z, s = sum e^(z - m),
// lse = m + log s, log p = z - lse, and the same with ~ for the masked row of the pair.
#pragma once

#include <cmath>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define PAPO_HOST_DEVICE __host__ __device__
#else
#define PAPO_HOST_DEVICE
#endif

namespace papo_epilogue {

// exp, log and a NaN-propagating max of a value type: the scalars here, vectors in the CPU source.
template <typename V>
struct Ops;

template <>
struct Ops<float> {
  static PAPO_HOST_DEVICE float exp(float x) { return ::expf(x); }
  static PAPO_HOST_DEVICE float log(float x) { return ::logf(x); }
  static PAPO_HOST_DEVICE float max(float a, float b) { return (a > b || a != a) ? a : b; }
};

template <>
struct Ops<double> {
  static PAPO_HOST_DEVICE double exp(double x) { return ::exp(x); }
  static PAPO_HOST_DEVICE double log(double x) { return ::log(x); }
  static PAPO_HOST_DEVICE double max(double a, double b) { return (a > b || a != a) ? a : b; }
};

// z = (x + b) / tau; the caller skips the bias and the division where there are none.
template <typename V>
PAPO_HOST_DEVICE V scaled_logit(V x, V bias, V temperature) {
  return (x + bias) / temperature;
}

// ---- Statistics: the second of two reads of a row; the first found m (and m~). ----

// Sums over a row relative to its maximum m (of the lanes of V, or of one thread's columns):
//   s = sum e^(z - m),  t = sum e^(z - m) (z - m),
// and, for the clean row of a pair, w = sum e^(z - m) (z - z~).
template <typename V>
struct RowSums {
  V exp_sum;
  V shifted_sum;
  V cross_sum;
};

template <typename V>
PAPO_HOST_DEVICE RowSums<V> zero_sums() {
  return RowSums<V>{V(0), V(0), V(0)};
}

// Adds the columns z (of a row with maximum m) to the sums of one pass.
template <typename V>
PAPO_HOST_DEVICE void absorb(RowSums<V>& sums, V z, V max) {
  const V shifted = z - max;
  const V e = Ops<V>::exp(shifted);
  sums.exp_sum = sums.exp_sum + e;
  sums.shifted_sum = sums.shifted_sum + e * shifted;
}

// Adds the columns of a clean/masked pair: both passes' sums and the clean pass's cross sum w.
template <typename V>
PAPO_HOST_DEVICE void absorb_pair(RowSums<V>& clean, RowSums<V>& masked, V z, V z_masked, V max, V max_masked) {
  const V shifted = z - max;
  const V e = Ops<V>::exp(shifted);
  clean.exp_sum = clean.exp_sum + e;
  clean.shifted_sum = clean.shifted_sum + e * shifted;
  clean.cross_sum = clean.cross_sum + e * (z - z_masked);
  absorb(masked, z_masked, max_masked);
}

template <typename T>
struct PassStatistics {
  T logprob;  // l = z_y - lse
  T entropy;  // H = -sum p log p
  T lse;      // logsumexp(z), rounded to T
  T lse_rounding;  // what rounding lse to T added, in the wider type's precision
};

// The type a row's final values are formed in: float rows in double, double rows in double.
template <typename T>
struct Wider {
  using type = double;
};

// From the sums of a pass: lse = m + log s, l = (z_y - m) - log s, H = log s - t / s.
//
// H is returned as the entropy of log p = z - lse with lse as rounded to T, i.e. plus the rounding
// r = round(lse) - lse, just as -sum p log p over rounded log p gives it (the torch epilogue). The
// gradient forms log p + H from the rounded lse, and the two roundings then cancel exactly; an
// unrounded H would leave r (up to half an ulp of lse) in log p + H, which is small where p peaks.
template <typename T>
PAPO_HOST_DEVICE PassStatistics<T> pass_statistics(T max, const RowSums<T>& sums, T token_z) {
  using W = typename Wider<T>::type;
  const W log_sum = Ops<W>::log(static_cast<W>(sums.exp_sum));
  const W lse = static_cast<W>(max) + log_sum;
  const T lse_rounded = static_cast<T>(lse);
  const W rounding = static_cast<W>(lse_rounded) - lse;
  const W entropy = log_sum - static_cast<W>(sums.shifted_sum) / static_cast<W>(sums.exp_sum) + rounding;
  return PassStatistics<T>{static_cast<T>((static_cast<W>(token_z) - static_cast<W>(max)) - log_sum),
                           static_cast<T>(entropy), lse_rounded, static_cast<T>(rounding)};
}

// KL(p || q) = sum p (log p - log q) = sum p (z - z~) - (lse - lse~) = w / s - (m - m~) - log(s / s~):
// the per-column differences z - z~ are summed, and lse - lse~ is formed from its parts, so no two
// large numbers cancel when the rows are close. Like H, it is returned for the rounded lse and lse~
// (minus r, plus r~), so that log p - log q - KL in the gradient is exact where the rows agree.
template <typename T>
PAPO_HOST_DEVICE T pair_kl(T max, const RowSums<T>& clean, const PassStatistics<T>& clean_stats, T max_masked,
                           const RowSums<T>& masked, const PassStatistics<T>& masked_stats) {
  using W = typename Wider<T>::type;
  const W kl = static_cast<W>(clean.cross_sum) / static_cast<W>(clean.exp_sum) -
               (static_cast<W>(max) - static_cast<W>(max_masked)) -
               Ops<W>::log(static_cast<W>(clean.exp_sum) / static_cast<W>(masked.exp_sum));
  return static_cast<T>(kl - static_cast<W>(clean_stats.lse_rounding) + static_cast<W>(masked_stats.lse_rounding));
}

// ---- The gradient with respect to the raw logits, dz / tau (PAPO_SPEC.md's gradient table). ----
//
// The rule every epilogue keeps: a statistic whose coefficient is 0 is never multiplied. A term that is
// off for a row (its upstream gradient 0 or absent) is left out of the sum, not added as 0 x statistic,
// so what an unused statistic holds (a NaN of an unused masked pass, of a clean row the masked gradient
// does not need) cannot reach the gradient through 0 x NaN. For the same reason the sum is formed
// before the division by tau: p (...) is finite wherever the loss is (p = 0 where log p is huge), and
// dividing it by a tiny tau last keeps it so, where (g / tau) (log p + H) would overflow to inf and
// 0 x inf would be NaN.

// Per-token upstream gradients g of the loss with respect to the statistics; 0 where absent.
template <typename T>
struct UpstreamGradients {
  T logprob, entropy, lse, logprob_masked, entropy_masked, lse_masked, kl;
};

// Per-row values: the statistics the formulas read, the upstream gradients, and which terms are on.
// The formulas keep the table's grouping: log p + H and log p - log q - KL are formed before any
// product, so where they nearly cancel they do so exactly (Sterbenz) and no rounded product is lost.
//   dz / tau  = p (a - h (log p + H) + k (log p - log q - KL)) / tau + g_l / tau e_y,
//   dz~ / tau = (q (a~ - h~ (log q + H~)) - k p) / tau + g_l~ / tau e_y,
// with a = g_lse - g_l, h = g_H, k = g_KL, a~ = g_lse~ - g_l~ + g_KL, h~ = g_H~; the h, h~ and k terms
// join only where their coefficient is not 0.
template <typename V>
struct GradientCoefficients {
  V entropy, entropy_masked, kl;  // H, H~, KL of the row
  V clean_constant, clean_entropy, masked_constant, masked_entropy, kl_weight;  // a, h, a~, h~, k
  V inverse_temperature;  // 1 / tau
  bool clean_entropy_on, masked_entropy_on, kl_on;  // h, h~, k not 0
};

template <typename T>
PAPO_HOST_DEVICE GradientCoefficients<T> gradient_coefficients(const UpstreamGradients<T>& g, T entropy,
                                                               T entropy_masked, T kl, T temperature) {
  return GradientCoefficients<T>{
      entropy,
      entropy_masked,
      kl,
      g.lse - g.logprob,
      g.entropy,
      g.lse_masked - g.logprob_masked + g.kl,
      g.entropy_masked,
      g.kl,
      T(1) / temperature,
      g.entropy != T(0),
      g.entropy_masked != T(0),
      g.kl != T(0),
  };
}

// dz / tau at the columns, p = e^(log p), without the e_y term (the caller adds g_l / tau at y);
// log_q is only read through the KL term.
template <typename V>
PAPO_HOST_DEVICE V clean_logit_gradient(V p, V log_p, V log_q, const GradientCoefficients<V>& c) {
  V factor = c.clean_constant;
  if (c.clean_entropy_on) {
    factor = factor - c.clean_entropy * (log_p + c.entropy);
  }
  if (c.kl_on) {
    factor = factor + c.kl_weight * (log_p - log_q - c.kl);
  }
  return p * factor * c.inverse_temperature;
}

// dz~ / tau at the columns, q = e^(log q), without the e_y term (the caller adds g_l~ / tau at y); p is
// only read through the KL term.
template <typename V>
PAPO_HOST_DEVICE V masked_logit_gradient(V q, V log_q, V p, const GradientCoefficients<V>& c) {
  V factor = c.masked_constant;
  if (c.masked_entropy_on) {
    factor = factor - c.masked_entropy * (log_q + c.entropy_masked);
  }
  V gradient = q * factor;
  if (c.kl_on) {
    gradient = gradient - c.kl_weight * p;
  }
  return gradient * c.inverse_temperature;
}

}  // namespace papo_epilogue
