// `decodelab bench` on the CPU: the limits probe, the verification gate, and the timing of every
// registered CPU backend over a grid of decode shapes (Llama-3-8B: hidden 4096, 32 query heads,
// 8 KV heads, head_dim 128, intermediate 14336).
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>

#include "decodelab/bench.h"
#include "decodelab/kivi_cache.h"
#include "decodelab/qjl_cache.h"
#include "decodelab/rabitq_cache.h"
#include "decodelab/router.h"
#include "decodelab/turboquant_cache.h"
#include "decodelab/verify.h"
#include "kvquant/kivi_record.h"
#include "kvquant/rabitq_record.h"
#include "kvquant/record.h"
#include "router/autotune.h"
#ifdef DECODELAB_HAS_CUDA
#include "cuda/bench.h"
#endif
#include "verify/record_cache_fixture.h"
#include "verify/weights.h"

namespace decodelab {
namespace {

using verify::CaseData;
using verify::MakeArgs;

constexpr int64_t kRotateBytes = int64_t{96} << 20;  // inputs rotated past the 32 MiB L3 and then some
constexpr int64_t kLastLevelCacheBytes = int64_t{64} << 20;  // counted generously (L2s + L3)

struct Timing {
  double median_us = 0, p10_us = 0, p90_us = 0;
  int repeats = 0;
  std::string refused;
  bool in_cache = false;  // the rotated copies together fit in the last-level cache
  std::string shape_class;
  double graph_us = 0;  // GPU: per launch replayed from a CUDA graph; 0 elsewhere
};

struct BenchCase {
  std::string op, backend, dtype, shape;
  Device device = Device::cpu;
  int64_t bytes = 0, flops = 0;
  bool compute_bound = false;
  std::function<Timing(const BenchOptions&)> run;
};

// Fast uniform values in [-1, 1): the bench needs realistic magnitudes, not a distribution, and
// its inputs reach hundreds of MB.
void fill_uniform(const Tensor& t, uint64_t seed) {
  uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
  for (int64_t i = 0; i < t.numel(); ++i) {
    s ^= s << 13, s ^= s >> 7, s ^= s << 17;
    const double v = double(int64_t(s >> 11) - (int64_t{1} << 52)) / double(int64_t{1} << 52);
    switch (t.dtype) {
      case DType::f32: t.ptr<float>()[i] = float(v); break;
      case DType::f16: t.ptr<uint16_t>()[i] = f32_to_f16(float(v)); break;
      case DType::bf16: t.ptr<uint16_t>()[i] = f32_to_bf16(float(v)); break;
      default: break;
    }
  }
}

Array uniform(DType dtype, const std::vector<int64_t>& shape, uint64_t seed) {
  Array a(dtype, std::span<const int64_t>(shape));
  fill_uniform(a, seed);
  return a;
}

// Times kernel.run on `copies` rotated instances of the data.
template <class Args>
Timing time_kernel(const Kernel<Args>& kernel, const CaseData& host_data, const MakeArgs<Args>& make, int64_t bytes,
                   const BenchOptions& options, bool is_reference) {
  const bool gpu = kernel.device == Device::cuda;
  // The GPU's 50 MiB L2 is passed by a wider margin than the CPU's caches.
  const int64_t rotate = gpu ? int64_t{256} << 20 : kRotateBytes;
  const int copies = int(std::clamp<int64_t>(rotate / std::max<int64_t>(bytes, 1), 1, 32));
  CaseData device_data;
  for (const Array& a : host_data.inputs) device_data.inputs.push_back(a.to(kernel.device));
  device_data.outputs = host_data.outputs;
  const CaseData& data = gpu ? device_data : host_data;
  auto clone = [&](const Array& a) { return a.to(kernel.device); };
  std::vector<std::vector<Array>> inputs(static_cast<size_t>(copies)), outputs(static_cast<size_t>(copies));
  std::vector<Args> args;
  for (int c = 0; c < copies; ++c) {
    std::vector<Tensor> in, out;
    for (const Array& a : data.inputs) {
      inputs[size_t(c)].push_back(c == 0 ? Array() : clone(a));
      in.push_back(c == 0 ? a.view() : inputs[size_t(c)].back().view());
    }
    for (const verify::OutputSpec& spec : data.outputs) {
      outputs[size_t(c)].push_back(spec.initial_from >= 0 ? clone(data.inputs[size_t(spec.initial_from)])
                                                           : Array(spec.dtype, std::span<const int64_t>(spec.shape), kernel.device));
      out.push_back(outputs[size_t(c)].back().view());
    }
    args.push_back(make(in, out));
  }
  // A kernel that declines the shape is not timed (repeats = 0), and says why.
  if (const std::string why = kernel.refusal(args[0]); !why.empty()) return {0, 0, 0, 0, why, false, {}};
  if (gpu) {
#ifdef DECODELAB_HAS_CUDA
    const cuda::LaunchTiming t = cuda::time_launches([&](int c) { kernel.run(args[size_t(c)]); }, copies,
                                                     options.min_repeats, options.min_seconds);
    return {t.median_us, t.p10_us, t.p90_us, t.launches, {}, int64_t(copies) * bytes < (int64_t{50} << 20),
            shape_class(args[0]), t.graph_median_us};
#endif
  }
  using Clock = std::chrono::steady_clock;
  for (int w = 0; w < std::min(3, copies + 1); ++w) kernel.run(args[size_t(w % copies)]);
  std::vector<double> us;
  const auto start = Clock::now();
  const int max_repeats = is_reference ? 3 : 2000;
  const int min_repeats = is_reference ? 1 : options.min_repeats;
  for (int r = 0; r < max_repeats; ++r) {
    const auto t = Clock::now();
    kernel.run(args[size_t(r % copies)]);
    us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t).count());
    const double elapsed = std::chrono::duration<double>(Clock::now() - start).count();
    if (int(us.size()) >= min_repeats && elapsed >= (is_reference ? 0.0 : options.min_seconds)) break;
  }
  std::sort(us.begin(), us.end());
  auto at = [&](double q) { return us[size_t(q * double(us.size() - 1) + 0.5)]; };
  return {at(0.5), at(0.1), at(0.9), int(us.size()), {}, int64_t(copies) * bytes < kLastLevelCacheBytes,
          shape_class(args[0])};
}

