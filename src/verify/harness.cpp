#include "verify/harness.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <cmath>
#include <cstring>

#include "reference/elements.h"

namespace decodelab {

bool CaseOutcome::passed() const {
  if (!error.empty() || !refused.empty()) return false;
  const bool clean = non_finite == 0 && unwritten == 0 && stray == 0 && nondeterministic == 0 && guards_intact;
  if (exact) return clean && mismatches == 0;
  return clean && nmse <= threshold;
}

std::string CaseOutcome::summary() const {
  if (!refused.empty()) return "refused: " + refused;
  if (!error.empty()) return error;
  std::string s = exact ? fmt::format("{} of {} differ (bit-exact)", mismatches, compared)
                        : fmt::format("nmse {:.2e} <= {:.0e} over {}", nmse, threshold, compared);
  if (non_finite) s += fmt::format(", {} non-finite", non_finite);
  if (unwritten) s += fmt::format(", {} unwritten", unwritten);
  if (stray) s += fmt::format(", {} stray writes", stray);
  if (nondeterministic) s += fmt::format(", {} differ between runs", nondeterministic);
  if (!guards_intact) s += ", guard overwritten";
  return s;
}

namespace verify {
namespace {

constexpr size_t kGuardBytes = 1024;
constexpr uint8_t kGuardByte = 0x5A;
constexpr double kSentinel = -12288.0;  // exact in f16, bf16, f32: the second run's poison

bool is_float(DType t) { return is_float_activation(t) || t == DType::f64; }

// The bit pattern of element i, widened to 64 bits, for bitwise comparisons.
uint64_t bits_at(const Tensor& t, int64_t i) {
  uint64_t v = 0;
  std::memcpy(&v, static_cast<const char*>(t.data) + size_t(i) * dtype_size(t.dtype), dtype_size(t.dtype));
  return v;
}

// An output with guard bytes on both sides, staged on the host and mirrored on the device.
class GuardedOutput {
 public:
  GuardedOutput(const OutputSpec& spec, Device device) : spec_(spec), device_(device) {
    const Tensor shape = Tensor::contiguous(nullptr, spec.dtype, spec.shape);
    bytes_ = shape.nbytes();
    host_ = Array(DType::u8, {int64_t(bytes_ + 2 * kGuardBytes)});
    if (device == Device::cuda) device_copy_ = Array(DType::u8, {int64_t(bytes_ + 2 * kGuardBytes)}, device);
  }

  // Sets the contents (poison or the initial input) and the guards, and returns the view the
  // kernel writes into.
  Tensor prepare(const Array* initial, double poison) {
    std::memset(host_.data(), kGuardByte, host_.nbytes());
    const Tensor out = host_view();
    if (initial != nullptr) {
      for (int64_t i = 0; i < out.numel(); ++i) reference::store(out, i, reference::load(*initial, i));
      if (!is_float(spec_.dtype)) std::memcpy(out.data, initial->data(), bytes_);
    } else if (is_float(spec_.dtype)) {
      for (int64_t i = 0; i < out.numel(); ++i) reference::store(out, i, poison);
    } else {
      std::memset(out.data, std::isnan(poison) ? 0xFF : 0xA5, bytes_);
    }
    if (device_ != Device::cuda) return out;
    copy_bytes(device_copy_, host_);
    Tensor d = out;
    d.data = static_cast<char*>(device_copy_.data()) + kGuardBytes;
    d.device = Device::cuda;
    return d;
  }

  // Brings the result back to the host; returns whether the guards survived.
  bool collect() {
    if (device_ == Device::cuda) copy_bytes(host_, device_copy_);
    const auto* b = static_cast<const uint8_t*>(host_.data());
    for (size_t i = 0; i < kGuardBytes; ++i) {
      if (b[i] != kGuardByte || b[kGuardBytes + bytes_ + i] != kGuardByte) return false;
    }
    return true;
  }

  Tensor host_view() const {
    return Tensor::contiguous(static_cast<char*>(host_.data()) + kGuardBytes, spec_.dtype,
                              std::span<const int64_t>(spec_.shape));
  }

