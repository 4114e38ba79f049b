#include <gtest/gtest.h>

#include <cstdint>

#include "decodelab/error.h"
#include "decodelab/tensor.h"

namespace decodelab {
namespace {

TEST(Tensor, ContiguousViewHasRowMajorStrides) {
  const Tensor t = Tensor::contiguous(nullptr, DType::f16, {2, 3, 4});
  EXPECT_EQ(t.rank, 3);
  EXPECT_EQ(t.strides[0], 12);
  EXPECT_EQ(t.strides[1], 4);
  EXPECT_EQ(t.strides[2], 1);
  EXPECT_EQ(t.numel(), 24);
  EXPECT_EQ(t.nbytes(), 48u);
  EXPECT_TRUE(t.is_contiguous());
  EXPECT_EQ(t.describe(), "[2, 3, 4] f16");
}

TEST(Tensor, StridedViewIsNotContiguousAndSaysSo) {
  Tensor t = Tensor::contiguous(nullptr, DType::f32, {4, 8});
  t.strides[0] = 16;
  EXPECT_FALSE(t.is_contiguous());
  EXPECT_EQ(t.describe(), "[4, 8] f32 strides [16, 1]");
}

TEST(Tensor, RankAboveFourIsAnError) {
  const int64_t shape[] = {1, 2, 3, 4, 5};
  EXPECT_THROW(Tensor::contiguous(nullptr, DType::f32, shape), Error);
}

TEST(Array, HostMemoryIs64ByteAlignedAndMovable) {
  Array a(DType::f32, {3, 5});
  EXPECT_EQ(reinterpret_cast<uintptr_t>(a.data()) % 64, 0u);
  a.ptr<float>()[14] = 1.5f;
  Array b = std::move(a);
  EXPECT_EQ(a.data(), nullptr);
  EXPECT_EQ(b.ptr<float>()[14], 1.5f);
  const Array c = b.to(Device::cpu);
  EXPECT_NE(c.data(), b.data());
  EXPECT_EQ(c.ptr<float>()[14], 1.5f);
}

TEST(Array, CopyChecksSizes) {
  Array a(DType::f32, {4}), b(DType::f32, {5});
  try {
    copy_bytes(a, b);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(), "copy_bytes: dst: expected 5 elements of f32, got [4] f32");
  }
}

}  // namespace
}  // namespace decodelab
