// The native CPU epilogue of papo_loss's fast path: the per-row work of one logits chunk in C++.
//
// ATen tensors in, at::parallel_for over the rows (clean/masked pairs), at::vec::Vectorized for the
// sweeps over the vocabulary; float32 logits are summed in float32, float64 in float64. The math is
// papo_epilogue.h's. Two custom ops per PAPO_SPEC.md, registered in the papo_kernels namespace:
//
//   epilogue_statistics: per token l, H, lse (and when paired l~, H~, lse~, KL(p || q)) as one
//     (7 or 3, C) tensor; the logits are read twice per row (the maxima, then the sums), never written.
//   epilogue_logit_gradient (out=) and epilogue_logit_gradient_ (over the logits): dz / tau for the
//     rows of each pass that gets an upstream gradient, one sweep per row pair.
//   epilogue_row_partials: per token the partial state of a block of a vocabulary-parallel head's columns,
//     (9 or 4, C) laid out as papo_kernels/partials.py's FIELDS (m, s, t, z_y, then m~, s~, t~, z~_y and the
//     difference sum w), for the ranks to all-reduce. It and the gradient ops take kNotHere (-1) for a token
//     whose column another rank holds: its logit is 0 in the partials and its e_y term is left out.
//
// Built on first use by papo_kernels/fast_path/epilogues/native_build.py (csrc/README.md).

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>

#include "papo_epilogue.h"

namespace papo_epilogue {

template <typename T>
struct Ops<at::vec::Vectorized<T>> {
  using Vec = at::vec::Vectorized<T>;
  static Vec exp(const Vec& x) { return x.exp(); }
  static Vec max(const Vec& a, const Vec& b) { return at::vec::maximum(a, b); }
};

namespace {

template <typename T>
using Vec = at::vec::Vectorized<T>;

// Columns summed into fresh lanes before joining the row's sums: rounding grows with the block
// length plus the number of blocks, not with the row length.
constexpr int64_t kSumBlock = 1024;
// Fewest columns a thread gets: rows are split across threads only above this much work.
constexpr int64_t kColumnsPerTask = 1 << 16;

// Tells a sweep body whether it runs on a vector of columns or on one column of the row's tail.
template <typename V>
struct Lanes {
  using type = V;
};

template <typename V, typename T>
inline V load(const T* data) {
  if constexpr (std::is_same_v<V, T>) {
    return *data;
  } else {
    return V::loadu(data);
  }
}

template <typename V, typename T>
inline void store(T* data, const V& value) {
  if constexpr (std::is_same_v<V, T>) {
    *data = value;
  } else {
    value.store(data);
  }
}

template <typename T>
inline T horizontal_sum(const Vec<T>& lanes) {
  return at::vec::vec_reduce_all<T>([](Vec<T>& a, Vec<T>& b) { return a + b; }, lanes);
}

template <typename T>
inline T horizontal_max(const Vec<T>& lanes) {
  return at::vec::vec_reduce_all<T>([](Vec<T>& a, Vec<T>& b) { return Ops<Vec<T>>::max(a, b); }, lanes);
}

// body(Lanes<Vec<T>>(), j) for whole vectors of columns in [begin, end), then body(Lanes<T>(), j)
// for each column left.
template <typename T, typename Body>
inline void sweep(int64_t begin, int64_t end, const Body& body) {
  constexpr int64_t width = Vec<T>::size();
  int64_t j = begin;
  for (; j + width <= end; j += width) {
    body(Lanes<Vec<T>>(), j);
  }
  for (; j < end; ++j) {
    body(Lanes<T>(), j);
  }
}

// A chunk of raw logits, (R, V) with unit column stride: R = C clean rows, then C masked rows when paired.
template <typename T>
struct Logits {
  const T* data;
  int64_t row_stride;
  int64_t vocab;
  const T* bias;  // nullptr when there is none
  T temperature;

  // z = (x + b) / tau at columns j.. of a row.
  template <typename V>
  V z(int64_t row, int64_t j) const {
    const V bias_part = bias == nullptr ? V(T(0)) : load<V>(bias + j);
    return scaled_logit(load<V>(data + row * row_stride + j), bias_part, V(temperature));
  }

