// CPU quantize and dequantize: the owners' bit-exact algorithms (src/reference/quant.cpp, one
// definition) run over row ranges on the thread pool. Quantization happens at load time; what
// matters is that it is exact and uses every core.
#include "cpu/cpu.h"
#include "cpu/thread_pool.h"
#include "reference/reference.h"

namespace decodelab::cpu {

void quantize(const QuantizeArgs& a) {
  parallel_ranges(a.out.rows, 1, [&](int64_t begin, int64_t end) { reference::quantize_rows(a, begin, end); });
}

void dequantize(const DequantizeArgs& a) {
  parallel_ranges(a.w.rows, 1, [&](int64_t begin, int64_t end) { reference::dequantize_rows(a, begin, end); });
}

}  // namespace decodelab::cpu
