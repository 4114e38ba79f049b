// CPU quantize and dequantize: the owners' bit-exact algorithms (src/reference/quant.cpp, one
// definition) run over row ranges on the thread pool. Quantization happens at load time; what
// matters is that it is exact and uses every core. The TurboQuant cache append likewise runs the
// codec's own encoder (TurboQuantMse::encode) over (sequence, KV head) rows: its codes must be the
// reference's bit for bit, and a second encoder in f32 could round a rotated coordinate across a
// codebook boundary.
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

void turboquant_append_paged(const TurboQuantAppendPagedArgs& a) {
  parallel_ranges(a.k_new.dim(0) * a.k_new.dim(1), 1,
                  [&](int64_t begin, int64_t end) { reference::turboquant_append_rows(a, begin, end); });
}

}  // namespace decodelab::cpu