  T max_z(int64_t row) const {
    std::tuple<Vec<T>, T> max{Vec<T>(-std::numeric_limits<T>::infinity()), -std::numeric_limits<T>::infinity()};
    sweep<T>(0, vocab, [&](auto lanes, int64_t j) {
      using V = typename decltype(lanes)::type;
      auto& running = std::get<V>(max);
      running = Ops<V>::max(running, z<V>(row, j));
    });
    return Ops<T>::max(horizontal_max(std::get<0>(max)), std::get<1>(max));
  }
};

template <typename T>
inline RowSums<T> joined(const RowSums<Vec<T>>& lanes, const RowSums<T>& tail) {
  return RowSums<T>{horizontal_sum(lanes.exp_sum) + tail.exp_sum, horizontal_sum(lanes.shifted_sum) + tail.shifted_sum,
                    horizontal_sum(lanes.cross_sum) + tail.cross_sum};
}

template <typename V>
inline void add_into(RowSums<V>& total, const RowSums<V>& part) {
  total.exp_sum = total.exp_sum + part.exp_sum;
  total.shifted_sum = total.shifted_sum + part.shifted_sum;
  total.cross_sum = total.cross_sum + part.cross_sum;
}

// The sums of row `row` (and of its masked partner when `masked_row` >= 0), blocked (kSumBlock).
template <typename T>
void row_sums(const Logits<T>& logits, int64_t row, T max, int64_t masked_row, T max_masked, RowSums<T>& clean,
              RowSums<T>& masked) {
  RowSums<Vec<T>> clean_lanes = zero_sums<Vec<T>>(), masked_lanes = zero_sums<Vec<T>>();
  RowSums<T> clean_tail = zero_sums<T>(), masked_tail = zero_sums<T>();
  for (int64_t begin = 0; begin < logits.vocab; begin += kSumBlock) {
    const int64_t end = std::min(begin + kSumBlock, logits.vocab);
    std::tuple<RowSums<Vec<T>>, RowSums<T>> block_clean{zero_sums<Vec<T>>(), zero_sums<T>()};
    std::tuple<RowSums<Vec<T>>, RowSums<T>> block_masked = block_clean;
    sweep<T>(begin, end, [&](auto lanes, int64_t j) {
      using V = typename decltype(lanes)::type;
      const V z = logits.template z<V>(row, j);
      if (masked_row >= 0) {
        absorb_pair(std::get<RowSums<V>>(block_clean), std::get<RowSums<V>>(block_masked), z,
                    logits.template z<V>(masked_row, j), V(max), V(max_masked));
      } else {
        absorb(std::get<RowSums<V>>(block_clean), z, V(max));
      }
    });
    add_into(clean_lanes, std::get<0>(block_clean));
    add_into(masked_lanes, std::get<0>(block_masked));
    add_into(clean_tail, std::get<1>(block_clean));
    add_into(masked_tail, std::get<1>(block_masked));
  }
  clean = joined(clean_lanes, clean_tail);
  masked = joined(masked_lanes, masked_tail);
}

int64_t rows_per_task(int64_t vocab) {
  return std::max<int64_t>(1, kColumnsPerTask / std::max<int64_t>(1, vocab));
}

constexpr int64_t kNotHere = -1;  // papo_kernels/partials.py's NOT_HERE

void check_token(int64_t token, int64_t row, int64_t vocab, bool not_here_allowed = false) {
  TORCH_CHECK((token >= 0 && token < vocab) || (not_here_allowed && token == kNotHere),
              "papo_kernels epilogue: tokens[", row, "] = ", token, " is outside the vocabulary [0, ", vocab, ")");
}

// statistics (7 or 3, n): l, H, lse, then l~, H~, lse~, KL when paired.
template <typename T>
void statistics_kernel(const Logits<T>& logits, const int64_t* tokens, int64_t n, bool paired, T* statistics) {
  at::parallel_for(0, n, rows_per_task(logits.vocab), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t token = tokens[i];
      check_token(token, i, logits.vocab);
      const T max = logits.max_z(i);
      const T max_masked = paired ? logits.max_z(n + i) : T(0);
      RowSums<T> clean, masked;
      row_sums(logits, i, max, paired ? n + i : -1, max_masked, clean, masked);
      const PassStatistics<T> stats = pass_statistics(max, clean, logits.template z<T>(i, token));
      statistics[0 * n + i] = stats.logprob;
      statistics[1 * n + i] = stats.entropy;
      statistics[2 * n + i] = stats.lse;
      if (paired) {
        const PassStatistics<T> stats_masked = pass_statistics(max_masked, masked, logits.template z<T>(n + i, token));
        statistics[3 * n + i] = stats_masked.logprob;
        statistics[4 * n + i] = stats_masked.entropy;
        statistics[5 * n + i] = stats_masked.lse;
        statistics[6 * n + i] = pair_kl(max, clean, stats, max_masked, masked, stats_masked);
      }
    }
  });
}

