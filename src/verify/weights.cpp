#include "verify/weights.h"

#include <cmath>

namespace decodelab::verify {

int add_weight(CaseData& d, const WeightKind& kind, int64_t rows, int64_t cols, DType dtype, Rng& rng) {
  const int at = int(d.inputs.size());
  const double stddev = 1.0 / std::sqrt(double(cols));
  if (!kind.quant) {
    d.inputs.push_back(random_array(dtype, {rows, cols}, rng, stddev));
    d.inputs.emplace_back();
    d.inputs.emplace_back();
    return at;
  }
  const Array values = random_array(DType::f32, {rows, cols}, rng, stddev);
  QuantizedArray q = make_quantized(*kind.quant, rows, cols, DType::f16);
  quantize(values, q.weight, {"reference"});
  d.inputs.push_back(std::move(q.packed));
  d.inputs.push_back(std::move(q.scales));
  d.inputs.push_back(std::move(q.biases));
  return at;
}

Weight weight_at(std::span<const Tensor> inputs, int at, const WeightKind& kind, int64_t rows, int64_t cols) {
  if (!kind.quant) return Weight::of(inputs[size_t(at)]);
  return Weight::of(QuantizedWeight{*kind.quant, rows, cols, inputs[size_t(at)], inputs[size_t(at) + 1],
                                    inputs[size_t(at) + 2]});
}

}  // namespace decodelab::verify
