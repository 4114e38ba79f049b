// The one error type of decodelab. Messages name the op, the argument, what was expected and
// what was given: "rms_norm: weight: expected shape [4096], got [4095] f16".
#pragma once

#include <stdexcept>
#include <string>
#include <string_view>

namespace decodelab {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Throws Error("<op>: <argument>: expected <expected>, got <actual>").
[[noreturn]] void fail(std::string_view op, std::string_view argument, std::string_view expected,
                       std::string_view actual);

// Throws Error("<op>: <message>") for errors that are not about one argument.
[[noreturn]] void fail(std::string_view op, std::string_view message);

}  // namespace decodelab