// partials (9 or 4, n): m, s, t, z_y, then m~, s~, t~, z~_y, w when paired (papo_kernels/partials.py's FIELDS),
// from the same two reads of each row as the statistics; z_y is 0 where the token is kNotHere.
template <typename T>
void partials_kernel(const Logits<T>& logits, const int64_t* tokens, int64_t n, bool paired, T* partials) {
  at::parallel_for(0, n, rows_per_task(logits.vocab), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t token = tokens[i];
      check_token(token, i, logits.vocab, /*not_here_allowed=*/true);
      const T max = logits.max_z(i);
      const T max_masked = paired ? logits.max_z(n + i) : T(0);
      RowSums<T> clean, masked;
      row_sums(logits, i, max, paired ? n + i : -1, max_masked, clean, masked);
      partials[0 * n + i] = max;
      partials[1 * n + i] = clean.exp_sum;
      partials[2 * n + i] = clean.shifted_sum;
      partials[3 * n + i] = token == kNotHere ? T(0) : logits.template z<T>(i, token);
      if (paired) {
        partials[4 * n + i] = max_masked;
        partials[5 * n + i] = masked.exp_sum;
        partials[6 * n + i] = masked.shifted_sum;
        partials[7 * n + i] = token == kNotHere ? T(0) : logits.template z<T>(n + i, token);
        partials[8 * n + i] = clean.cross_sum;
      }
    }
  });
}

// Per-token (C,) inputs of the gradient, nullptr where absent (0).
template <typename T>
struct TokenColumns {
  const T* lse;
  const T* entropy;
  const T* lse_masked;
  const T* entropy_masked;
  const T* kl;
  const T* grad[7];  // d loss / d (l, H, lse, l~, H~, lse~, KL)

  static T at(const T* column, int64_t i) { return column == nullptr ? T(0) : column[i]; }
};

template <typename V, typename T>
GradientCoefficients<V> broadcast(const GradientCoefficients<T>& c) {
  return GradientCoefficients<V>{V(c.entropy),         V(c.entropy_masked),      V(c.kl),
                                 V(c.clean_constant),  V(c.clean_entropy),       V(c.masked_constant),
                                 V(c.masked_entropy),  V(c.kl_weight),           V(c.inverse_temperature),
                                 c.clean_entropy_on,   c.masked_entropy_on,      c.kl_on};
}

// out[i] = dz_i / tau for clean rows when `clean_dz`, out[n + i] = dz~_i / tau when `masked_dz`; out may be
// the logits themselves (each column is read before it is written). A row of the other pass is read only
// where the KL term is on for the row (papo_epilogue.h: a statistic whose coefficient is 0 is never used).
template <typename T>
void gradient_kernel(const Logits<T>& logits, const int64_t* tokens, int64_t n, const TokenColumns<T>& columns,
                     bool clean_dz, bool masked_dz, T* out, int64_t out_stride) {
  at::parallel_for(0, n, rows_per_task(logits.vocab), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t token = tokens[i];
      check_token(token, i, logits.vocab, /*not_here_allowed=*/true);
      UpstreamGradients<T> g{};
      T* fields[7] = {&g.logprob, &g.entropy, &g.lse, &g.logprob_masked, &g.entropy_masked, &g.lse_masked, &g.kl};
      for (int k = 0; k < 7; ++k) {
        *fields[k] = TokenColumns<T>::at(columns.grad[k], i);
      }
      const GradientCoefficients<T> c = gradient_coefficients(
          g, TokenColumns<T>::at(columns.entropy, i), TokenColumns<T>::at(columns.entropy_masked, i),
          TokenColumns<T>::at(columns.kl, i), logits.temperature);
      const bool read_clean = clean_dz || (masked_dz && c.kl_on);  // dz~ needs p through the KL term
      const bool read_masked = masked_dz || (clean_dz && c.kl_on);  // dz needs log q through the KL term
      const std::tuple<GradientCoefficients<Vec<T>>, GradientCoefficients<T>> coefficients{broadcast<Vec<T>>(c), c};
      const T lse = columns.lse[i];
      const T lse_masked = TokenColumns<T>::at(columns.lse_masked, i);
      T* clean_out = out + i * out_stride;
      T* masked_out = out + (n + i) * out_stride;
      sweep<T>(0, logits.vocab, [&](auto lanes, int64_t j) {
        using V = typename decltype(lanes)::type;
        const V log_p = read_clean ? logits.template z<V>(i, j) - V(lse) : V(T(0));
        const V p = read_clean ? Ops<V>::exp(log_p) : V(T(0));
        const V log_q = read_masked ? logits.template z<V>(n + i, j) - V(lse_masked) : log_p;
        const auto& coefficient = std::get<GradientCoefficients<V>>(coefficients);
        if (clean_dz) {
          store(clean_out + j, clean_logit_gradient(p, log_p, log_q, coefficient));
        }
        if (masked_dz) {
          store(masked_out + j, masked_logit_gradient(Ops<V>::exp(log_q), log_q, p, coefficient));
        }
      });
      if (token == kNotHere) {
        continue;  // another rank holds the token's column: no e_y term here
      }
      // the e_y terms: g_l / tau and g_l~ / tau at the token
      if (clean_dz) {
        clean_out[token] += g.logprob * c.inverse_temperature;
      }
      if (masked_dz) {
        masked_out[token] += g.logprob_masked * c.inverse_temperature;
      }
    }
  });
}