 private:
  OutputSpec spec_;
  Device device_;
  size_t bytes_ = 0;
  Array host_;
  Array device_copy_;
};

// Runs `launch` once on freshly prepared outputs; returns them (host copies) and the guard state.
struct RunResult {
  std::vector<Array> outputs;
  bool guards_intact = true;
};

// `host_inputs` supply the initial contents of in/out outputs; `inputs` are what the kernel reads.
RunResult run_once(Device device, const std::vector<OutputSpec>& specs, const std::vector<Array>& host_inputs,
                   std::span<const Tensor> inputs, const Launch& launch, double poison) {
  std::vector<GuardedOutput> guarded;
  guarded.reserve(specs.size());
  std::vector<Tensor> views;
  for (const OutputSpec& spec : specs) {
    guarded.emplace_back(spec, device);
    const Array* initial = spec.initial_from >= 0 ? &host_inputs[size_t(spec.initial_from)] : nullptr;
    views.push_back(guarded.back().prepare(initial, poison));
  }
  launch(inputs, views);
  RunResult result;
  for (size_t i = 0; i < guarded.size(); ++i) {
    result.guards_intact = guarded[i].collect() && result.guards_intact;
    const Tensor h = guarded[i].host_view();
    Array copy(h.dtype, std::span<const int64_t>(h.shape.data(), size_t(h.rank)));
    copy_bytes(copy, h);
    result.outputs.push_back(std::move(copy));
  }
  return result;
}

}  // namespace

CaseOutcome run_case(Device device, const CaseData& data, const Launch& backend, const Launch& oracle,
                     const Tolerance& tolerance) {
  CaseOutcome outcome;
  outcome.exact = tolerance.exact;
  outcome.threshold = tolerance.nmse;
  try {
    // The oracle: the reference into f64 outputs (or the stored dtype for bit-exact ops).
    std::vector<OutputSpec> oracle_specs = data.outputs;
    for (OutputSpec& spec : oracle_specs) {
      if (!tolerance.exact && is_float(spec.dtype)) spec.dtype = DType::f64;
    }
    std::vector<Tensor> host_inputs;
    for (const Array& a : data.inputs) host_inputs.push_back(a.view());
    const RunResult expected = run_once(Device::cpu, oracle_specs, data.inputs, host_inputs, oracle, std::nan(""));
    if (!expected.guards_intact) throw Error("the reference wrote outside its outputs");

    std::vector<Array> device_inputs;
    std::vector<Tensor> inputs = host_inputs;
    if (device != Device::cpu) {
      inputs.clear();
      for (const Array& a : data.inputs) {
        device_inputs.push_back(a.to(device));
        inputs.push_back(device_inputs.back().view());
      }
    }
    const RunResult first = run_once(device, data.outputs, data.inputs, inputs, backend, std::nan(""));
    const RunResult second = run_once(device, data.outputs, data.inputs, inputs, backend, kSentinel);
    outcome.guards_intact = first.guards_intact && second.guards_intact;

    double err = 0.0, ref_energy = 0.0;
    int64_t ref_zeros = 0, ref_compared_floats = 0;
    for (size_t o = 0; o < data.outputs.size(); ++o) {
      const Tensor ref = expected.outputs[o], a = first.outputs[o], b = second.outputs[o];
      const bool poisoned = data.outputs[o].initial_from < 0;
      const bool floats = is_float(a.dtype);
      for (int64_t i = 0; i < a.numel(); ++i) {
        const uint64_t bits_a = bits_at(a, i), bits_b = bits_at(b, i);
        if (floats && std::isnan(reference::load(ref, i))) {
          // Left alone by the reference: must be left alone by the backend too.
          if (!std::isnan(reference::load(a, i))) ++outcome.stray;
          continue;
        }
        ++outcome.compared;
        if (bits_a != bits_b) {
          const bool still_sentinel = floats && poisoned && reference::load(b, i) == kSentinel &&
                                      std::isnan(reference::load(a, i));
          if (still_sentinel) {
            ++outcome.unwritten;
          } else {
            ++outcome.nondeterministic;
          }
        }
        if (!floats || tolerance.exact) {
          if (bits_at(ref, i) != bits_a) ++outcome.mismatches;
          continue;
        }
        const double r = reference::load(ref, i), v = reference::load(a, i);
        if (!std::isfinite(v)) {
          ++outcome.non_finite;
          continue;
        }
        err += (v - r) * (v - r);
        ref_energy += r * r;
        ++ref_compared_floats;
        if (r == 0.0) ++ref_zeros;
      }
    }
    if (!tolerance.exact) {
      outcome.nmse = ref_energy > 0.0 ? err / ref_energy : (err > 0.0 ? INFINITY : 0.0);
      // A case whose reference is mostly zeros cannot tell a right kernel from a lazy one.
      if (ref_compared_floats == 0 || ref_zeros * 2 > ref_compared_floats) {
        outcome.error = fmt::format("broken case: the reference output is mostly zeros ({} of {})", ref_zeros,
                                    ref_compared_floats);
      }
    }
    if (outcome.compared == 0) outcome.error = "broken case: no output element was compared";
  } catch (const Refused& r) {
    outcome.refused = r.reason;
  } catch (const std::exception& e) {
    outcome.error = e.what();
  }
  return outcome;
}

std::string shape_name(const std::vector<int64_t>& shape) { return fmt::format("[{}]", fmt::join(shape, ", ")); }

Tolerance rounding_tolerance(DType dtype, double scale) {
  switch (dtype) {
    case DType::f32:
      return {1e-10 * scale, "f32 outputs: one f32 rounding (~1e-15) plus f32 accumulation-order error", false};
    case DType::f16:
      return {1e-6 * scale, "f16 outputs: one f16 rounding gives ~8e-8; headroom for f32 accumulation", false};
    case DType::bf16:
      return {1e-4 * scale, "bf16 outputs: one bf16 rounding gives ~5e-6; headroom for f32 accumulation", false};
    default:
      return {0.0, "", false};
  }
}

bool backend_matches(const GridFilter& filter, std::string_view op, std::string_view backend, Status status) {
  if (!filter.op.empty() && filter.op != op) return false;
  if (status == Status::experimental && !filter.include_experimental && filter.backend != backend) return false;
  if (filter.backend.empty() || filter.backend == backend) return true;
  // "cpu" selects cpu and cpu.<variant>; likewise "cuda".
  return backend.size() > filter.backend.size() && backend.substr(0, filter.backend.size()) == filter.backend &&
         backend[filter.backend.size()] == '.';
}

}  // namespace verify

std::vector<VerifyCase> verification_grid(const GridFilter& filter) {
  std::vector<VerifyCase> grid;
  verify::add_layer_cases(grid, filter);
  verify::add_cache_cases(grid, filter);
  verify::add_attention_cases(grid, filter);
  verify::add_quant_cases(grid, filter);
  verify::add_block_cases(grid, filter);
  verify::add_turboquant_cases(grid, filter);
  verify::add_kivi_cases(grid, filter);
  verify::add_rabitq_cases(grid, filter);
  verify::add_qjl_cases(grid, filter);
  return grid;
}

}  // namespace decodelab
