// Launch-error reporting for the CUDA kernels (plain C++: fmt does not build under nvcc).
#include <cuda_runtime.h>
#include <fmt/format.h>

#include "decodelab/error.h"

namespace decodelab::cuda {

void check_launch(cudaError_t status, const char* op) {
  if (status != cudaSuccess) throw Error(fmt::format("{}: CUDA launch failed: {}", op, cudaGetErrorString(status)));
}

}  // namespace decodelab::cuda