bool selected(const BenchOptions& o, std::string_view op, std::string_view backend) {
  if (!o.op.empty() && o.op != op) return false;
  if (o.backend.empty()) return true;
  return backend == o.backend ||
         (backend.size() > o.backend.size() && backend.substr(0, o.backend.size()) == o.backend && backend[o.backend.size()] == '.');
}

// The reference is timed only where one run stays under about a second.
bool reference_affordable(int64_t bytes, int64_t flops) { return bytes < (int64_t{160} << 20) && flops < (int64_t{3} << 30); }

template <class Args>
void add_bench(std::vector<BenchCase>& cases, const BenchOptions& options, DType dtype, const std::string& shape,
               int64_t bytes, int64_t flops, bool compute_bound, std::function<CaseData()> build, MakeArgs<Args> make) {
  for (const auto& kernel : kernels<Args>()) {
    if (kernel.device != options.device || !selected(options, Args::kOp, kernel.backend)) continue;
    if (!options.shape.empty() && shape.find(options.shape) == std::string::npos) continue;
    const bool is_reference = kernel.backend == "reference";
    if (is_reference && (options.only_trusted || !reference_affordable(bytes, flops))) continue;
    BenchCase c{Args::kOp, std::string(kernel.backend), std::string(dtype_name(dtype)), shape, kernel.device,
                bytes, flops, compute_bound, {}};
    c.run = [&kernel, build, make, bytes, is_reference](const BenchOptions& o) {
      return time_kernel<Args>(kernel, build(), make, bytes, o, is_reference);
    };
    cases.push_back(std::move(c));
  }
}

// ---- The grid ---------------------------------------------------------------------------------

constexpr int64_t kHidden = 4096, kInter = 14336, kHq = 32, kHkv = 8, kD = 128;

// A page table of `batch` sequences of pages_per_seq pages each, the pages of a sequence scattered
// over the pool, as an allocator hands them out over time.
Array scattered_page_table(int64_t batch, int64_t pages_per_seq) {
  std::vector<int32_t> table(static_cast<size_t>(batch * pages_per_seq));
  for (size_t i = 0; i < table.size(); ++i) table[i] = int32_t((i * 7919) % table.size());
  return verify::i32_array({batch, pages_per_seq}, table);
}

// The append of one new token to each of `batch` sequences of a compressed cache, as one decode
// step of one layer does it: inputs k_new, v_new = [batch, Hkv, D] f16, then the cache arrays
// that `pools()` returns (written in place), then a scattered page table of pages_per_seq pages
// per sequence and `lengths`. `make(in, out)` gets the pools as out[0..].
template <class Args>
void add_append_bench(std::vector<BenchCase>& cases, const BenchOptions& o, const std::string& shape, int64_t bytes,
                      int64_t pages_per_seq, const std::vector<int32_t>& lengths,
                      const std::function<std::vector<Array>()>& pools, MakeArgs<Args> make) {
  const DType t = DType::f16;
  const int64_t batch = int64_t(lengths.size());
  add_bench<Args>(
      cases, o, t, shape, bytes, 0, false,
      [=] {
        CaseData d;
        d.inputs.push_back(uniform(t, {batch, kHkv, kD}, 1));
        d.inputs.push_back(uniform(t, {batch, kHkv, kD}, 2));
        std::vector<Array> arrays = pools();
        const size_t count = arrays.size();
        for (Array& a : arrays) d.inputs.push_back(std::move(a));
        d.inputs.push_back(scattered_page_table(batch, pages_per_seq));
        d.inputs.push_back(verify::i32_array({batch}, lengths));
        verify::add_in_place_outputs(d, 2, count);
        return d;
      },
      make);
}

// Lengths 100 + b % 16 for `batch` sequences: the new tokens land at different slots of a page.
std::vector<int32_t> append_lengths(int64_t batch) {
  std::vector<int32_t> lengths;
  for (int64_t b = 0; b < batch; ++b) lengths.push_back(int32_t(100 + b % 16));
  return lengths;
}

// The append of a record cache (Cache: PagedTurboQuantKV, PagedRabitqKV or PagedQjlKV, `codecs`
// its key and value codecs) for 1 and 16 sequences: read the new K and V rows, write their records
// of k_record and v_record bytes.
template <class Args, class Cache, class Codecs>
void add_record_append_bench(std::vector<BenchCase>& cases, const BenchOptions& o, const std::string& codecs_name,
                             int64_t page, int64_t k_record, int64_t v_record, std::shared_ptr<const Codecs> codecs) {
  const int64_t e = int64_t(dtype_size(DType::f16)), pages_per_seq = 8;
  for (const int64_t batch : {int64_t{1}, int64_t{16}}) {
    add_append_bench<Args>(
        cases, o, fmt::format("{} sequences Hkv={} D={} page {} {}", batch, kHkv, kD, page, codecs_name),
        batch * kHkv * (2 * kD * e + k_record + v_record), pages_per_seq, append_lengths(batch),
        [=] {
          std::vector<Array> pools;
          for (const int64_t r : {k_record, v_record}) {
            pools.emplace_back(DType::u8, std::initializer_list<int64_t>{batch * pages_per_seq, page, kHkv, r});
          }
          return pools;
        },
        [codecs](auto in, auto out) {
          return Args{in[0], in[1], Cache{out[0], out[1], in[4], in[5], &codecs->first, &codecs->second}, {}};
        });
  }
}

