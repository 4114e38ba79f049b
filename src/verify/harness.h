// The verification harness behind every case: poisoned and fenced outputs, two runs, and the
// comparison with the reference computed into f64 outputs (the oracle).
#pragma once

#include <functional>
#include <span>
#include <string>
#include <vector>

#include "decodelab/error.h"
#include "decodelab/verify.h"
#include "router/registry.h"

namespace decodelab::verify {

struct Tolerance {
  double nmse = 0.0;
  std::string why;
  bool exact = false;  // bit-exact outputs (quantization): compared with the reference as stored
};

// One output of a case. A poisoned output starts as NaN (first run) or a finite sentinel
// (second run); an in/out output (the residual stream, a KV cache) starts as a copy of an input.
// Elements the reference leaves as NaN (unused cache slots poisoned by the case) must stay
// untouched.
struct OutputSpec {
  DType dtype;
  std::vector<int64_t> shape;
  int initial_from = -1;  // index of the input it starts as, or -1 for poisoned
};

struct CaseData {
  std::vector<Array> inputs;  // host memory
  std::vector<OutputSpec> outputs;
};

// Calls a kernel on views of the inputs and outputs (on the kernel's device).
using Launch = std::function<void(std::span<const Tensor> inputs, std::span<const Tensor> outputs)>;

CaseOutcome run_case(Device device, const CaseData& data, const Launch& backend, const Launch& oracle,
                     const Tolerance& tolerance);

template <class Args>
using MakeArgs = std::function<Args(std::span<const Tensor> inputs, std::span<const Tensor> outputs)>;

template <class Args>
const Kernel<Args>& reference_kernel() {
  for (const auto& k : kernels<Args>()) {
    if (k.backend == "reference") return k;
  }
  fail(Args::kOp, "no reference kernel is registered");
}

// Marks an outcome as skipped when the kernel declines these arguments.
struct Refused {
  std::string reason;
};

template <class Args>
CaseOutcome run_kernel_case(const Kernel<Args>& kernel, const CaseData& data, const MakeArgs<Args>& make,
                            const Tolerance& tolerance) {
  const Kernel<Args>& reference = reference_kernel<Args>();
  const Launch backend = [&](std::span<const Tensor> in, std::span<const Tensor> out) {
    const Args args = make(in, out);
    if (std::string why = kernel.refusal(args); !why.empty()) throw Refused{why};
    kernel.run(args);
  };
  const Launch oracle = [&](std::span<const Tensor> in, std::span<const Tensor> out) { reference.run(make(in, out)); };
  return run_case(kernel.device, data, backend, oracle, tolerance);
}

// A grid entry: one shape of one op for every registered kernel and every activation dtype.
// `build(dtype, seed)` draws the case's data.
template <class Args>
void add_cases(std::vector<VerifyCase>& grid, const GridFilter& filter, const std::string& shape,
               const std::function<Tolerance(DType)>& tolerance, std::function<CaseData(DType, uint64_t)> build,
               MakeArgs<Args> make, std::initializer_list<DType> dtypes = {DType::f32, DType::f16, DType::bf16});

bool backend_matches(const GridFilter& filter, std::string_view op, std::string_view backend, Status status);

template <class Args>
void add_cases(std::vector<VerifyCase>& grid, const GridFilter& filter, const std::string& shape,
               const std::function<Tolerance(DType)>& tolerance, std::function<CaseData(DType, uint64_t)> build,
               MakeArgs<Args> make, std::initializer_list<DType> dtypes) {
  for (const auto& kernel : kernels<Args>()) {
    if (!backend_matches(filter, Args::kOp, kernel.backend, kernel.status)) continue;
    for (DType dtype : dtypes) {
      const Tolerance tol = tolerance(dtype);
      VerifyCase c;
      c.op = Args::kOp;
      c.backend = std::string(kernel.backend);
      c.dtype = std::string(dtype_name(dtype));
      c.shape = shape;
      c.why = tol.why;
      c.device = kernel.device;
      c.run = [&kernel, build, make, tol, dtype](uint64_t seed) {
        return run_kernel_case<Args>(kernel, build(dtype, seed), make, tol);
      };
      grid.push_back(std::move(c));
    }
  }
}

// "[2, 3, 4]".
std::string shape_name(const std::vector<int64_t>& shape);

// The per-family grids (cases_*.cpp).
void add_layer_cases(std::vector<VerifyCase>& grid, const GridFilter& filter);
void add_cache_cases(std::vector<VerifyCase>& grid, const GridFilter& filter);
void add_attention_cases(std::vector<VerifyCase>& grid, const GridFilter& filter);
void add_quant_cases(std::vector<VerifyCase>& grid, const GridFilter& filter);
void add_block_cases(std::vector<VerifyCase>& grid, const GridFilter& filter);
void add_turboquant_cases(std::vector<VerifyCase>& grid, const GridFilter& filter);
void add_kivi_cases(std::vector<VerifyCase>& grid, const GridFilter& filter);
void add_rabitq_cases(std::vector<VerifyCase>& grid, const GridFilter& filter);
void add_qjl_cases(std::vector<VerifyCase>& grid, const GridFilter& filter);

// Standard tolerances: NMSE of one rounding to the output dtype, with headroom for an f32
// accumulation order that differs from the reference. `scale` widens them for ops whose
// intermediates are rounded too.
Tolerance rounding_tolerance(DType dtype, double scale = 1.0);

// Fused attention over a compressed cache against the reference over the same codes, whose
// queries are drawn at q_scale (> 1: large logits); cases_turboquant.cpp.
Tolerance compressed_attention_tolerance(DType dtype, double q_scale);

}  // namespace decodelab::verify
