// The paged record-cache ops with TurboQuant values (TurboQuant, RaBitQ and QJL keys) through
// their public API on the GPU: the ops layer takes pools on the call's device, and a run of
// appends followed by decode attention gives the cpu backend's codes byte for byte and its
// outputs to f32 rounding. The kernels themselves are checked against the reference case by case
// in test_cuda_grid.cpp. Skips, saying so, where no GPU is present (the device-mismatch test needs
// none: it is refused before anything is read).
#include <gtest/gtest.h>

#include <cstring>
#include <numeric>

#include "decodelab/qjl_cache.h"
#include "decodelab/rabitq_cache.h"
#include "decodelab/router.h"
#include "decodelab/turboquant_cache.h"
#include "error_of.h"
#include "verify/random.h"

namespace decodelab {
namespace {

using kvquant::RotationKind;
using kvquant::ScaleMode;
using kvquant::TurboQuantMse;

TEST(CudaTurboQuant, RefusesPoolsOnAnotherDevice) {
  const TurboQuantMse codec({64, 2, RotationKind::hadamard, 1, ScaleMode::plain});
  // Views only: the op refuses them before reading any data, so no GPU is needed.
  float q_data[64] = {};
  uint8_t pool_data[20] = {};
  int32_t table_data[1] = {0}, length_data[1] = {1};
  const Tensor q = Tensor::contiguous(q_data, DType::f32, {1, 1, 64}, Device::cuda);
  const Tensor pool = Tensor::contiguous(pool_data, DType::u8, {1, 1, 1, 20});
  const PagedTurboQuantKV cache{pool, pool, Tensor::contiguous(table_data, DType::i32, {1, 1}),
                                Tensor::contiguous(length_data, DType::i32, {1}), &codec, &codec};
  EXPECT_ERROR(turboquant_decode_attention_paged(q, cache, q),
               "turboquant_decode_attention_paged: cache.k_pages: expected a tensor on cuda like the other arguments, "
               "got [1, 1, 1, 20] u8");
}

class CudaRecordCacheOps : public ::testing::Test {
 protected:
  void SetUp() override {
    if (gpu_chips().empty()) GTEST_SKIP() << "no CUDA GPU visible: CUDA tests did not run";
  }
};

template <class Cache>
using AppendFn = void (*)(const Tensor&, const Tensor&, const Cache&, const RunOptions&);
template <class Cache>
using AttendFn = void (*)(const Tensor&, const Cache&, const Tensor&, const AttentionOptions&, const RunOptions&);

// B = 2 sequences, Hkv = 2, G = 4, D = 128, pages of 16: 37 appends one token at a time (a page
// boundary crossed twice) on the cpu and cuda backends, the pools compared byte for byte, then one
// decode step on each, the outputs compared.
template <class Cache, class KeyCodec>
void expect_appends_then_attends_as_cpu(const KeyCodec& k_codec, const TurboQuantMse& v_codec, AppendFn<Cache> append,
                                        AttendFn<Cache> attend) {
  constexpr int64_t kBatch = 2, kHkv = 2, kHq = 8, kD = 128, kPage = 16, kSteps = 37;
  constexpr int64_t kMaxPages = (kSteps + kPage - 1) / kPage, kPages = kBatch * kMaxPages + 1;
  Array k_host(DType::u8, {kPages, kPage, kHkv, k_codec.record_bytes()});
  Array v_host(DType::u8, {kPages, kPage, kHkv, v_codec.record_bytes()});
  std::memset(k_host.data(), 0xFF, k_host.nbytes());
  std::memset(v_host.data(), 0xFF, v_host.nbytes());
  std::vector<int32_t> order(static_cast<size_t>(kBatch * kMaxPages));
  std::iota(order.rbegin(), order.rend(), 1);  // pages in reverse, page 0 owned by no one
  Array table_host = verify::i32_array({kBatch, kMaxPages}, order);
  Array k_dev = k_host.to(Device::cuda), v_dev = v_host.to(Device::cuda), table_dev = table_host.to(Device::cuda);
  const auto host_cache = [&](const Array& lengths) {
    return Cache{k_host.view(), v_host.view(), table_host.view(), lengths.view(), &k_codec, &v_codec};
  };
  const auto device_cache = [&](const Array& lengths) {
    return Cache{k_dev.view(), v_dev.view(), table_dev.view(), lengths.view(), &k_codec, &v_codec};
  };

  RunOptions cpu_run, cuda_run;
  cpu_run.backend = "cpu";
  cuda_run.backend = "cuda";
  verify::Rng rng(7);
  for (int32_t step = 0; step < kSteps; ++step) {
    Array lengths_host = verify::i32_array({kBatch}, {step, step});
    Array lengths_dev = lengths_host.to(Device::cuda);
    Array k_new = verify::random_array(DType::f16, {kBatch, kHkv, kD}, rng);
    Array v_new = verify::random_array(DType::f16, {kBatch, kHkv, kD}, rng);
    Array k_new_dev = k_new.to(Device::cuda), v_new_dev = v_new.to(Device::cuda);
    append(k_new.view(), v_new.view(), host_cache(lengths_host), cpu_run);
    append(k_new_dev.view(), v_new_dev.view(), device_cache(lengths_dev), cuda_run);
  }
  for (const auto& [host, dev] : {std::pair{&k_host, &k_dev}, std::pair{&v_host, &v_dev}}) {
    const Array back = dev->to(Device::cpu);
    ASSERT_EQ(std::memcmp(back.data(), host->data(), host->nbytes()), 0) << "codes differ from the cpu backend's";
  }

  Array lengths_host = verify::i32_array({kBatch}, {int32_t(kSteps), int32_t(kSteps - 5)});
  Array lengths_dev = lengths_host.to(Device::cuda);
  Array q = verify::random_array(DType::f32, {kBatch, kHq, kD}, rng);
  Array q_dev = q.to(Device::cuda);
  Array out_host(DType::f32, {kBatch, kHq, kD});
  Array out_dev(DType::f32, {kBatch, kHq, kD}, Device::cuda);
  attend(q.view(), host_cache(lengths_host), out_host.view(), {}, cpu_run);
  attend(q_dev.view(), device_cache(lengths_dev), out_dev.view(), {}, cuda_run);
  const Array back = out_dev.to(Device::cpu);
  double err = 0.0, energy = 0.0;
  for (int64_t i = 0; i < back.numel(); ++i) {
    const double r = out_host.ptr<float>()[i], v = back.ptr<float>()[i];
    ASSERT_TRUE(std::isfinite(v)) << "element " << i;
    err += (v - r) * (v - r);
    energy += r * r;
  }
  EXPECT_LT(err / energy, 1e-10) << "NMSE against the cpu backend";
}

// K 4-bit norm-corrected, V 3-bit plain.
TEST_F(CudaRecordCacheOps, TurboQuantAppendsThenAttendsAsTheCpuBackend) {
  const TurboQuantMse k_codec({128, 4, RotationKind::hadamard, 3, ScaleMode::norm_corrected});
  const TurboQuantMse v_codec({128, 3, RotationKind::hadamard, 4, ScaleMode::plain});
  expect_appends_then_attends_as_cpu<PagedTurboQuantKV>(k_codec, v_codec, &turboquant_append_paged,
                                                        &turboquant_decode_attention_paged);
}

// Split widths: K 3.5-bit unbiased, V 2.5-bit norm-corrected.
TEST_F(CudaRecordCacheOps, TurboQuantSplitWidthsAppendThenAttendAsTheCpuBackend) {
  const TurboQuantMse k_codec({128, 3, RotationKind::hadamard, 5, ScaleMode::unbiased, 64});
  const TurboQuantMse v_codec({128, 2, RotationKind::dense, 6, ScaleMode::norm_corrected, 64});
  expect_appends_then_attends_as_cpu<PagedTurboQuantKV>(k_codec, v_codec, &turboquant_append_paged,
                                                        &turboquant_decode_attention_paged);
}

// K QJL with m = 256, V 2-bit norm-corrected with the dense rotation.
TEST_F(CudaRecordCacheOps, QjlAppendsThenAttendsAsTheCpuBackend) {
  const kvquant::QjlKeys k_codec({128, 256, 5});
  const TurboQuantMse v_codec({128, 2, RotationKind::dense, 6, ScaleMode::norm_corrected});
  expect_appends_then_attends_as_cpu<PagedQjlKV>(k_codec, v_codec, &qjl_append_paged, &qjl_decode_attention_paged);
}

// K extended RaBitQ at 3 bits around a centroid, V 3-bit norm-corrected.
TEST_F(CudaRecordCacheOps, RabitqAppendsThenAttendsAsTheCpuBackend) {
  kvquant::RabitqConfig k_config{128, 3, 4, RotationKind::hadamard, 8, {}};
  for (int j = 0; j < 128; ++j) k_config.centroid.push_back(0.01f * float(j % 7));
  const kvquant::RabitqKeys k_codec(k_config);
  const TurboQuantMse v_codec({128, 3, RotationKind::hadamard, 9, ScaleMode::norm_corrected});
  expect_appends_then_attends_as_cpu<PagedRabitqKV>(k_codec, v_codec, &rabitq_append_paged,
                                                    &rabitq_decode_attention_paged);
}

}  // namespace
}  // namespace decodelab
