#include "core/check.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <vector>

namespace decodelab::detail {

void ArgCheck::fail(std::string_view name, std::string_view expected, std::string_view actual) const {
  decodelab::fail(op_, name, expected, actual);
}

void ArgCheck::shape(const Tensor& t, std::string_view name, std::initializer_list<int64_t> dims,
                     std::string_view layout) const {
  bool ok = t.rank == int(dims.size());
  int i = 0;
  for (int64_t d : dims) {
    if (ok && d != kAny && t.shape[size_t(i)] != d) ok = false;
    ++i;
  }
  if (ok) return;
  std::vector<std::string> want;
  for (int64_t d : dims) want.push_back(d == kAny ? "*" : std::to_string(d));
  fail(name, fmt::format("shape [{}] {}", fmt::join(want, ", "), layout), t.describe());
}

void ArgCheck::rows_of(const Tensor& t, std::string_view name, int min_rank, int64_t last,
                       std::string_view layout) const {
  if (t.rank < min_rank || t.rank > kMaxRank || (last != kAny && t.shape[size_t(t.rank - 1)] != last)) {
    fail(name, fmt::format("rank {}..{} {} with last dimension {}", min_rank, kMaxRank, layout,
                           last == kAny ? std::string("any") : std::to_string(last)),
         t.describe());
  }
}

void ArgCheck::same_shape(const Tensor& t, std::string_view name, const Tensor& like,
                          std::string_view like_name) const {
  bool ok = t.rank == like.rank;
  for (int i = 0; ok && i < t.rank; ++i) ok = t.shape[size_t(i)] == like.shape[size_t(i)];
  if (!ok) {
    fail(name, fmt::format("the shape of {} {}", like_name, like.describe()), t.describe());
  }
}

void ArgCheck::activation(const Tensor& t, std::string_view name) const {
  if (!is_float_activation(t.dtype)) fail(name, "dtype f32, f16 or bf16", t.describe());
}

void ArgCheck::dtype(const Tensor& t, std::string_view name, DType expected) const {
  if (t.dtype != expected) fail(name, fmt::format("dtype {}", dtype_name(expected)), t.describe());
}

void ArgCheck::same_dtype(const Tensor& t, std::string_view name, DType expected,
                          std::string_view why) const {
  if (t.dtype != expected) {
    fail(name, fmt::format("dtype {} ({})", dtype_name(expected), why), t.describe());
  }
}

void ArgCheck::contiguous(const Tensor& t, std::string_view name) const {
  if (!t.is_contiguous()) fail(name, "a contiguous row-major tensor", t.describe());
}

void ArgCheck::device(const Tensor& t, std::string_view name, Device expected) const {
  if (t.device != expected) {
    fail(name, fmt::format("a tensor on {} like the other arguments", device_name(expected)),
         t.describe());
  }
}

void ArgCheck::non_null(const Tensor& t, std::string_view name) const {
  if (t.data == nullptr && t.numel() > 0) fail(name, "a tensor with data", "a null data pointer");
}

void ArgCheck::usable(const Tensor& t, std::string_view name, Device device) const {
  non_null(t, name);
  contiguous(t, name);
  this->device(t, name, device);
}

void ArgCheck::head_dim(int64_t d, std::string_view name) const {
  if (d < 16 || d > 256 || d % 16 != 0) {
    fail(name, "head_dim D a multiple of 16 in [16, 256]", fmt::format("D = {}", d));
  }
}

void ArgCheck::gqa(int64_t hq, int64_t hkv) const {
  if (hkv <= 0 || hq <= 0 || hq % hkv != 0) {
    fail("heads", "Hq a positive multiple of Hkv (GQA/MQA group)", fmt::format("Hq = {}, Hkv = {}", hq, hkv));
  }
}

}  // namespace decodelab::detail
