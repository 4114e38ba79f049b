// Backend selection by name, refusals that say why, and the trust store's handling of corrupt,
// foreign and stale files.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <set>

#include "decodelab/error.h"
#include "decodelab/router.h"
#include "error_of.h"
#include "router/registry.h"

namespace decodelab {
namespace {

TEST(Router, EveryOpHasAReferenceKernel) {
  std::set<std::string> ops;
  for (const BackendInfo& b : list_backends()) {
    if (b.backend == "reference") {
      EXPECT_EQ(b.status, Status::stable);
      ops.insert(b.op);
    }
  }
  EXPECT_EQ(ops.size(), 30u);  // the ops of src/router/ops.inc
}

// The stable default on the CPU: the first stable non-reference CPU kernel, the reference last.
template <class Args>
std::string_view expected_auto() {
  for (const auto& k : kernels<Args>()) {
    if (k.device == Device::cpu && k.status == Status::stable && k.backend != "reference") return k.backend;
  }
  return "reference";
}

TEST(Router, AutoPicksTheStableCpuKernelAndRefusesUnknownNames) {
  RmsNormArgs args;
  EXPECT_EQ(select_kernel(args, "auto", Device::cpu).backend, expected_auto<RmsNormArgs>());
  EXPECT_EQ(select_kernel(args, "reference", Device::cpu).backend, "reference");
  std::string names;
  for (const auto& k : kernels<RmsNormArgs>()) names += (names.empty() ? "" : ", ") + std::string(k.backend);
  EXPECT_TRUE(names.starts_with("reference, cpu")) << names;
  try {
    select_kernel(args, "cuda.splitk", Device::cpu);
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()), "rms_norm: backend: expected auto or one of: " + names + ", got cuda.splitk");
  }
}

// Per-op choices: the op they name takes its backend from them, every other op from `backend`, and
// names that no kernel list has are refused before anything runs.
TEST(Router, PerOpBackendsOverrideTheDefault) {
  const OpBackend choices[] = {{"rms_norm", "reference"}, {"matvec", "auto"}};
  RunOptions run{"cpu"};
  run.per_op = choices;
  EXPECT_EQ(backend_for(run, "rms_norm"), "reference");
  EXPECT_EQ(backend_for(run, "swiglu"), "cpu");
  EXPECT_EQ(error_of([&] { check_op_backends(choices); }), "");
  const OpBackend bad_op[] = {{"rms_nrom", "cpu"}};
  EXPECT_ERROR(check_op_backends(bad_op),
               "check_op_backends: per_op[0].op: expected a registered op (decodelab info lists them), got rms_nrom");
  const OpBackend bad_backend[] = {{"swiglu", "cpu"}, {"rms_norm", "cpu.nonexistent"}};
  const std::string message = error_of([&] { check_op_backends(bad_backend); });
  EXPECT_TRUE(message.starts_with("check_op_backends: per_op[1].backend (for rms_norm): expected auto, reference, cpu"))
      << message;
  EXPECT_TRUE(message.ends_with(", got cpu.nonexistent")) << message;
  const OpBackend twice[] = {{"rms_norm", "cpu"}, {"rms_norm", "reference"}};
  EXPECT_ERROR(check_op_backends(twice),
               "check_op_backends: per_op[1].op: expected one choice per op (rms_norm is per_op[0]), got rms_norm");
}

// A kernel that refuses a call is skipped by auto, and named explicitly it explains why.
TEST(Router, RefusalsNameTheReason) {
  static const Kernel<SwigluArgs> picky{"cpu.picky", Status::experimental, Device::cpu, [](const SwigluArgs&) {},
                                       [](const SwigluArgs&) { return std::string("needs D = 128"); }};
  EXPECT_EQ(picky.refusal(SwigluArgs{}), "needs D = 128");
  EXPECT_EQ(Kernel<SwigluArgs>{}.refusal(SwigluArgs{}), "");
}

class TrustStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() / ("decodelab-trust-" + std::to_string(::getpid()));
    std::filesystem::remove_all(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::filesystem::path dir_;
  ChipInfo chip_{Device::cpu, "Test CPU", "avx2 fma"};
};

TEST_F(TrustStoreTest, SavesAndLoadsRecords) {
  TrustStore store(chip_, dir_.string());
  EXPECT_TRUE(store.load());  // no file yet: empty, no warning
  store.put({"rms_norm", "reference", "f16", 4, 4, 1e-8});
  store.put({"rms_norm", "reference", "f16", 5, 4, 2e-8});  // replaces
  store.save();
  TrustStore again(chip_, dir_.string());
  ASSERT_TRUE(again.load()) << again.warning();
  ASSERT_EQ(again.records().size(), 1u);
  const TrustRecord* r = again.find("rms_norm", "reference", "f16");
  ASSERT_NE(r, nullptr);
  EXPECT_EQ(r->cases, 5);
  EXPECT_FALSE(r->trusted());
}

TEST_F(TrustStoreTest, CorruptFileIsReportedAndIgnored) {
  TrustStore store(chip_, dir_.string());
  store.put({"swiglu", "reference", "f32", 3, 3, 0.0});
  store.save();
  std::ofstream(store.path()) << "{\"schema\": 1, \"chip\": ";
  TrustStore again(chip_, dir_.string());
  EXPECT_FALSE(again.load());
  EXPECT_NE(again.warning().find("corrupt trust file"), std::string::npos) << again.warning();
  EXPECT_TRUE(again.records().empty());
}

TEST_F(TrustStoreTest, ForeignChipAndOtherBuildAreIgnored) {
  TrustStore store(chip_, dir_.string());
  store.put({"swiglu", "reference", "f32", 3, 3, 0.0});
  store.save();
  std::string text;
  {
    std::ifstream in(store.path());
    text.assign(std::istreambuf_iterator<char>(in), {});
  }
  auto rewrite = [&](const std::string& from, const std::string& to) {
    std::string t = text;
    t.replace(t.find(from), from.size(), to);
    std::ofstream(store.path()) << t;
  };
  rewrite("Test CPU", "Other CPU");
  TrustStore foreign(chip_, dir_.string());
  EXPECT_FALSE(foreign.load());
  EXPECT_NE(foreign.warning().find("another chip"), std::string::npos) << foreign.warning();
  rewrite(std::string(build_id()), "0123abcd");
  TrustStore stale(chip_, dir_.string());
  EXPECT_FALSE(stale.load());
  EXPECT_NE(stale.warning().find("written by build 0123abcd"), std::string::npos) << stale.warning();
}

}  // namespace
}  // namespace decodelab