void add_matvec(std::vector<BenchCase>& cases, const BenchOptions& o) {
  const DType t = DType::f16;
  std::vector<verify::WeightKind> kinds = {verify::WeightKind{}, verify::WeightKind{QuantSpec::mlx(4, 64)},
                                           verify::WeightKind{QuantSpec::q4_0()}};
  std::vector<std::pair<int64_t, int64_t>> shapes = {{kHidden, kInter}};
  std::vector<int64_t> batches = {1};
  if (!o.quick) {
    kinds.push_back(verify::WeightKind{QuantSpec::mlx(8, 64)});
    kinds.push_back(verify::WeightKind{QuantSpec::q8_0()});
    shapes = {{kHidden, kInter}, {kInter, kHidden}, {kHidden, kHidden}};
    batches = {1, 8, 16};
  }
  for (const auto& kind : kinds) {
    for (const auto& [rows, cols] : shapes) {
      for (const int64_t batch : batches) {
        const int64_t weight_bytes = kind.quant ? rows * quantized_row_bytes(*kind.quant, cols, DType::f16)
                                                : rows * cols * int64_t(dtype_size(t));
        const int64_t bytes = weight_bytes + batch * (rows + cols) * int64_t(dtype_size(t));
        add_bench<MatvecArgs>(
            cases, o, t, fmt::format("{} B={} N={} K={}", kind.name(), batch, rows, cols), bytes, 2 * batch * rows * cols,
            false,
            [=] {
              CaseData d;
              d.inputs.push_back(uniform(t, {batch, cols}, 1));
              if (kind.quant) {
                // Quantize uniform values with the reference once: realistic codes and scales.
                const Array values = uniform(DType::f32, {rows, cols}, 2);
                QuantizedArray q = make_quantized(*kind.quant, rows, cols, DType::f16);
                quantize(values, q.weight, {"reference"});
                d.inputs.push_back(std::move(q.packed));
                d.inputs.push_back(std::move(q.scales));
                d.inputs.push_back(std::move(q.biases));
              } else {
                d.inputs.push_back(uniform(t, {rows, cols}, 2));
                d.inputs.emplace_back();
                d.inputs.emplace_back();
              }
              d.outputs.push_back({t, {batch, rows}});
              return d;
            },
            [=](auto in, auto out) { return MatvecArgs{in[0], verify::weight_at(in, 1, kind, rows, cols), out[0], {}}; });
      }
    }
  }
}

// Decode (and paged decode) over an f16 cache of `length` tokens for `batch` sequences.
void add_decode(std::vector<BenchCase>& cases, const BenchOptions& o) {
  const DType t = DType::f16;
  // (batch, length) pairs: the issues' targets for each device.
  std::vector<std::pair<int64_t, int64_t>> shapes = {{1, 4096}};
  if (!o.quick && o.device == Device::cpu) shapes = {{1, 4096}, {1, 8192}, {1, 32768}, {4, 4096}, {4, 8192}, {4, 32768}};
  if (!o.quick && o.device == Device::cuda) {
    shapes = {{1, 4096}, {1, 8192}, {1, 32768}, {1, 131072}, {32, 4096}, {8, 8192}, {4, 32768}, {16, 32768}, {16, 131072}};
  }
  const int64_t page = 16;
  for (const auto& [batch, length] : shapes) {
    {
      const int64_t kv_bytes = 2 * batch * kHkv * length * kD * int64_t(dtype_size(t));
      const int64_t bytes = kv_bytes + 2 * batch * kHq * kD * int64_t(dtype_size(t));
      const int64_t flops = 4 * batch * kHq * length * kD;
      const std::string shape = fmt::format("B={} L={} Hq={} Hkv={} D={}", batch, length, kHq, kHkv, kD);
      const std::vector<int32_t> lens(static_cast<size_t>(batch), int32_t(length));
      add_bench<DecodeAttentionArgs>(
          cases, o, t, shape, bytes, flops, false,
          [=] {
            CaseData d;
            d.inputs.push_back(uniform(t, {batch, 1, kHq, kD}, 1));
            d.inputs.push_back(uniform(t, {batch, kHkv, length, kD}, 2));
            d.inputs.push_back(uniform(t, {batch, kHkv, length, kD}, 3));
            d.inputs.push_back(verify::i32_array({batch}, lens));
            d.outputs.push_back({t, {batch, 1, kHq, kD}});
            return d;
          },
          [](auto in, auto out) {
            return DecodeAttentionArgs{in[0], ContiguousKV{in[1], in[2], in[3]}, out[0], {true, 1.0f / 11.3137085f}, {}};
          });
      const int64_t pages_per_seq = length / page;
      add_bench<DecodeAttentionPagedArgs>(
          cases, o, t, shape + fmt::format(" page {}", page), bytes, flops, false,
          [=] {
            CaseData d;
            d.inputs.push_back(uniform(t, {batch, 1, kHq, kD}, 1));
            d.inputs.push_back(uniform(t, {batch * pages_per_seq, page, kHkv, kD}, 2));
            d.inputs.push_back(uniform(t, {batch * pages_per_seq, page, kHkv, kD}, 3));
            d.inputs.push_back(scattered_page_table(batch, pages_per_seq));
            d.inputs.push_back(verify::i32_array({batch}, lens));
            d.outputs.push_back({t, {batch, 1, kHq, kD}});
            return d;
          },
          [](auto in, auto out) {
            return DecodeAttentionPagedArgs{in[0], PagedKV{in[1], in[2], in[3], in[4]}, out[0], {true, 1.0f / 11.3137085f}, {}};
          });
    }
  }
}

// Random bytes in every record of a TurboQuant pool u8 [num_pages, page_size, Hkv, R], each with
// the norm sqrt(D) of an N(0, I) head vector: the kernels' cost does not depend on which indices
// they read, and encoding hundreds of MB through the codec would take seconds per case.
Array random_records(const std::vector<int64_t>& shape, int64_t d, uint64_t seed) {
  Array a(DType::u8, std::span<const int64_t>(shape));
  uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
  uint8_t* bytes = a.ptr<uint8_t>();
  for (size_t i = 0; i < a.nbytes(); ++i) {
    s ^= s << 13, s ^= s >> 7, s ^= s << 17;
    bytes[i] = uint8_t(s >> 56);
  }
  const int64_t r = shape.back();
  for (size_t at = 0; at < a.nbytes(); at += size_t(r)) detail::store_f32_le(bytes + at, float(std::sqrt(double(d))));
  return a;
}

