// Random dense or quantized weights as case inputs.
#pragma once

#include <optional>
#include <span>
#include <string>

#include "decodelab/quant.h"
#include "verify/harness.h"
#include "verify/random.h"

namespace decodelab::verify {

// Dense weights take the activation dtype of the case; quantized ones are quantized by the
// reference from N(0, 1/cols) values, with f16 scales for MLX affine.
struct WeightKind {
  std::optional<QuantSpec> quant;
  std::string name() const { return quant ? quant_spec_name(*quant) : "dense"; }
};

// Appends the weight's tensors to d.inputs (three for every kind: dense or packed, scales,
// biases, the unused ones empty) and returns the index of the first.
int add_weight(CaseData& d, const WeightKind& kind, int64_t rows, int64_t cols, DType dtype, Rng& rng);

// The Weight view of the tensors add_weight appended at `at`.
Weight weight_at(std::span<const Tensor> inputs, int at, const WeightKind& kind, int64_t rows, int64_t cols);

}  // namespace decodelab::verify
