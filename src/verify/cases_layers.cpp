// Verification cases for RMSNorm, residual add, bias add, RMSNorm + residual, SwiGLU and RoPE.
#include <fmt/format.h>

#include "verify/harness.h"
#include "verify/random.h"

namespace decodelab::verify {
namespace {

using Shape = std::vector<int64_t>;

Tolerance plain(DType dtype) { return rounding_tolerance(dtype); }

// Rows of length `hidden`, shaped as given: hidden 4096 (Llama), tile +-1, odd sizes, rank 3, and a
// row longer than the CUDA norm keeps in registers (8192).
const Shape kRowShapes[] = {{1, 4096}, {3, 33}, {2, 5, 128}, {4, 127}, {1, 10000}};

void add_rms_norm(std::vector<VerifyCase>& grid, const GridFilter& filter) {
  for (const Shape& shape : kRowShapes) {
    const int64_t hidden = shape.back();
    add_cases<RmsNormArgs>(
        grid, filter, shape_name(shape), plain,
        [shape, hidden](DType t, uint64_t seed) {
          Rng rng(seed);
          CaseData d;
          d.inputs.push_back(random_array(t, shape, rng, 2.0));
          d.inputs.push_back(random_array(t, {hidden}, rng, 0.1, 1.0));
          d.outputs.push_back({t, shape});
          return d;
        },
        [](auto in, auto out) { return RmsNormArgs{in[0], in[1], out[0], 1e-5f, {}}; });
  }
}

void add_residual(std::vector<VerifyCase>& grid, const GridFilter& filter) {
  for (const Shape& shape : kRowShapes) {
    add_cases<ResidualAddArgs>(
        grid, filter, shape_name(shape), plain,
        [shape](DType t, uint64_t seed) {
          Rng rng(seed);
          CaseData d;
          d.inputs.push_back(random_array(t, shape, rng));
          d.inputs.push_back(random_array(t, shape, rng));
          d.outputs.push_back({t, shape});
          return d;
        },
        [](auto in, auto out) { return ResidualAddArgs{in[0], in[1], out[0], {}}; });
  }
}

// Qwen2's projection widths (Qwen2-7B: q 3584, k/v 512 over [B, N]) and the odd row shapes, each
// once into a separate output and once in place (out aliasing x), as the decode block calls it.
void add_bias(std::vector<VerifyCase>& grid, const GridFilter& filter) {
  for (const Shape& shape : {Shape{1, 3584}, Shape{4, 512}, Shape{3, 33}, Shape{1, 111}, Shape{2, 5, 128}}) {
    const int64_t n = shape.back();
    const auto build = [shape, n](bool in_place) {
      return [shape, n, in_place](DType t, uint64_t seed) {
        Rng rng(seed);
        CaseData d;
        d.inputs.push_back(random_array(t, shape, rng));
        d.inputs.push_back(random_array(t, {n}, rng));
        d.outputs.push_back({t, shape, in_place ? 0 : -1});
        return d;
      };
    };
    add_cases<BiasAddArgs>(grid, filter, shape_name(shape), plain, build(false),
                           [](auto in, auto out) { return BiasAddArgs{in[0], in[1], out[0], {}}; });
    add_cases<BiasAddArgs>(grid, filter, shape_name(shape) + " in place", plain, build(true),
                           [](auto in, auto out) { return BiasAddArgs{out[0], in[1], out[0], {}}; });
  }
}

void add_rms_norm_residual(std::vector<VerifyCase>& grid, const GridFilter& filter) {
  for (const Shape& shape : kRowShapes) {
    const int64_t hidden = shape.back();
    // The stored sum is rounded before it is normalized: two roundings in a row.
    add_cases<RmsNormResidualArgs>(
        grid, filter, shape_name(shape), [](DType t) { return rounding_tolerance(t, 4.0); },
        [shape, hidden](DType t, uint64_t seed) {
          Rng rng(seed);
          CaseData d;
          d.inputs.push_back(random_array(t, shape, rng));
          d.inputs.push_back(random_array(t, shape, rng, 4.0));
          d.inputs.push_back(random_array(t, {hidden}, rng, 0.1, 1.0));
          d.outputs.push_back({t, shape, 1});  // the residual stream, read and written
          d.outputs.push_back({t, shape});
          return d;
        },
        [](auto in, auto out) { return RmsNormResidualArgs{in[0], out[0], in[2], out[1], 1e-5f, {}}; });
  }
}

void add_swiglu(std::vector<VerifyCase>& grid, const GridFilter& filter) {
  for (const Shape& shape : {Shape{1, 14336}, Shape{3, 33}, Shape{2, 3, 111}}) {
    add_cases<SwigluArgs>(
        grid, filter, shape_name(shape), plain,
        [shape](DType t, uint64_t seed) {
          Rng rng(seed);
          CaseData d;
          d.inputs.push_back(random_array(t, shape, rng, 2.0));
          d.inputs.push_back(random_array(t, shape, rng));
          d.outputs.push_back({t, shape});
          return d;
        },
        [](auto in, auto out) { return SwigluArgs{in[0], in[1], out[0], {}}; });
  }
}

struct RopeCase {
  Shape shape;  // [T, H, D]
  RopeParams params;
  const char* label;
  int32_t first_position = 0, last_position = 32767;  // positions drawn uniformly from this range
};

void add_rope(std::vector<VerifyCase>& grid, const GridFilter& filter) {
  RopeParams llama3{500000.0f, RopeStyle::half_split, 0, true, {}};
  RopeParams interleaved{10000.0f, RopeStyle::interleaved, 0, false, {}};
  RopeParams partial{10000.0f, RopeStyle::half_split, 32, false, {}};
  const RopeCase cases[] = {
      {{5, 4, 64}, RopeParams{}, "half-split"},
      {{3, 8, 128}, llama3, "half-split llama3"},
      {{4, 3, 128}, interleaved, "interleaved"},
      {{1, 2, 96}, partial, "half-split rotary_dim 32"},
      // Enough rows for the CPU kernel's threads, positions near 10^5 that repeat.
      {{128, 4, 128}, llama3, "half-split llama3 repeated positions", 99000, 99199},
      {{64, 8, 128}, interleaved, "interleaved repeated positions", 99000, 99199},
  };
  for (const RopeCase& rc : cases) {
    const int64_t tokens = rc.shape[0];
    RopeParams params = rc.params;
    if (params.rotary_dim == 0) params.rotary_dim = int(rc.shape[2]);
    add_cases<RopeArgs>(
        grid, filter, fmt::format("{} {}", shape_name(rc.shape), rc.label), plain,
        [shape = rc.shape, tokens, first = rc.first_position, last = rc.last_position](DType t, uint64_t seed) {
          Rng rng(seed);
          CaseData d;
          d.inputs.push_back(random_array(t, shape, rng));
          std::vector<int32_t> positions;
          for (int64_t i = 0; i < tokens; ++i) positions.push_back(int32_t(rng.uniform_int(first, last)));
          d.inputs.push_back(i32_array({tokens}, positions));
          d.outputs.push_back({t, shape});
          return d;
        },
        [params](auto in, auto out) { return RopeArgs{in[0], in[1], out[0], params, {}}; });
  }
}

}  // namespace

void add_layer_cases(std::vector<VerifyCase>& grid, const GridFilter& filter) {
  add_rms_norm(grid, filter);
  add_residual(grid, filter);
  add_bias(grid, filter);
  add_rms_norm_residual(grid, filter);
  add_swiglu(grid, filter);
  add_rope(grid, filter);
}

}  // namespace decodelab::verify