// Fused decode attention over a paged cache of records (turboquant_cache.h, rabitq_cache.h,
// qjl_cache.h): B sequences of `length` tokens in pages of `page`, key and value records of kr and
// vr bytes. The bytes are those read: the K and V records, the page table, q and out.
int64_t record_attention_bytes(DType t, int64_t batch, int64_t length, int64_t page, int64_t kr, int64_t vr) {
  return batch * length * kHkv * (kr + vr) + batch * (length / page) * 4 + 2 * batch * kHq * kD * int64_t(dtype_size(t));
}

// Its inputs: q, the key and value pools (their records filled by the caller), pages scattered as
// add_decode's paged case, the lengths; and out.
CaseData record_attention_data(DType t, int64_t batch, int64_t length, int64_t page, Array keys, Array values) {
  const int64_t pages_per_seq = length / page;
  CaseData d;
  d.inputs.push_back(uniform(t, {batch, kHq, kD}, 1));
  d.inputs.push_back(std::move(keys));
  d.inputs.push_back(std::move(values));
  d.inputs.push_back(scattered_page_table(batch, pages_per_seq));
  d.inputs.push_back(verify::i32_array({batch}, std::vector<int32_t>(static_cast<size_t>(batch), int32_t(length))));
  d.outputs.push_back({t, {batch, kHq, kD}});
  return d;
}

// Its arguments over record_attention_data's tensors, the codecs a shared pair, scale 1/sqrt(D).
template <class Args, class Cache, class Codecs>
MakeArgs<Args> record_attention_args(std::shared_ptr<const Codecs> codecs) {
  return [codecs](auto in, auto out) {
    return Args{in[0], Cache{in[1], in[2], in[3], in[4], &codecs->first, &codecs->second}, out[0],
                {true, 1.0f / 11.3137085f}, {}};
  };
}

// The (batch, length) pairs of the fused attention benches over record caches: on the GPU the
// issue's targets (issue 5, Speed), on the CPU the shapes of f16 decode attention (add_decode) so
// the two compare row by row.
std::vector<std::pair<int64_t, int64_t>> record_attention_shapes(const BenchOptions& o) {
  if (o.quick) return {{1, 4096}};
  if (o.device == Device::cuda) return {{1, 32768}, {1, 131072}, {16, 32768}, {16, 131072}};
  return {{1, 4096}, {1, 8192}, {1, 32768}, {4, 4096}, {4, 8192}, {4, 32768}};
}

// Fused decode attention over the paged TurboQuant cache (record_attention_shapes) and the append
// of one new token per sequence.
void add_turboquant(std::vector<BenchCase>& cases, const BenchOptions& o) {
  const DType t = DType::f16;
  const int64_t page = 16;
  const std::vector<std::pair<int64_t, int64_t>> shapes = record_attention_shapes(o);
  std::vector<double> bit_widths = {4};
  if (!o.quick) bit_widths = {4, 3.5, 3, 2.5, 2};  // 3.5 and 2.5: split widths
  for (const double bits : bit_widths) {
    // K and V at the same bits, the shipping rotation and scale; shared by the cases' arguments.
    const int whole = int(bits);
    const int64_t high = int64_t((bits - whole) * double(kD));
    const auto codecs = std::make_shared<const std::pair<kvquant::TurboQuantMse, kvquant::TurboQuantMse>>(
        kvquant::TurboQuantConfig{kD, whole, kvquant::RotationKind::hadamard, 1, kvquant::ScaleMode::plain, high},
        kvquant::TurboQuantConfig{kD, whole, kvquant::RotationKind::hadamard, 2, kvquant::ScaleMode::plain, high});
    const int64_t record = codecs->first.record_bytes();
    for (const auto& [batch, length] : shapes) {
      const int64_t pages_per_seq = length / page;
      add_bench<TurboQuantDecodeAttentionPagedArgs>(
          cases, o, t,
          fmt::format("B={} L={} Hq={} Hkv={} D={} page {} K/V {:g}/{:g}-bit", batch, length, kHq, kHkv, kD, page, bits, bits),
          record_attention_bytes(t, batch, length, page, record, record), 4 * batch * kHq * length * kD, false,
          [=] {
            return record_attention_data(t, batch, length, page,
                                         random_records({batch * pages_per_seq, page, kHkv, record}, kD, 2),
                                         random_records({batch * pages_per_seq, page, kHkv, record}, kD, 3));
          },
          record_attention_args<TurboQuantDecodeAttentionPagedArgs, PagedTurboQuantKV>(codecs));
    }
    add_record_append_bench<TurboQuantAppendPagedArgs, PagedTurboQuantKV>(
        cases, o, fmt::format("K/V {:g}/{:g}-bit", bits, bits), page, record, record, codecs);
  }
}

