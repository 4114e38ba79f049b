// The message of the decodelab::Error a call throws, for tests that check what errors say.
#pragma once

#include <functional>
#include <string>

#include "decodelab/error.h"

namespace decodelab {

// Runs `call` and returns the message of the decodelab::Error it throws ("" if none).
inline std::string error_of(const std::function<void()>& call) {
  try {
    call();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace decodelab

// The error `call` throws says exactly `text`.
#define EXPECT_ERROR(call, text) EXPECT_EQ(::decodelab::error_of([&] { call; }), text)
