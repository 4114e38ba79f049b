#include "decodelab/tensor.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <cstdlib>
#include <cstring>
#include <utility>

#include "core/device_memory.h"
#include "decodelab/error.h"

namespace decodelab {

std::string_view device_name(Device d) { return d == Device::cpu ? "cpu" : "cuda"; }

DType parse_activation_dtype(std::string_view name, std::string_view what) {
  for (DType t : {DType::f32, DType::f16, DType::bf16}) {
    if (dtype_name(t) == name) return t;
  }
  fail(what, "dtype", "one of f32, f16, bf16", name);
}

Tensor Tensor::contiguous(void* data, DType dtype, std::span<const int64_t> shape, Device device) {
  if (shape.size() > size_t(kMaxRank)) {
    fail("Tensor", "shape", fmt::format("rank <= {}", kMaxRank), fmt::format("rank {}", shape.size()));
  }
  Tensor t;
  t.data = data;
  t.dtype = dtype;
  t.device = device;
  t.rank = int(shape.size());
  int64_t stride = 1;
  for (int i = t.rank - 1; i >= 0; --i) {
    if (shape[size_t(i)] < 0) fail("Tensor", "shape", "non-negative sizes", fmt::format("{}", shape));
    t.shape[size_t(i)] = shape[size_t(i)];
    t.strides[size_t(i)] = stride;
    stride *= shape[size_t(i)];
  }
  return t;
}

int64_t Tensor::numel() const {
  int64_t n = 1;
  for (int i = 0; i < rank; ++i) n *= shape[size_t(i)];
  return n;
}

bool Tensor::is_contiguous() const {
  int64_t stride = 1;
  for (int i = rank - 1; i >= 0; --i) {
    if (shape[size_t(i)] != 1 && strides[size_t(i)] != stride) return false;
    stride *= shape[size_t(i)];
  }
  return true;
}

std::string Tensor::describe() const {
  std::string s = fmt::format("[{}] {}", fmt::join(shape.begin(), shape.begin() + rank, ", "),
                              dtype_name(dtype));
  if (!is_contiguous()) {
    s += fmt::format(" strides [{}]", fmt::join(strides.begin(), strides.begin() + rank, ", "));
  }
  if (device != Device::cpu) s += fmt::format(" {}", device_name(device));
  return s;
}

Array::Array(DType dtype, std::span<const int64_t> shape, Device device) {
  view_ = Tensor::contiguous(nullptr, dtype, shape, device);
  const size_t bytes = view_.nbytes();
  if (bytes == 0) return;
  if (device == Device::cuda) {
    view_.data = detail::device_alloc(bytes);
  } else {
    // aligned_alloc wants a size that is a multiple of the alignment.
    view_.data = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (view_.data == nullptr) fail("Array", "size", "an allocatable size", fmt::format("{} bytes", bytes));
  }
}

void Array::release() {
  if (view_.data == nullptr) return;
  if (view_.device == Device::cuda) {
    detail::device_free(view_.data);
  } else {
    std::free(view_.data);
  }
  view_.data = nullptr;
}

Array::~Array() { release(); }

Array::Array(Array&& other) noexcept : view_(std::exchange(other.view_, Tensor{})) {}

Array& Array::operator=(Array&& other) noexcept {
  if (this != &other) {
    release();
    view_ = std::exchange(other.view_, Tensor{});
  }
  return *this;
}

Array Array::to(Device device) const {
  if (view_.data == nullptr) return Array();  // an empty (default) array stays empty
  Array out(view_.dtype, std::span<const int64_t>(view_.shape.data(), size_t(view_.rank)), device);
  copy_bytes(out.view(), view_);
  return out;
}

void zero_bytes(const Tensor& t) {
  if (!t.is_contiguous()) fail("zero_bytes", "t", "a contiguous tensor", t.describe());
  if (t.nbytes() == 0) return;
  if (t.device == Device::cpu) {
    std::memset(t.data, 0, t.nbytes());
  } else {
    detail::device_zero(t.data, t.nbytes());
  }
}

void copy_bytes(const Tensor& dst, const Tensor& src) {
  if (dst.dtype != src.dtype || dst.numel() != src.numel()) {
    fail("copy_bytes", "dst", fmt::format("{} elements of {}", src.numel(), dtype_name(src.dtype)),
         dst.describe());
  }
  if (!dst.is_contiguous() || !src.is_contiguous()) fail("copy_bytes", "both tensors must be contiguous");
  const size_t bytes = src.nbytes();
  if (bytes == 0) return;
  if (dst.device == Device::cpu && src.device == Device::cpu) {
    std::memcpy(dst.data, src.data, bytes);
    return;
  }
  const auto kind = src.device == Device::cpu   ? detail::CopyKind::host_to_device
                    : dst.device == Device::cpu ? detail::CopyKind::device_to_host
                                                : detail::CopyKind::device_to_device;
  detail::device_copy(dst.data, src.data, bytes, kind);
}

}  // namespace decodelab