// Fused decode attention over the paged KIVI cache (kivi_cache.h), record_attention_shapes; KIVI's
// defaults (G = 32, value groups of 32, R = 32) and pages of 32 tokens.
// The bytes are those read: the key blocks and value records below the quantized counts, the
// f32 window of the rest, the page table, q and out.
void add_kivi(std::vector<BenchCase>& cases, const BenchOptions& o) {
  const DType t = DType::f16;
  const int64_t e = int64_t(dtype_size(t)), page = 32;
  const std::vector<std::pair<int64_t, int64_t>> shapes = record_attention_shapes(o);
  std::vector<int> bit_widths = {4};
  if (!o.quick) bit_widths = {4, 2};
  for (const int bits : bit_widths) {
    const auto codec = std::make_shared<const kvquant::KiviCodec>(kvquant::KiviConfig{kD, bits, 32, 32, 32});
    const kvquant::KiviConfig& c = codec->config();
    const int64_t kb = codec->key_block_bytes(), vb = codec->value_record_bytes(), window = c.residual + c.key_group;
    for (const auto& [batch, length] : shapes) {
      const int64_t pages_per_seq = length / page;
      const int64_t qk = detail::kivi_quantized_keys(length, c.key_group, c.residual);
      const int64_t qv = detail::kivi_quantized_values(length, c.residual);
      const int64_t per_head = qk / c.key_group * kb + qv * vb + (2 * length - qk - qv) * kD * 4;
      const int64_t bytes = batch * kHkv * per_head + batch * pages_per_seq * 4 + 2 * batch * kHq * kD * e;
      const std::vector<int32_t> lens(static_cast<size_t>(batch), int32_t(length));
      add_bench<KiviDecodeAttentionPagedArgs>(
          cases, o, t,
          fmt::format("B={} L={} Hq={} Hkv={} D={} page {} {}-bit G={} R={}", batch, length, kHq, kHkv, kD, page, bits,
                      c.key_group, c.residual),
          bytes, 4 * batch * kHq * length * kD, false,
          [=] {
            // Random codes; every record's (lo, scale) pairs set to valid values, which the
            // kernel's cost does not depend on.
            const auto records = [&](const std::vector<int64_t>& shape, int64_t pairs, uint64_t seed) {
              Array a = random_records(shape, kD, seed);
              for (size_t at = 0; at < a.nbytes(); at += size_t(shape.back())) {
                for (int64_t i = 0; i < 2 * pairs; ++i) detail::store_f32_le(a.ptr<uint8_t>() + at + 4 * i, i < pairs ? -1.0f : 0.5f);
              }
              return a;
            };
            CaseData d;
            d.inputs.push_back(uniform(t, {batch, kHq, kD}, 1));
            d.inputs.push_back(records({batch * pages_per_seq, page / c.key_group, kHkv, kb}, kD, 2));
            d.inputs.push_back(records({batch * pages_per_seq, page, kHkv, vb}, kD / c.value_group, 3));
            d.inputs.push_back(uniform(DType::f32, {batch, window, kHkv, kD}, 4));
            d.inputs.push_back(uniform(DType::f32, {batch, window, kHkv, kD}, 5));
            d.inputs.push_back(scattered_page_table(batch, pages_per_seq));
            d.inputs.push_back(verify::i32_array({batch}, lens));
            d.outputs.push_back({t, {batch, kHq, kD}});
            return d;
          },
          [codec](auto in, auto out) {
            return KiviDecodeAttentionPagedArgs{in[0], PagedKiviKV{in[1], in[2], in[3], in[4], in[5], in[6], codec.get()},
                                                out[0], {true, 1.0f / 11.3137085f}, {}};
          });
    }
    // One new token for each of `batch` sequences, at lengths 100 + b % 16 (a token whose step
    // quantizes a value only: read K and V, write them to the ring, encode one value) and at
    // length 95 (T - R = 64: the step that also quantizes a key block, reading its G keys from
    // the ring; one step in G). Host backends only: add_bench adds no case where none is
    // registered, as on cuda.
    for (const int64_t batch : {int64_t{1}, int64_t{16}}) {
      for (const bool block : {false, true}) {
        const int64_t pages_per_seq = 8;
        const int64_t per_head = 2 * kD * e + 2 * kD * 4 + vb + (block ? c.key_group * kD * 4 + kb : 0);
        add_append_bench<KiviAppendPagedArgs>(
            cases, o,
            fmt::format("{} sequences Hkv={} D={} page {} {}-bit G={} R={}{}", batch, kHkv, kD, page, bits, c.key_group,
                        c.residual, block ? " key block" : ""),
            batch * kHkv * per_head, pages_per_seq,
            block ? std::vector<int32_t>(size_t(batch), 95) : append_lengths(batch),
            [=] {
              std::vector<Array> pools;
              pools.emplace_back(DType::u8, std::initializer_list<int64_t>{batch * pages_per_seq, page / c.key_group, kHkv, kb});
              pools.emplace_back(DType::u8, std::initializer_list<int64_t>{batch * pages_per_seq, page, kHkv, vb});
              pools.push_back(uniform(DType::f32, {batch, window, kHkv, kD}, 4));
              pools.push_back(uniform(DType::f32, {batch, window, kHkv, kD}, 5));
              return pools;
            },
            [codec](auto in, auto out) {
              return KiviAppendPagedArgs{in[0], in[1], PagedKiviKV{out[0], out[1], out[2], out[3], in[6], in[7], codec.get()},
                                         {}};
            });
      }
    }
  }
}