// ---- The ops: argument checks, then the kernels. ----

void check_chunk(const at::Tensor& logits, const at::Tensor& tokens, const std::optional<at::Tensor>& bias,
                 double temperature) {
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1,
              "papo_kernels epilogue: logits must be a 2-D tensor with unit column stride, got sizes ",
              logits.sizes(), " and strides ", logits.strides());
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kDouble,
              "papo_kernels epilogue: logits must be float32 or float64, got ", logits.scalar_type());
  TORCH_CHECK(tokens.dim() == 1 && tokens.scalar_type() == at::kLong,
              "papo_kernels epilogue: tokens must be a 1-D int64 tensor, got ", tokens.scalar_type(), " of sizes ",
              tokens.sizes());
  const int64_t n = tokens.size(0);
  TORCH_CHECK(logits.size(0) == n || logits.size(0) == 2 * n, "papo_kernels epilogue: logits must have ", n,
              " rows (one pass) or ", 2 * n, " (clean then masked) for ", n, " tokens, got ", logits.size(0));
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == logits.size(1)),
              "papo_kernels epilogue: bias must have shape (", logits.size(1), ",), got ",
              bias.has_value() ? bias->sizes() : at::IntArrayRef{});
  TORCH_CHECK(temperature > 0, "papo_kernels epilogue: temperature must be > 0, got ", temperature);
}

// A (C,) per-token column in the logits' dtype, contiguous; nullopt stays absent.
std::optional<at::Tensor> token_column(const std::optional<at::Tensor>& column, const at::Tensor& logits,
                                       int64_t n, const char* name) {
  if (!column.has_value()) {
    return std::nullopt;
  }
  TORCH_CHECK(column->dim() == 1 && column->size(0) == n, "papo_kernels epilogue: ", name, " must have shape (",
              n, ",), got ", column->sizes());
  return column->to(logits.scalar_type()).contiguous();
}

template <typename T>
Logits<T> logits_view(const at::Tensor& logits, const std::optional<at::Tensor>& bias, double temperature) {
  return Logits<T>{logits.const_data_ptr<T>(), logits.stride(0), logits.size(1),
                   bias.has_value() ? bias->const_data_ptr<T>() : nullptr, static_cast<T>(temperature)};
}

// The per-token outputs of a chunk's rows: the statistics (7 or 3, C), or with `partials` the partials (9 or 4, C).
at::Tensor row_outputs(const char* op, const at::Tensor& logits, const at::Tensor& tokens,
                       const std::optional<at::Tensor>& bias, double temperature, bool paired, bool partials) {
  check_chunk(logits, tokens, bias, temperature);
  const int64_t n = tokens.size(0);
  TORCH_CHECK(logits.size(0) == (paired ? 2 : 1) * n, "papo_kernels ", op, ": paired=", paired, " needs ",
              (paired ? 2 : 1) * n, " logits rows for ", n, " tokens, got ", logits.size(0));
  const at::Tensor tokens_ = tokens.contiguous();
  const std::optional<at::Tensor> bias_ = token_column(bias, logits, logits.size(1), "bias");
  const int64_t fields = partials ? (paired ? 9 : 4) : (paired ? 7 : 3);
  at::Tensor outputs = at::empty({fields, n}, logits.options());
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "epilogue_row_outputs", [&] {
    const Logits<scalar_t> view = logits_view<scalar_t>(logits, bias_, temperature);
    if (partials) {
      partials_kernel(view, tokens_.const_data_ptr<int64_t>(), n, paired, outputs.mutable_data_ptr<scalar_t>());
    } else {
      statistics_kernel(view, tokens_.const_data_ptr<int64_t>(), n, paired, outputs.mutable_data_ptr<scalar_t>());
    }
  });
  return outputs;
}

