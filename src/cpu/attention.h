// CPU attention: prefill, decode over contiguous and paged caches.
#pragma once

#include "ops/args.h"

namespace decodelab::cpu {}  // namespace decodelab::cpu