// Fused decode attention over the paged RaBitQ-key / TurboQuant-value cache (rabitq_cache.h),
// record_attention_shapes: 1-bit RaBitQ keys with 2-bit values, 4-bit extended RaBitQ keys with
// 4-bit values; and the append of one new token per sequence.
void add_rabitq(std::vector<BenchCase>& cases, const BenchOptions& o) {
  const DType t = DType::f16;
  const int64_t page = 16;
  std::vector<std::pair<int, int>> bit_widths = {{1, 2}};
  if (!o.quick) bit_widths = {{1, 2}, {4, 4}};
  for (const auto& [k_bits, v_bits] : bit_widths) {
    const auto codecs = std::make_shared<const std::pair<kvquant::RabitqKeys, kvquant::TurboQuantMse>>(
        kvquant::RabitqConfig{kD, k_bits, 4, kvquant::RotationKind::hadamard, 1, {}},
        kvquant::TurboQuantConfig{kD, v_bits, kvquant::RotationKind::hadamard, 2});
    const int64_t kr = codecs->first.record_bytes(), vr = codecs->second.record_bytes();
    for (const auto& [batch, length] : record_attention_shapes(o)) {
      const int64_t pages = batch * (length / page);
      add_bench<RabitqDecodeAttentionPagedArgs>(
          cases, o, t,
          fmt::format("B={} L={} Hq={} Hkv={} D={} page {} K RaBitQ {}-bit V {}-bit", batch, length, kHq, kHkv, kD, page,
                      k_bits, v_bits),
          record_attention_bytes(t, batch, length, page, kr, vr), 4 * batch * kHq * length * kD, false,
          [=] {
            // Random codes; every key record's correction set to a valid value, which the
            // kernel's cost does not depend on.
            Array keys = random_records({pages, page, kHkv, kr}, kD, 2);
            for (size_t at = 0; at < keys.nbytes(); at += size_t(kr)) {
              detail::store_f32_le(keys.ptr<uint8_t>() + at + detail::kRabitqCorrectionOffset, 0.8f);
            }
            return record_attention_data(t, batch, length, page, std::move(keys),
                                         random_records({pages, page, kHkv, vr}, kD, 3));
          },
          record_attention_args<RabitqDecodeAttentionPagedArgs, PagedRabitqKV>(codecs));
    }
    add_record_append_bench<RabitqAppendPagedArgs, PagedRabitqKV>(
        cases, o, fmt::format("K RaBitQ {}-bit V {}-bit", k_bits, v_bits), page, kr, vr, codecs);
  }
}

// Fused decode attention over the paged QJL-key / TurboQuant-value cache (qjl_cache.h),
// record_attention_shapes: sketches of m = D and 2D (the paper's keys use m of a few D) with
// 2-bit values, m = 2D with 4-bit values. A QJL record is its norm and sign bits, all of whose
// values are valid codes, so random_records' bytes are a cache. And the append of one new token
// per sequence.
void add_qjl(std::vector<BenchCase>& cases, const BenchOptions& o) {
  const DType t = DType::f16;
  const int64_t page = 16;
  std::vector<std::pair<int64_t, int>> widths = {{2 * kD, 2}};
  if (!o.quick) widths = {{kD, 2}, {2 * kD, 2}, {2 * kD, 4}};
  for (const auto& [m, v_bits] : widths) {
    const auto codecs = std::make_shared<const std::pair<kvquant::QjlKeys, kvquant::TurboQuantMse>>(
        kvquant::QjlConfig{kD, m, 1}, kvquant::TurboQuantConfig{kD, v_bits, kvquant::RotationKind::hadamard, 2});
    const int64_t kr = codecs->first.record_bytes(), vr = codecs->second.record_bytes();
    for (const auto& [batch, length] : record_attention_shapes(o)) {
      const int64_t pages = batch * (length / page);
      add_bench<QjlDecodeAttentionPagedArgs>(
          cases, o, t,
          fmt::format("B={} L={} Hq={} Hkv={} D={} page {} K QJL m={} V {}-bit", batch, length, kHq, kHkv, kD, page, m,
                      v_bits),
          record_attention_bytes(t, batch, length, page, kr, vr), 2 * batch * kHq * length * (m + kD), false,
          [=] {
            return record_attention_data(t, batch, length, page, random_records({pages, page, kHkv, kr}, kD, 2),
                                         random_records({pages, page, kHkv, vr}, kD, 3));
          },
          record_attention_args<QjlDecodeAttentionPagedArgs, PagedQjlKV>(codecs));
    }
    add_record_append_bench<QjlAppendPagedArgs, PagedQjlKV>(cases, o, fmt::format("K QJL m={} V {}-bit", m, v_bits),
                                                           page, kr, vr, codecs);
  }
}

void add_prefill(std::vector<BenchCase>& cases, const BenchOptions& o) {
  if (o.quick) return;
  const DType t = DType::f16;
  for (const int64_t s : {int64_t{512}, int64_t{2048}}) {
    const int64_t flops = 4 * kHq * kD * s * s / 2;  // causal: half the score matrix
    const int64_t bytes = (2 * kHq + 2 * kHkv) * s * kD * int64_t(dtype_size(t));
    add_bench<PrefillAttentionArgs>(
        cases, o, t, fmt::format("B=1 S={} Hq={} Hkv={} D={} causal", s, kHq, kHkv, kD), bytes, flops, true,
        [=] {
          CaseData d;
          d.inputs.push_back(uniform(t, {1, s, kHq, kD}, 1));
          d.inputs.push_back(uniform(t, {1, s, kHkv, kD}, 2));
          d.inputs.push_back(uniform(t, {1, s, kHkv, kD}, 3));
          d.outputs.push_back({t, {1, s, kHq, kD}});
          return d;
        },
        [](auto in, auto out) { return PrefillAttentionArgs{in[0], in[1], in[2], out[0], {true, 1.0f / 11.3137085f}, {}}; });
  }
}