at::Tensor epilogue_statistics(const at::Tensor& logits, const at::Tensor& tokens,
                               const std::optional<at::Tensor>& bias, double temperature, bool paired) {
  return row_outputs("epilogue_statistics", logits, tokens, bias, temperature, paired, /*partials=*/false);
}

at::Tensor epilogue_row_partials(const at::Tensor& logits, const at::Tensor& tokens,
                                 const std::optional<at::Tensor>& bias, double temperature, bool paired) {
  return row_outputs("epilogue_row_partials", logits, tokens, bias, temperature, paired, /*partials=*/true);
}

void logit_gradient_into(const at::Tensor& logits, const at::Tensor& tokens, const std::optional<at::Tensor>& bias,
                         double temperature, const at::Tensor& lse, const at::Tensor& entropy,
                         const std::optional<at::Tensor>& lse_masked,
                         const std::optional<at::Tensor>& entropy_masked, const std::optional<at::Tensor>& kl,
                         const std::optional<at::Tensor>& logprobs_grad,
                         const std::optional<at::Tensor>& entropy_grad, const std::optional<at::Tensor>& lse_grad,
                         const std::optional<at::Tensor>& logprobs_masked_grad,
                         const std::optional<at::Tensor>& entropy_masked_grad,
                         const std::optional<at::Tensor>& lse_masked_grad,
                         const std::optional<at::Tensor>& kl_grad, const at::Tensor& out) {
  check_chunk(logits, tokens, bias, temperature);
  const int64_t n = tokens.size(0);
  const bool paired = logits.size(0) == 2 * n && n > 0;
  TORCH_CHECK(out.sizes() == logits.sizes() && out.stride(1) == 1 && out.scalar_type() == logits.scalar_type(),
              "papo_kernels epilogue_logit_gradient: out must have the logits' shape ", logits.sizes(),
              ", dtype ", logits.scalar_type(), " and unit column stride, got ", out.sizes(), ", ",
              out.scalar_type(), ", strides ", out.strides());
  const std::optional<at::Tensor> masked_inputs[] = {lse_masked, logprobs_masked_grad, entropy_masked_grad,
                                                     lse_masked_grad, kl_grad};
  for (const auto& input : masked_inputs) {
    TORCH_CHECK(paired || !input.has_value(),
                "papo_kernels epilogue_logit_gradient: a masked-pass or KL input needs paired logits (",
                2 * n, " rows), got ", logits.size(0));
  }
  TORCH_CHECK(!kl_grad.has_value() || kl.has_value(), "papo_kernels epilogue_logit_gradient: kl_grad needs kl");
  TORCH_CHECK(!(logprobs_masked_grad || entropy_masked_grad || lse_masked_grad || kl_grad) || lse_masked.has_value(),
              "papo_kernels epilogue_logit_gradient: masked-pass gradients need lse_masked");
  TORCH_CHECK(!entropy_masked_grad.has_value() || entropy_masked.has_value(),
              "papo_kernels epilogue_logit_gradient: entropy_masked_grad needs entropy_masked");

  const at::Tensor tokens_ = tokens.contiguous();
  const std::optional<at::Tensor> bias_ = token_column(bias, logits, logits.size(1), "bias");
  const std::optional<at::Tensor> inputs[] = {
      token_column(lse, logits, n, "lse"), token_column(entropy, logits, n, "entropy"),
      token_column(lse_masked, logits, n, "lse_masked"), token_column(entropy_masked, logits, n, "entropy_masked"),
      token_column(kl, logits, n, "kl")};
  const std::optional<at::Tensor> grads[] = {
      token_column(logprobs_grad, logits, n, "logprobs_grad"), token_column(entropy_grad, logits, n, "entropy_grad"),
      token_column(lse_grad, logits, n, "lse_grad"),
      token_column(logprobs_masked_grad, logits, n, "logprobs_masked_grad"),
      token_column(entropy_masked_grad, logits, n, "entropy_masked_grad"),
      token_column(lse_masked_grad, logits, n, "lse_masked_grad"), token_column(kl_grad, logits, n, "kl_grad")};
  const bool clean_dz = grads[0] || grads[1] || grads[2] || grads[6];
  const bool masked_dz = grads[3] || grads[4] || grads[5] || grads[6];
  if (n == 0 || !(clean_dz || masked_dz)) {
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "epilogue_logit_gradient", [&] {
    auto pointer = [](const std::optional<at::Tensor>& column) -> const scalar_t* {
      return column.has_value() ? column->const_data_ptr<scalar_t>() : nullptr;
    };
    TokenColumns<scalar_t> columns{pointer(inputs[0]), pointer(inputs[1]), pointer(inputs[2]), pointer(inputs[3]),
                                   pointer(inputs[4]), {}};
    for (int k = 0; k < 7; ++k) {
      columns.grad[k] = pointer(grads[k]);
    }
    gradient_kernel(logits_view<scalar_t>(logits, bias_, temperature), tokens_.const_data_ptr<int64_t>(), n,
                    columns, clean_dz, masked_dz, out.mutable_data_ptr<scalar_t>(), out.stride(0));
  });
}

}  // namespace
}  // namespace papo_epilogue

