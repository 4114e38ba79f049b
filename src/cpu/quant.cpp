// CPU quantize and dequantize: the owners' bit-exact algorithms (src/reference/quant.cpp, one
// definition) run over row ranges on the thread pool. Quantization happens at load time; what
// matters is that it is exact and uses every core. The compressed cache appends likewise run the
// codecs' own encoders over rows: TurboQuantMse::encode (TurboQuant, RaBitQ-key and QJL-key
// caches, rows of (sequence, new token, KV head)), RabitqKeys::encode, QjlKeys::encode, and
// KiviCodec's (rows of (sequence, KV head), each taking its tokens in order). Their codes must be
// the reference's bit for bit, and a second encoder in f32 could round a rotated coordinate across
// a codebook boundary.
#include "cpu/cpu.h"
#include "cpu/thread_pool.h"
#include "reference/record_append.h"
#include "reference/reference.h"

namespace decodelab::cpu {

void quantize(const QuantizeArgs& a) {
  parallel_ranges(a.out.rows, 1, [&](int64_t begin, int64_t end) { reference::quantize_rows(a, begin, end); });
}

void dequantize(const DequantizeArgs& a) {
  parallel_ranges(a.w.rows, 1, [&](int64_t begin, int64_t end) { reference::dequantize_rows(a, begin, end); });
}

namespace {

// The reference's `rows` over `count` rows, split over the pool.
template <class Args>
void on_pool(const Args& a, int64_t count, void (*rows)(const Args&, int64_t, int64_t)) {
  parallel_ranges(count, 1, [&](int64_t begin, int64_t end) { rows(a, begin, end); });
}

// The append of a cache of per-token records (reference::append_record_rows), over the pool.
template <class Args>
void append_records(const Args& a) {
  on_pool(a, reference::append_record_row_count(a.k_new), reference::append_record_rows<Args>);
}

}  // namespace

void turboquant_append_paged(const TurboQuantAppendPagedArgs& a) { append_records(a); }
void rabitq_append_paged(const RabitqAppendPagedArgs& a) { append_records(a); }
void qjl_append_paged(const QjlAppendPagedArgs& a) { append_records(a); }

void kivi_append_paged(const KiviAppendPagedArgs& a) {
  on_pool(a, reference::kivi_append_row_count(a), reference::kivi_append_rows);
}

}  // namespace decodelab::cpu
