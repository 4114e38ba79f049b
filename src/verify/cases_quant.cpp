// Verification cases for quantize/dequantize (bit-exact) and the matvec family over dense and
// quantized weights, batch 1 to 16, with sizes around the group size and odd ones.
#include <fmt/format.h>

#include "verify/weights.h"

namespace decodelab::verify {
namespace {

const QuantSpec kSpecs[] = {QuantSpec::mlx(4, 32), QuantSpec::mlx(4, 64), QuantSpec::mlx(4, 128),
                            QuantSpec::mlx(8, 64), QuantSpec::q4_0(), QuantSpec::q8_0()};

Tolerance exact(DType) { return {0.0, "bit-exact with the reference (and so with the owner's package)", true}; }

void add_quantize(std::vector<VerifyCase>& grid, const GridFilter& filter) {
  for (const QuantSpec& spec : kSpecs) {
    const int64_t rows = 7, cols = 2 * 128 + spec.group_size;  // groups: 2 * 128 / g + 1
    const std::string name = fmt::format("{} [{}, {}]", quant_spec_name(spec), rows, cols);
    // Scales take the weights' dtype, as mlx.core.quantize does.
    add_cases<QuantizeArgs>(
        grid, filter, name, exact,
        [spec, rows, cols](DType t, uint64_t seed) {
          Rng rng(seed);
          CaseData d;
          d.inputs.push_back(random_array(t, {rows, cols}, rng, 0.05));
          const QuantizedArray shape = make_quantized(spec, rows, cols, t);
          for (const Array* a : {&shape.packed, &shape.scales, &shape.biases}) {
            if (a->data() == nullptr) continue;
            const Tensor& v = a->view();
            d.outputs.push_back({v.dtype, {v.shape[0], v.shape[1]}});
          }
          return d;
        },
        [spec, rows, cols](auto in, auto out) {
          const bool mlx = spec.format == QuantFormat::mlx_affine;
          return QuantizeArgs{in[0], QuantizedWeight{spec, rows, cols, out[0], mlx ? out[1] : Tensor{}, mlx ? out[2] : Tensor{}}, {}};
        });
    add_cases<DequantizeArgs>(
        grid, filter, name, exact,
        [spec, rows, cols](DType t, uint64_t seed) {
          Rng rng(seed);
          CaseData d;
          add_weight(d, WeightKind{spec}, rows, cols, t, rng);
          d.outputs.push_back({t, {rows, cols}});
          return d;
        },
        [spec, rows, cols](auto in, auto out) {
          return DequantizeArgs{weight_at(in, 0, WeightKind{spec}, rows, cols).quantized, out[0], {}};
        });
  }
}

const WeightKind kWeightKinds[] = {WeightKind{}, WeightKind{QuantSpec::mlx(4, 64)}, WeightKind{QuantSpec::mlx(8, 64)},
                                   WeightKind{QuantSpec::q4_0()}, WeightKind{QuantSpec::q8_0()}};

void add_matvec(std::vector<VerifyCase>& grid, const GridFilter& filter) {
  struct Shape {
    int64_t batch, rows, cols;
  };
  for (const WeightKind& kind : kWeightKinds) {
    // Besides the usual sizes: batches 8 and 9 (one and two 8-input tiles of the CUDA tensor-core
    // kernel), a dense K whose 16-byte units do not fill the last chunk of 4, and K of whole
    // cuda.staged stages (1024 inputs for 4-bit) over partial 16-row tiles, 7168 with more stages
    // than it has buffers.
    for (const Shape s : {Shape{1, 64, 4096}, Shape{1, 33, 320}, Shape{3, 33, 256}, Shape{16, 40, 192},
                          Shape{8, 17, 448}, Shape{9, 24, 448}, Shape{2, 20, 200}, Shape{1, 40, 7168},
                          Shape{9, 24, 2048}}) {
      if (kind.quant && s.cols % 64 != 0) continue;  // K = 200: dense only
      add_cases<MatvecArgs>(
          grid, filter, fmt::format("{} B={} N={} K={}", kind.name(), s.batch, s.rows, s.cols),
          [](DType t) { return rounding_tolerance(t); },
          [kind, s](DType t, uint64_t seed) {
            Rng rng(seed);
            CaseData d;
            d.inputs.push_back(random_array(t, {s.batch, s.cols}, rng));
            add_weight(d, kind, s.rows, s.cols, t, rng);
            d.outputs.push_back({t, {s.batch, s.rows}});
            return d;
          },
          [kind, s](auto in, auto out) { return MatvecArgs{in[0], weight_at(in, 1, kind, s.rows, s.cols), out[0], {}}; });
    }
  }
}

void add_projections(std::vector<VerifyCase>& grid, const GridFilter& filter, int64_t hidden, int64_t q_rows,
                     int64_t kv_rows, int64_t inter) {
  for (const WeightKind& kind : kWeightKinds) {
    for (const int64_t batch : {int64_t{1}, int64_t{5}}) {
      const std::string name = fmt::format("{} B={} hidden={} q={} kv={} inter={}", kind.name(), batch, hidden,
                                           q_rows, kv_rows, inter);
      // Rows that are and are not multiples of the CUDA tensor-core kernel's 16-row tiles, whose
      // walk from one matrix to the next then starts inside a partial tile.
      for (const auto& [mq, mkv] : {std::pair{q_rows, kv_rows}, std::pair{int64_t{40}, int64_t{24}}}) {
        const std::string multi_name =
            fmt::format("{} B={} hidden={} q={} kv={}", kind.name(), batch, hidden, mq, mkv);
        add_cases<MatvecMultiArgs>(
            grid, filter, multi_name, [](DType t) { return rounding_tolerance(t); },
            [=](DType t, uint64_t seed) {
              Rng rng(seed);
              CaseData d;
              d.inputs.push_back(random_array(t, {batch, hidden}, rng));
              for (int64_t rows : {mq, mkv, mkv}) {
                add_weight(d, kind, rows, hidden, t, rng);
                d.outputs.push_back({t, {batch, rows}});
              }
              return d;
            },
            [=](auto in, auto out) {
              return MatvecMultiArgs{in[0],
                                     3,
                                     {weight_at(in, 1, kind, mq, hidden), weight_at(in, 4, kind, mkv, hidden),
                                      weight_at(in, 7, kind, mkv, hidden)},
                                     {out[0], out[1], out[2]},
                                     {}};
            });
      }
      add_cases<OutputProjectionArgs>(
          grid, filter, name, [](DType t) { return rounding_tolerance(t); },
          [=](DType t, uint64_t seed) {
            Rng rng(seed);
            CaseData d;
            d.inputs.push_back(random_array(t, {batch, q_rows}, rng));
            add_weight(d, kind, hidden, q_rows, t, rng);
            d.inputs.push_back(random_array(t, {batch, hidden}, rng));
            d.outputs.push_back({t, {batch, hidden}});
            return d;
          },
          [=](auto in, auto out) {
            return OutputProjectionArgs{in[0], weight_at(in, 1, kind, hidden, q_rows), in[4], out[0], {}};
          });
      // The SwiGLU activation is stored between the matvecs: one more rounding.
      add_cases<MlpBlockArgs>(
          grid, filter, name, [](DType t) { return rounding_tolerance(t, 4.0); },
          [=](DType t, uint64_t seed) {
            Rng rng(seed);
            CaseData d;
            d.inputs.push_back(random_array(t, {batch, hidden}, rng));
            add_weight(d, kind, inter, hidden, t, rng);
            add_weight(d, kind, inter, hidden, t, rng);
            add_weight(d, kind, hidden, inter, t, rng);
            d.outputs.push_back({t, {batch, hidden}});
            return d;
          },
          [=](auto in, auto out) {
            return MlpBlockArgs{in[0], weight_at(in, 1, kind, inter, hidden), weight_at(in, 4, kind, inter, hidden),
                                weight_at(in, 7, kind, hidden, inter), out[0], {}};
          });
    }
  }
}

}  // namespace

void add_quant_cases(std::vector<VerifyCase>& grid, const GridFilter& filter) {
  add_quantize(grid, filter);
  add_matvec(grid, filter);
  add_projections(grid, filter, 128, 128, 64, 384);
  add_projections(grid, filter, 1024, 1024, 256, 2048);  // whole cuda.staged stages: K = 1024 and 2048
}

}  // namespace decodelab::verify
