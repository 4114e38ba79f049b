// Every CUDA kernel against the reference through the shared harness, on the GPU. Without a GPU
// each case skips and says so: a CUDA case never passes without having run.
#include <gtest/gtest.h>

#include "decodelab/router.h"
#include "decodelab/verify.h"

namespace decodelab {

void PrintTo(const VerifyCase& c, std::ostream* os) { *os << c.op << " " << c.backend << " " << c.dtype << " " << c.shape; }

namespace {

std::vector<VerifyCase> cuda_grid() {
  std::vector<VerifyCase> grid = verification_grid();
  std::erase_if(grid, [](const VerifyCase& c) { return c.device != Device::cuda; });
  return grid;
}

class CudaGrid : public ::testing::TestWithParam<VerifyCase> {};

TEST_P(CudaGrid, MatchesReference) {
  if (gpu_chips().empty()) GTEST_SKIP() << "no CUDA GPU visible: this CUDA case did not run";
  const VerifyCase& c = GetParam();
  const CaseOutcome out = c.run(0xC0DA);
  if (out.skipped()) GTEST_SKIP() << c.backend << " declines " << c.shape << ": " << out.refused;
  EXPECT_TRUE(out.passed()) << c.op << " " << c.backend << " " << c.dtype << " " << c.shape << ": " << out.summary();
}

std::string case_name(const ::testing::TestParamInfo<VerifyCase>& info) {
  std::string name = info.param.op + "_" + info.param.backend + "_" + info.param.dtype + "_" + std::to_string(info.index);
  for (char& ch : name) {
    if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
  }
  return name;
}

INSTANTIATE_TEST_SUITE_P(All, CudaGrid, ::testing::ValuesIn(cuda_grid()), case_name);

}  // namespace
}  // namespace decodelab
