// Device memory in Array, copies in every direction, the GPU fingerprint, and the verification
// harness's device path (outputs staged to the GPU with their guards). Skips, saying so, where no
// GPU is present.
#include <gtest/gtest.h>

#include "decodelab/router.h"
#include "reference/elements.h"
#include "verify/harness.h"
#include "verify/random.h"

namespace decodelab {
namespace {

class Cuda : public ::testing::Test {
 protected:
  void SetUp() override {
    if (gpu_chips().empty()) GTEST_SKIP() << "no CUDA GPU visible: CUDA tests did not run";
  }
};

TEST_F(Cuda, ArrayRoundTripsThroughDeviceMemory) {
  verify::Rng rng(1);
  Array host = verify::random_array(DType::f16, {3, 1000}, rng);
  Array device = host.to(Device::cuda);
  EXPECT_EQ(device.view().device, Device::cuda);
  Array device2 = device.to(Device::cuda);
  Array back = device2.to(Device::cpu);
  for (int64_t i = 0; i < host.numel(); ++i) ASSERT_EQ(back.ptr<uint16_t>()[i], host.ptr<uint16_t>()[i]);
}

TEST_F(Cuda, FingerprintNamesTheGpu) {
  const ChipInfo gpu = gpu_chips().front();
  EXPECT_FALSE(gpu.name.empty());
  EXPECT_NE(gpu.detail.find("sm_"), std::string::npos);
}

// A "kernel" that copies its input on the device, through the harness's device path.
TEST_F(Cuda, HarnessStagesOutputsOnTheDeviceAndChecksTheirGuards) {
  verify::Rng rng(2);
  verify::CaseData d;
  d.inputs.push_back(verify::random_array(DType::f32, {300}, rng));
  d.outputs.push_back({DType::f32, {300}});
  // The oracle writes f64 outputs: convert element by element.
  const verify::Launch host_copy = [](auto in, auto out) {
    for (int64_t i = 0; i < out[0].numel(); ++i) reference::store(out[0], i, reference::load(in[0], i));
  };
  const verify::Launch device_copy = [](auto in, auto out) {
    ASSERT_EQ(out[0].device, Device::cuda);
    copy_bytes(out[0], in[0]);
  };
  const verify::Tolerance tol = verify::rounding_tolerance(DType::f32);
  EXPECT_TRUE(verify::run_case(Device::cuda, d, device_copy, host_copy, tol).passed());
  // Writes one element past the output: into the guard, which lies inside the staged allocation.
  const verify::Launch overrun = [](auto in, auto out) {
    copy_bytes(out[0], in[0]);
    float one = 1.0f;
    copy_bytes(Tensor::contiguous(out[0].template ptr<float>() + out[0].numel(), DType::f32, {1}, Device::cuda),
               Tensor::contiguous(&one, DType::f32, {1}));
  };
  const CaseOutcome bad = verify::run_case(Device::cuda, d, overrun, host_copy, tol);
  EXPECT_FALSE(bad.passed());
  EXPECT_FALSE(bad.guards_intact);
}

}  // namespace
}  // namespace decodelab
