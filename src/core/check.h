// Argument checks shared by every op's validation. Each throws decodelab::Error with
// "<op>: <argument>: expected <...>, got <...>".
#pragma once

#include <cstdint>
#include <initializer_list>
#include <string>
#include <string_view>

#include "decodelab/error.h"
#include "decodelab/tensor.h"

namespace decodelab::detail {

inline constexpr int64_t kAny = -1;

class ArgCheck {
 public:
  explicit ArgCheck(std::string_view op) : op_(op) {}
  std::string_view op() const { return op_; }

  // Rank and sizes; kAny matches any size. `layout` names the axes, e.g. "[B, S, Hq, D]".
  void shape(const Tensor& t, std::string_view name, std::initializer_list<int64_t> dims,
             std::string_view layout) const;
  // Rank at least `min_rank` and the last dimension equal to `last` (kAny for any).
  void rows_of(const Tensor& t, std::string_view name, int min_rank, int64_t last,
               std::string_view layout) const;
  void same_shape(const Tensor& t, std::string_view name, const Tensor& like,
                  std::string_view like_name) const;
  void activation(const Tensor& t, std::string_view name) const;  // f32, f16 or bf16
  void dtype(const Tensor& t, std::string_view name, DType expected) const;
  void same_dtype(const Tensor& t, std::string_view name, DType expected,
                  std::string_view why) const;
  void contiguous(const Tensor& t, std::string_view name) const;
  void device(const Tensor& t, std::string_view name, Device expected) const;
  void non_null(const Tensor& t, std::string_view name) const;
  // Everything a plain input or output needs: data, contiguous, on `device`.
  void usable(const Tensor& t, std::string_view name, Device device) const;
  void head_dim(int64_t d, std::string_view name) const;  // multiple of 16, 16..256
  void gqa(int64_t hq, int64_t hkv) const;                // Hq a multiple of Hkv
  [[noreturn]] void fail(std::string_view name, std::string_view expected,
                         std::string_view actual) const;

 private:
  std::string_view op_;
};

}  // namespace decodelab::detail