// The schemas name every per-token input; an absent upstream gradient (None) is zero and costs nothing.
TORCH_LIBRARY(papo_kernels, m) {
  m.def(
      "epilogue_statistics(Tensor logits, Tensor tokens, Tensor? bias, float temperature, bool paired) -> Tensor");
  m.def(
      "epilogue_row_partials(Tensor logits, Tensor tokens, Tensor? bias, float temperature, bool paired) -> Tensor");
  m.def(
      "epilogue_logit_gradient(Tensor logits, Tensor tokens, Tensor? bias, float temperature, Tensor lse, "
      "Tensor entropy, Tensor? lse_masked, Tensor? entropy_masked, Tensor? kl, Tensor? logprobs_grad, "
      "Tensor? entropy_grad, Tensor? lse_grad, Tensor? logprobs_masked_grad, Tensor? entropy_masked_grad, "
      "Tensor? lse_masked_grad, Tensor? kl_grad, *, Tensor(a!) out) -> ()");
  m.def(
      "epilogue_logit_gradient_(Tensor(a!) logits, Tensor tokens, Tensor? bias, float temperature, Tensor lse, "
      "Tensor entropy, Tensor? lse_masked, Tensor? entropy_masked, Tensor? kl, Tensor? logprobs_grad, "
      "Tensor? entropy_grad, Tensor? lse_grad, Tensor? logprobs_masked_grad, Tensor? entropy_masked_grad, "
      "Tensor? lse_masked_grad, Tensor? kl_grad) -> ()");
}

namespace papo_epilogue {
namespace {

void epilogue_logit_gradient_inplace(const at::Tensor& logits, const at::Tensor& tokens,
                                     const std::optional<at::Tensor>& bias, double temperature,
                                     const at::Tensor& lse, const at::Tensor& entropy,
                                     const std::optional<at::Tensor>& lse_masked,
                                     const std::optional<at::Tensor>& entropy_masked,
                                     const std::optional<at::Tensor>& kl,
                                     const std::optional<at::Tensor>& logprobs_grad,
                                     const std::optional<at::Tensor>& entropy_grad,
                                     const std::optional<at::Tensor>& lse_grad,
                                     const std::optional<at::Tensor>& logprobs_masked_grad,
                                     const std::optional<at::Tensor>& entropy_masked_grad,
                                     const std::optional<at::Tensor>& lse_masked_grad,
                                     const std::optional<at::Tensor>& kl_grad) {
  logit_gradient_into(logits, tokens, bias, temperature, lse, entropy, lse_masked, entropy_masked, kl, logprobs_grad,
                      entropy_grad, lse_grad, logprobs_masked_grad, entropy_masked_grad, lse_masked_grad, kl_grad,
                      logits);
}

}  // namespace
}  // namespace papo_epilogue

TORCH_LIBRARY_IMPL(papo_kernels, CPU, m) {
  m.impl("epilogue_statistics", &papo_epilogue::epilogue_statistics);
  m.impl("epilogue_row_partials", &papo_epilogue::epilogue_row_partials);
  m.impl("epilogue_logit_gradient", &papo_epilogue::logit_gradient_into);
  m.impl("epilogue_logit_gradient_", &papo_epilogue::epilogue_logit_gradient_inplace);
}