// The elementwise and norm layers over T tokens of the hidden (or intermediate) width.
void add_layers(std::vector<BenchCase>& cases, const BenchOptions& o) {
  const DType t = DType::f16;
  const int64_t e = int64_t(dtype_size(t));
  std::vector<int64_t> token_counts = {1};
  if (!o.quick) token_counts = {1, 256};
  for (const int64_t tokens : token_counts) {
    add_bench<RmsNormArgs>(
        cases, o, t, fmt::format("[{}, {}]", tokens, kHidden), (2 * tokens + 1) * kHidden * e, 0, false,
        [=] {
          CaseData d;
          d.inputs.push_back(uniform(t, {tokens, kHidden}, 1));
          d.inputs.push_back(uniform(t, {kHidden}, 2));
          d.outputs.push_back({t, {tokens, kHidden}});
          return d;
        },
        [](auto in, auto out) { return RmsNormArgs{in[0], in[1], out[0], 1e-5f, {}}; });
    if (o.quick) continue;
    add_bench<RmsNormResidualArgs>(
        cases, o, t, fmt::format("[{}, {}]", tokens, kHidden), (4 * tokens + 1) * kHidden * e, 0, false,
        [=] {
          CaseData d;
          d.inputs.push_back(uniform(t, {tokens, kHidden}, 1));
          d.inputs.push_back(uniform(t, {tokens, kHidden}, 2));
          d.inputs.push_back(uniform(t, {kHidden}, 3));
          d.outputs.push_back({t, {tokens, kHidden}, 1});
          d.outputs.push_back({t, {tokens, kHidden}});
          return d;
        },
        [](auto in, auto out) { return RmsNormResidualArgs{in[0], out[0], in[2], out[1], 1e-5f, {}}; });
    add_bench<SwigluArgs>(
        cases, o, t, fmt::format("[{}, {}]", tokens, kInter), 3 * tokens * kInter * e, 0, false,
        [=] {
          CaseData d;
          d.inputs.push_back(uniform(t, {tokens, kInter}, 1));
          d.inputs.push_back(uniform(t, {tokens, kInter}, 2));
          d.outputs.push_back({t, {tokens, kInter}});
          return d;
        },
        [](auto in, auto out) { return SwigluArgs{in[0], in[1], out[0], {}}; });
    // Qwen2's q projection bias, added in place as the decode block does: read and write the rows,
    // read the bias once.
    add_bench<BiasAddArgs>(
        cases, o, t, fmt::format("[{}, {}] in place", tokens, kHq * kD), (2 * tokens + 1) * kHq * kD * e, 0, false,
        [=] {
          CaseData d;
          d.inputs.push_back(uniform(t, {tokens, kHq * kD}, 1));
          d.inputs.push_back(uniform(t, {kHq * kD}, 2));
          d.outputs.push_back({t, {tokens, kHq * kD}, 0});
          return d;
        },
        [](auto in, auto out) { return BiasAddArgs{out[0], in[1], out[0], {}}; });
    add_bench<RopeArgs>(
        cases, o, t, fmt::format("[{}, {}, {}] llama3", tokens, kHq, kD), 2 * tokens * kHq * kD * e, 0, false,
        [=] {
          CaseData d;
          d.inputs.push_back(uniform(t, {tokens, kHq, kD}, 1));
          std::vector<int32_t> positions(static_cast<size_t>(tokens));
          for (int64_t i = 0; i < tokens; ++i) positions[size_t(i)] = int32_t(4000 + i);
          d.inputs.push_back(verify::i32_array({tokens}, positions));
          d.outputs.push_back({t, {tokens, kHq, kD}});
          return d;
        },
        [](auto in, auto out) {
          return RopeArgs{in[0], in[1], out[0], RopeParams{500000.0f, RopeStyle::half_split, int(kD), true, {}}, {}};
        });
    // The fused decode step for `tokens` sequences (one new token each) into a paged cache: read
    // the qkv rows, write Q and the new K and V rows.
    const int64_t page = 16, pages_per_seq = 8, qkv_width = (kHq + 2 * kHkv) * kD;
    add_bench<QkvRopeAppendPagedArgs>(
        cases, o, t, fmt::format("{} sequences Hq={} Hkv={} D={} page {}", tokens, kHq, kHkv, kD, page),
        tokens * (qkv_width + qkv_width) * e, 0, false,
        [=] {
          CaseData d;
          d.inputs.push_back(uniform(t, {tokens, 1, qkv_width}, 1));
          d.inputs.push_back(scattered_page_table(tokens, pages_per_seq));
          d.inputs.push_back(verify::i32_array({tokens}, append_lengths(tokens)));
          d.outputs.push_back({t, {tokens, 1, kHq, kD}});
          d.outputs.push_back({t, {tokens * pages_per_seq, page, kHkv, kD}});
          d.outputs.push_back({t, {tokens * pages_per_seq, page, kHkv, kD}});
          return d;
        },
        [](auto in, auto out) {
          return QkvRopeAppendPagedArgs{in[0], out[0], PagedKV{out[1], out[2], in[1], in[2]},
                                        RopeParams{500000.0f, RopeStyle::half_split, int(kD), true, {}}, {}};
        });
  }
}

std::vector<BenchCase> bench_grid(const BenchOptions& o) {
  std::vector<BenchCase> cases;
  add_matvec(cases, o);
  add_decode(cases, o);
  add_turboquant(cases, o);
  add_kivi(cases, o);
  add_rabitq(cases, o);
  add_qjl(cases, o);
  add_prefill(cases, o);
  add_layers(cases, o);
  return cases;
}

}  // namespace

BandwidthProbe measure_limits(Device device) {
  if (device == Device::cpu) return measure_cpu_limits();
#ifdef DECODELAB_HAS_CUDA
  return cuda::measure_limits(int64_t{2} << 30);
#else
  fail("measure_limits", "device", "cpu (this build has no CUDA)", "cuda");
#endif
}

