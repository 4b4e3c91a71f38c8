// The fused optimizers of dynamic embeddings, applied in place to a row [w (dim) | optimizer state]: one definition
// for the CPU and CUDA tables (exact_math.h: both round every operation once, so they agree bit for bit).
//
//   sgd              w -= lr g
//   adagrad          s += g^2;                 w -= lr g / (sqrt(s) + eps)           state: s (dim)
//   rowwise_adagrad  s += mean(g^2);           w -= lr g / (sqrt(s) + eps)           state: s (1)
//   adam             m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;
//                    w -= lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)        state: m, v (dim each)
#pragma once

#include <cmath>
#include <stdexcept>
#include <string>

#include "table/exact_math.h"

namespace gr_dynemb {

enum class OptimizerKind : int { kSgd = 0, kAdagrad = 1, kRowwiseAdagrad = 2, kAdam = 3 };

// One step's hyperparameters; the float constants are rounded once on the host (from the caller's doubles).
struct OptimizerStep {
  OptimizerKind kind = OptimizerKind::kSgd;
  float lr = 0.f, eps = 0.f;
  float beta1 = 0.f, one_minus_beta1 = 1.f, beta2 = 0.f, one_minus_beta2 = 1.f;
  float bias1 = 1.f, bias2 = 1.f;  // 1 - b1^t, 1 - b2^t

  static OptimizerStep make(int kind, double lr, double eps, double beta1, double beta2, int64_t step) {
    if (kind < 0 || kind > 3) throw std::invalid_argument("unknown optimizer kind " + std::to_string(kind));
    if (!(lr > 0.0) || !(eps > 0.0)) throw std::invalid_argument("optimizer lr and eps must be > 0");
    if (!(beta1 >= 0.0 && beta1 < 1.0 && beta2 >= 0.0 && beta2 < 1.0))
      throw std::invalid_argument("optimizer betas must be in [0, 1)");
    if (step < 1) throw std::invalid_argument("optimizer step must be >= 1");
    OptimizerStep o;
    o.kind = static_cast<OptimizerKind>(kind);
    o.lr = float(lr), o.eps = float(eps);
    o.beta1 = float(beta1), o.one_minus_beta1 = float(1.0 - beta1);
    o.beta2 = float(beta2), o.one_minus_beta2 = float(1.0 - beta2);
    o.bias1 = float(1.0 - std::pow(beta1, double(step)));
    o.bias2 = float(1.0 - std::pow(beta2, double(step)));
    return o;
  }

  // Throws unless [w (dim) | state] fits a row of value_dim floats.
  void check_fits(int dim, int value_dim) const {
    if (dim + state_dim(dim) > value_dim)
      throw std::invalid_argument("the optimizer's state does not fit the rows (value_dim " +
                                  std::to_string(value_dim) + ")");
  }

  int state_dim(int dim) const {
    switch (kind) {
      case OptimizerKind::kSgd: return 0;
      case OptimizerKind::kAdagrad: return dim;
      case OptimizerKind::kRowwiseAdagrad: return 1;
      case OptimizerKind::kAdam: return 2 * dim;
    }
    return 0;
  }
};

// Element d's update: w and its state slots s1 (adagrad s, adam m) and s2 (adam v) in registers; `row_s` is the
// row-wise Adagrad accumulator after this step's increment.
GR_DYNEMB_HD inline void optimizer_element(const OptimizerStep& o, float g, float& w, float& s1, float& s2,
                                           float row_s) {
  using namespace exact;
  switch (o.kind) {
    case OptimizerKind::kSgd: w = sub(w, mul(o.lr, g)); return;
    case OptimizerKind::kAdagrad:
      s1 = add(s1, mul(g, g));
      w = sub(w, div(mul(o.lr, g), add(exact::sqrt(s1), o.eps)));
      return;
    case OptimizerKind::kRowwiseAdagrad: w = sub(w, div(mul(o.lr, g), add(exact::sqrt(row_s), o.eps))); return;
    case OptimizerKind::kAdam:
      s1 = add(mul(o.beta1, s1), mul(o.one_minus_beta1, g));
      s2 = add(mul(o.beta2, s2), mul(mul(o.one_minus_beta2, g), g));
      w = sub(w, div(mul(o.lr, div(s1, o.bias1)), add(exact::sqrt(div(s2, o.bias2)), o.eps)));
      return;
  }
}

// Where element d's state lives in the row (adagrad: dim + d; adam: dim + d and 2 dim + d).
GR_DYNEMB_HD inline int state1_offset(const OptimizerStep& o, int dim, int d) {
  return o.kind == OptimizerKind::kAdagrad || o.kind == OptimizerKind::kAdam ? dim + d : -1;
}
GR_DYNEMB_HD inline int state2_offset(const OptimizerStep& o, int dim, int d) {
  return o.kind == OptimizerKind::kAdam ? 2 * dim + d : -1;
}

// sum(g^2) of a row in the CUDA kernel's order: kRowwiseLanes strided partial sums, then a butterfly (the lanes'
// shfl_xor reduction), so the row-wise accumulator is the same float on both sides.
constexpr int kRowwiseLanes = 8;
inline float rowwise_sum_of_squares(const float* g, int dim) {
  float part[kRowwiseLanes];
  for (int l = 0; l < kRowwiseLanes; ++l) {
    part[l] = 0.f;
    for (int d = l; d < dim; d += kRowwiseLanes) part[l] = exact::add(part[l], exact::mul(g[d], g[d]));
  }
  for (int off = 1; off < kRowwiseLanes; off <<= 1)
    for (int l = 0; l < kRowwiseLanes; l += 2 * off) part[l] = exact::add(part[l], part[l + off]);
  return part[0];
}

// The whole row on the host (CPU table): gradient g [dim].
inline void optimizer_row(const OptimizerStep& o, float* row, const float* g, int dim) {
  float row_s = 0.f;
  if (o.kind == OptimizerKind::kRowwiseAdagrad) {
    row_s = row[dim] = exact::add(row[dim], exact::div(rowwise_sum_of_squares(g, dim), float(dim)));
  }
  for (int d = 0; d < dim; ++d) {
    const int o1 = state1_offset(o, dim, d), o2 = state2_offset(o, dim, d);
    float s1 = o1 >= 0 ? row[o1] : 0.f, s2 = o2 >= 0 ? row[o2] : 0.f;
    optimizer_element(o, g[d], row[d], s1, s2, row_s);
    if (o1 >= 0) row[o1] = s1;
    if (o2 >= 0) row[o2] = s2;
  }
}

}  // namespace gr_dynemb
