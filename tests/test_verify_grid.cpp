// The one parameterized harness: every (op, backend, dtype, shape) case of every registered
// kernel, on fresh seeded inputs. A backend that registers a kernel is tested here without a line
// of test code.
#include <gtest/gtest.h>

#include <iostream>
#include <set>

#include "hwy/targets.h"

#include "decodelab/verify.h"
#include "router/registry.h"

namespace decodelab {
namespace {

std::vector<VerifyCase> cpu_grid() {
  std::vector<VerifyCase> grid = verification_grid();
  std::erase_if(grid, [](const VerifyCase& c) { return c.device != Device::cpu; });
  return grid;
}

}  // namespace

// Test logs name the case instead of dumping its bytes.
void PrintTo(const VerifyCase& c, std::ostream* os) { *os << c.op << " " << c.backend << " " << c.dtype << " " << c.shape; }

namespace {

class VerifyGrid : public ::testing::TestWithParam<VerifyCase> {};

TEST_P(VerifyGrid, MatchesReference) {
  const VerifyCase& c = GetParam();
  // Seeds differ per case and per run of the suite only through the case's position.
  const CaseOutcome out = c.run(0x5EED0000u + std::hash<std::string>{}(c.op + c.backend + c.dtype + c.shape) % 1000);
  if (out.skipped()) GTEST_SKIP() << c.backend << " declines " << c.shape << ": " << out.refused;
  EXPECT_TRUE(out.passed()) << c.op << " " << c.backend << " " << c.dtype << " " << c.shape << ": " << out.summary()
                            << " (" << c.why << ")";
}

std::string case_name(const ::testing::TestParamInfo<VerifyCase>& info) {
  std::string name = info.param.op + "_" + info.param.backend + "_" + info.param.dtype + "_" + std::to_string(info.index);
  for (char& ch : name) {
    if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
  }
  return name;
}

INSTANTIATE_TEST_SUITE_P(All, VerifyGrid, ::testing::ValuesIn(cpu_grid()), case_name);

// A suite that runs no case proves nothing: every op must have cases for every CPU backend.
TEST(VerifyGridCoverage, EveryRegisteredCpuKernelHasCases) {
  std::set<std::pair<std::string, std::string>> covered;
  for (const VerifyCase& c : cpu_grid()) covered.insert({c.op, c.backend});
  int kernels = 0;
  for (const BackendInfo& b : list_backends()) {
    if (b.device != Device::cpu) continue;
    ++kernels;
    EXPECT_TRUE(covered.count({b.op, b.backend})) << b.op << " / " << b.backend << " has no verification case";
  }
  EXPECT_GE(kernels, 21);
}

// Highway compiles every CPU kernel for several SIMD targets and runs the best one; the others
// (AVX2 on an AVX-512 machine, SSE4, ...) must be right too, so every CPU case runs once per
// compiled target that this machine can execute.
TEST(VerifyGridTargets, EveryCompiledSimdTargetPassesTheCpuCases) {
  std::vector<VerifyCase> grid = verification_grid(GridFilter{"", "cpu", true});
  std::erase_if(grid, [](const VerifyCase& c) { return c.device != Device::cpu; });
  ASSERT_FALSE(grid.empty());
  const std::vector<int64_t> targets = hwy::SupportedAndGeneratedTargets();
  int ran = 0;
  for (int64_t target : targets) {
    hwy::SetSupportedTargetsForTest(target);
    for (const VerifyCase& c : grid) {
      const CaseOutcome out = c.run(0xAB5E);
      if (out.skipped()) continue;
      EXPECT_TRUE(out.passed()) << hwy::TargetName(target) << ": " << c.op << " " << c.backend << " " << c.dtype << " "
                                << c.shape << ": " << out.summary();
      ++ran;
    }
  }
  hwy::SetSupportedTargetsForTest(0);
  EXPECT_GT(ran, 0);
  std::cout << "ran " << grid.size() << " CPU cases on each of " << targets.size() << " SIMD targets\n";
}

}  // namespace
}  // namespace decodelab