BenchResult run_benchmarks(const BenchOptions& options) {
  BenchResult result;
  std::vector<BenchCase> cases = bench_grid(options);
  if (options.only_trusted) {
    TrustStore trust(cpu_chip());
    if (!trust.load()) result.refused.push_back(trust.warning());
    std::erase_if(cases, [&](const BenchCase& c) {
      const TrustRecord* r = trust.find(c.op, c.backend, c.dtype);
      return r == nullptr || !r->trusted();
    });
  }
  // The gate: every (op, backend) about to be timed runs its verification cases first.
  std::set<std::pair<std::string, std::string>> failed;
  std::set<std::pair<std::string, std::string>> pairs;
  for (const BenchCase& c : cases) pairs.insert({c.op, c.backend});
  for (const auto& [op, backend] : pairs) {
    for (const VerifyCase& v : verification_grid(GridFilter{op, backend, true})) {
      if (v.backend != backend) continue;
      const CaseOutcome out = v.run(1);
      if (!out.passed() && !out.skipped()) {
        failed.insert({op, backend});
        result.refused.push_back(fmt::format("{} {}: failed verification ({} {}: {})", op, backend, v.dtype, v.shape,
                                             out.summary()));
        break;
      }
    }
  }
  if (options.progress) options.progress("measuring memory bandwidth");
  result.limits = measure_limits(options.device);
  for (size_t i = 0; i < cases.size(); ++i) {
    const BenchCase& c = cases[i];
    if (failed.count({c.op, c.backend})) continue;
    if (options.progress) options.progress(fmt::format("[{}/{}] {} {} {} {}", i + 1, cases.size(), c.op, c.backend, c.dtype, c.shape));
    const Timing t = c.run(options);
    if (t.repeats == 0) {
      result.refused.push_back(fmt::format("{} {} {}: {}", c.op, c.backend, c.shape, t.refused));
      continue;
    }
    BenchRecord r{c.op, c.backend, c.dtype, c.shape, t.shape_class, t.median_us, t.p10_us, t.p90_us, t.repeats,
                  c.bytes, c.flops};
    r.gbps = double(c.bytes) / (t.median_us * 1e-6) * 1e-9;
    r.pct_of_read_bandwidth = 100.0 * r.gbps / result.limits.read_gbps;
    r.gflops = double(c.flops) / (t.median_us * 1e-6) * 1e-9;
    r.pct_of_fma_peak = result.limits.fma_gflops > 0 ? 100.0 * r.gflops / result.limits.fma_gflops : 0.0;
    r.compute_bound = c.compute_bound;
    r.in_cache = t.in_cache;
    r.graph_median_us = t.graph_us;
    if (t.graph_us > 0) r.graph_pct_of_read_bandwidth = 100.0 * double(c.bytes) / (t.graph_us * 1e-6) * 1e-9 / result.limits.read_gbps;
    r.device = std::string(device_name(c.device));
    result.records.push_back(r);
  }
  // Speedups within each (op, dtype, shape): over the reference and over the stable default.
  std::map<std::tuple<std::string, std::string, std::string>, std::pair<double, double>> baselines;
  for (const BenchRecord& r : result.records) {
    auto& [reference_us, default_us] = baselines[{r.op, r.dtype, r.shape}];
    if (r.backend == "reference") reference_us = r.median_us;
    if (r.backend == "cpu" || r.backend == "cuda") default_us = r.median_us;
  }
  for (BenchRecord& r : result.records) {
    const auto& [reference_us, default_us] = baselines[{r.op, r.dtype, r.shape}];
    if (reference_us > 0) r.speedup_vs_reference = reference_us / r.median_us;
    if (default_us > 0) r.speedup_vs_default = default_us / r.median_us;
  }
  return result;
}

std::vector<TuneChoice> tune_cpu(const BenchOptions& options, std::string* cache_path) {
  BenchOptions o = options;
  o.only_trusted = true;
  const BenchResult result = run_benchmarks(o);
  // The fastest trusted backend per (op, dtype, shape class); the stable default's time beside it.
  std::map<std::tuple<std::string, std::string, std::string>, TuneChoice> best;
  for (const BenchRecord& r : result.records) {
    TuneChoice& c = best[{r.op, r.dtype, r.shape_class}];
    if (c.backend.empty() || r.median_us < c.median_us) c = {r.op, r.dtype, r.shape_class, r.backend, r.median_us, c.default_us};
    if (r.backend == "cpu") c.default_us = r.median_us;
  }
  AutotuneCache cache(cpu_chip());
  cache.load();  // a stale or corrupt cache is replaced
  std::vector<TuneChoice> choices;
  for (const auto& [key, c] : best) {
    cache.put({c.op, c.dtype, c.shape_class, c.backend, c.median_us});
    choices.push_back(c);
  }
  cache.save();
  if (cache_path != nullptr) *cache_path = cache.path();
  return choices;
}

std::string gpu_fingerprint() {
  const std::vector<ChipInfo> gpus = gpu_chips();
  return gpus.empty() ? std::string("no gpu") : gpus.front().fingerprint();
}

std::string bench_json(const BenchResult& result) {
  const ChipInfo chip = cpu_chip();
  nlohmann::json records = nlohmann::json::array();
  for (const BenchRecord& r : result.records) {
    records.push_back({{"op", r.op}, {"backend", r.backend}, {"dtype", r.dtype}, {"shape", r.shape}, {"shape_class", r.shape_class},
                       {"median_us", r.median_us}, {"p10_us", r.p10_us}, {"p90_us", r.p90_us}, {"repeats", r.repeats},
                       {"bytes", r.bytes}, {"flops", r.flops}, {"gbps", r.gbps},
                       {"pct_of_read_bandwidth", r.pct_of_read_bandwidth}, {"gflops", r.gflops},
                       {"pct_of_fma_peak", r.pct_of_fma_peak}, {"compute_bound", r.compute_bound}, {"in_cache", r.in_cache},
                       {"speedup_vs_reference", r.speedup_vs_reference}, {"speedup_vs_default", r.speedup_vs_default},
                       {"graph_median_us", r.graph_median_us}, {"graph_pct_of_read_bandwidth", r.graph_pct_of_read_bandwidth},
                       {"device", r.device}, {"machine", r.device == "cuda" ? gpu_fingerprint() : chip.fingerprint()},
                       {"build_id", build_id()}});
  }
  const BandwidthProbe& l = result.limits;
  return nlohmann::json{{"schema", "decodelab.bench/2"},
                        {"build_id", build_id()},
                        {"machine", {{"cpu", chip.name}, {"isa", chip.detail}, {"threads", l.threads}}},
                        {"limits", {{"probe_bytes", l.bytes}, {"read_gbps", l.read_gbps}, {"read_gbps_one_thread", l.read_gbps_one},
                                    {"copy_gbps", l.copy_gbps}, {"copy_gbps_one_thread", l.copy_gbps_one},
                                    {"fma_gflops", l.fma_gflops}}},
                        {"refused", result.refused},
                        {"records", records}}
      .dump(1);
}

}  // namespace decodelab
