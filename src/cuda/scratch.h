// Stream-ordered scratch memory for one call of a CUDA kernel (split-K partials, an MLP's
// activation), from a pool that keeps freed memory for reuse, so that it costs little per call and
// can be captured in a CUDA graph. Plain C++ (implemented in common.cpp).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

namespace decodelab::cuda {

cudaError_t scratch_alloc(void** ptr, size_t bytes, cudaStream_t stream);
cudaError_t scratch_free(void* ptr, cudaStream_t stream);

}  // namespace decodelab::cuda
