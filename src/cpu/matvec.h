// CPU matvec family: dense (f32/f16/bf16) and quantized (MLX affine, GGUF Q4_0/Q8_0) weights.
#pragma once

#include "ops/args.h"

namespace decodelab::cpu {}  // namespace decodelab::cpu
