// The harness must catch what it claims to catch: each deliberately broken kernel below fails.
#include <gtest/gtest.h>

#include <cmath>

#include "reference/elements.h"
#include "verify/harness.h"
#include "verify/random.h"

namespace decodelab::verify {
namespace {

using reference::load;
using reference::store;

// out = a + b over 257 f32 elements (in: a, b; out: one poisoned output).
CaseData add_case(uint64_t seed) {
  Rng rng(seed);
  CaseData d;
  d.inputs.push_back(random_array(DType::f32, {257}, rng));
  d.inputs.push_back(random_array(DType::f32, {257}, rng));
  d.outputs.push_back({DType::f32, {257}});
  return d;
}

void add(std::span<const Tensor> in, std::span<const Tensor> out) {
  for (int64_t i = 0; i < out[0].numel(); ++i) store(out[0], i, load(in[0], i) + load(in[1], i));
}

CaseOutcome check(const Launch& backend) {
  return run_case(Device::cpu, add_case(3), backend, add, rounding_tolerance(DType::f32));
}

TEST(Harness, CorrectKernelPasses) {
  const CaseOutcome out = check(add);
  EXPECT_TRUE(out.passed()) << out.summary();
  EXPECT_EQ(out.compared, 257);
}

TEST(Harness, UnwrittenElementFails) {
  const CaseOutcome out = check([](auto in, auto out_) {
    for (int64_t i = 0; i + 1 < out_[0].numel(); ++i) store(out_[0], i, load(in[0], i) + load(in[1], i));
  });
  EXPECT_FALSE(out.passed());
  EXPECT_EQ(out.unwritten, 1);
  EXPECT_EQ(out.non_finite, 1);
}

TEST(Harness, WriteBeyondTheOutputFails) {
  const CaseOutcome out = check([](auto in, auto out_) {
    add(in, out_);
    out_[0].template ptr<float>()[out_[0].numel()] = 0.0f;
  });
  EXPECT_FALSE(out.passed());
  EXPECT_FALSE(out.guards_intact);
}

TEST(Harness, SmallErrorFailsTheF32Threshold) {
  const CaseOutcome out = check([](auto in, auto out_) {
    for (int64_t i = 0; i < out_[0].numel(); ++i) store(out_[0], i, (load(in[0], i) + load(in[1], i)) * 1.0001);
  });
  EXPECT_FALSE(out.passed());
  EXPECT_GT(out.nmse, 1e-9);
}

TEST(Harness, NonDeterministicKernelFails) {
  int calls = 0;
  const CaseOutcome out = check([&calls](auto in, auto out_) {
    add(in, out_);
    if (++calls == 2) out_[0].template ptr<float>()[5] = std::nextafter(out_[0].template ptr<float>()[5], 0.0f);
  });
  EXPECT_FALSE(out.passed());
  EXPECT_EQ(out.nondeterministic, 1);
}

TEST(Harness, KernelThatThrowsFailsWithItsMessage) {
  const CaseOutcome out = check([](auto, auto) { throw Error("kernel: boom"); });
  EXPECT_FALSE(out.passed());
  EXPECT_EQ(out.error, "kernel: boom");
}

TEST(Harness, CaseWithMostlyZeroReferenceIsRefused) {
  CaseData d = add_case(4);
  fill_value(d.inputs[0], 0.0);
  fill_value(d.inputs[1], 0.0);
  const CaseOutcome out = run_case(Device::cpu, d, add, add, rounding_tolerance(DType::f32));
  EXPECT_FALSE(out.passed());
  EXPECT_NE(out.error.find("mostly zeros"), std::string::npos);
}

TEST(Harness, WriteWhereTheReferenceWritesNothingFails) {
  // An in/out output whose second half is NaN and left alone by the reference.
  CaseData d = add_case(5);
  Array state(DType::f32, {257});
  for (int64_t i = 0; i < 257; ++i) store(state, i, i < 128 ? 1.0 + i : std::nan(""));
  d.inputs.push_back(std::move(state));
  d.outputs = {{DType::f32, {257}, 2}};
  const Launch first_half = [](auto in, auto out_) {
    for (int64_t i = 0; i < 128; ++i) store(out_[0], i, load(in[0], i));
  };
  EXPECT_TRUE(run_case(Device::cpu, d, first_half, first_half, rounding_tolerance(DType::f32)).passed());
  const Launch too_far = [](auto in, auto out_) {
    for (int64_t i = 0; i < 129; ++i) store(out_[0], i, load(in[0], i));
  };
  const CaseOutcome out = run_case(Device::cpu, d, too_far, first_half, rounding_tolerance(DType::f32));
  EXPECT_FALSE(out.passed());
  EXPECT_EQ(out.stray, 1);
}

TEST(Harness, ExactCasesCountDifferingBits) {
  CaseData d;
  Array bytes(DType::u8, {64});
  for (int i = 0; i < 64; ++i) bytes.ptr<uint8_t>()[i] = uint8_t(i * 7 + 1);
  d.inputs.push_back(std::move(bytes));
  d.outputs.push_back({DType::u8, {64}});
  const Launch copy = [](auto in, auto out_) { copy_bytes(out_[0], in[0]); };
  const Launch flip = [](auto in, auto out_) {
    copy_bytes(out_[0], in[0]);
    out_[0].template ptr<uint8_t>()[9] ^= 1;
  };
  const Tolerance exact{0.0, "bit-exact", true};
  EXPECT_TRUE(run_case(Device::cpu, d, copy, copy, exact).passed());
  const CaseOutcome out = run_case(Device::cpu, d, flip, copy, exact);
  EXPECT_FALSE(out.passed());
  EXPECT_EQ(out.mismatches, 1);
}

}  // namespace
}  // namespace decodelab::verify
