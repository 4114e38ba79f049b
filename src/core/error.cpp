#include "decodelab/error.h"

#include <fmt/format.h>

namespace decodelab {

void fail(std::string_view op, std::string_view argument, std::string_view expected,
          std::string_view actual) {
  throw Error(fmt::format("{}: {}: expected {}, got {}", op, argument, expected, actual));
}

void fail(std::string_view op, std::string_view message) {
  throw Error(fmt::format("{}: {}", op, message));
}

}  // namespace decodelab
