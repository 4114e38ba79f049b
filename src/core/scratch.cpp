// ScratchBuffer: one allocation for a call's intermediates (see core/device_memory.h).
#include <fmt/format.h>

#include <cstdlib>

#include "core/device_memory.h"
#include "decodelab/error.h"

namespace decodelab::detail {
namespace {

constexpr size_t kAlign = 256;
size_t round_up(size_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

}  // namespace

size_t ScratchBuffer::bytes_for(std::initializer_list<size_t> sizes) {
  size_t total = 0;
  for (const size_t s : sizes) total += round_up(s);
  return total;
}

ScratchBuffer::ScratchBuffer(bool on_device, size_t bytes, void* stream)
    : on_device_(on_device), stream_(stream), size_(round_up(bytes)) {
  if (size_ == 0) return;
  data_ = static_cast<char*>(on_device ? device_scratch_alloc(size_, stream) : std::aligned_alloc(kAlign, size_));
  if (data_ == nullptr) throw Error(fmt::format("scratch: {} bytes could not be allocated", size_));
}

ScratchBuffer::~ScratchBuffer() {
  if (data_ == nullptr) return;
  if (on_device_) {
    device_scratch_free(data_, stream_);
  } else {
    std::free(data_);
  }
}

void* ScratchBuffer::take(size_t bytes) {
  const size_t size = round_up(bytes);
  if (used_ + size > size_) {
    throw Error(fmt::format("scratch: {} more bytes asked of a buffer of {} with {} used", size, size_, used_));
  }
  void* at = data_ + used_;
  used_ += size;
  return at;
}

}  // namespace decodelab::detail
