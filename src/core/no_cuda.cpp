// Built without CUDA: device memory requests fail with a clear error.
#include "core/device_memory.h"
#include "decodelab/error.h"

namespace decodelab::detail {

void* device_alloc(size_t) { fail("Array", "device", "cpu (this build has no CUDA)", "cuda"); }
void device_free(void*) noexcept {}
void device_copy(void*, const void*, size_t, CopyKind) {
  fail("copy_bytes", "device", "cpu (this build has no CUDA)", "cuda");
}
void device_copy_2d(void*, size_t, const void*, size_t, size_t, size_t) {
  fail("copy_bytes", "device", "cpu (this build has no CUDA)", "cuda");
}
bool cuda_compiled() { return false; }
std::vector<GpuDescription> cuda_devices() { return {}; }

}  // namespace decodelab::detail
