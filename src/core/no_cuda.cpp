// Built without CUDA: device memory requests fail with a clear error.
#include "core/device_memory.h"
#include "decodelab/error.h"

namespace decodelab::detail {

void* device_alloc(size_t) { fail("Array", "device", "cpu (this build has no CUDA)", "cuda"); }
void device_free(void*) noexcept {}
void device_copy(void*, const void*, size_t, CopyKind) {
  fail("copy_bytes", "device", "cpu (this build has no CUDA)", "cuda");
}
void device_copy_2d(void*, size_t, const void*, size_t, size_t, size_t, void*) {
  fail("copy_bytes", "device", "cpu (this build has no CUDA)", "cuda");
}
void device_add_i32(int32_t*, const int32_t*, int64_t, int32_t, void*) {
  fail("device_add_i32", "device", "cpu (this build has no CUDA)", "cuda");
}
void* device_scratch_alloc(size_t, void*) { fail("scratch", "device", "cpu (this build has no CUDA)", "cuda"); }
void device_scratch_free(void*, void*) noexcept {}
void device_zero(void*, size_t) { fail("zero_bytes", "device", "cpu (this build has no CUDA)", "cuda"); }
DeviceGraph::~DeviceGraph() = default;
void DeviceGraph::capture(const std::function<void()>&) { fail("DeviceGraph::capture", "device", "cpu (this build has no CUDA)", "cuda"); }
void DeviceGraph::launch() const { fail("DeviceGraph::launch", "device", "cpu (this build has no CUDA)", "cuda"); }
bool cuda_compiled() { return false; }
std::vector<GpuDescription> cuda_devices() { return {}; }

}  // namespace decodelab::detail
