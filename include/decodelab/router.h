// Backend selection, shared by every op.
//
// Every op takes `RunOptions` last. `backend` names who runs it:
//   "auto"        the autotuned choice for this op and shape class when one exists and its backend
//                 holds a current trust record on this chip; otherwise the stable default for the
//                 device the tensors live on (the best stable backend there, `reference` last)
//   "reference"   the plain double-accumulating definition (CPU)
//   "cpu", "cuda" the stable backend of that device
//   "<device>.<variant>"  a named variant, e.g. "cpu.tiled" (experimental ones run only when named)
// A backend that cannot take a call says why, in the error.
#pragma once

#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "decodelab/tensor.h"

namespace decodelab {

// One op's backend in a call that runs several ops (decode_block, a LlamaDecoder step): `backend`
// for the op named `op` (an Args name such as "matvec_multi" or "decode_attention_paged"), in
// place of RunOptions::backend.
struct OpBackend {
  std::string_view op;
  std::string_view backend;
};

struct RunOptions {
  std::string_view backend = "auto";
  Stream stream{};
  // Check the values of index tensors (cache lengths, page tables, RoPE positions) before the
  // launch. They live where the op runs, so on a GPU this copies them to the host and waits for
  // the stream, every call. A caller whose indices come from a PagedKVCache (which keeps them
  // valid as it builds them) may turn it off; shapes and dtypes are checked either way, and an
  // out-of-range index then is the caller's undefined behaviour.
  bool check_indices = true;
  // Per-op choices over `backend`: for the op called and for the ops a composed op runs (the
  // pieces of decode_block); the caller keeps the span alive for the call.
  std::span<const OpBackend> per_op{};
};

// Throws an Error naming any entry whose op is not a registered op or whose backend that op does
// not have (list_backends() has both).
void check_op_backends(std::span<const OpBackend> per_op);

enum class Status { stable, experimental };

std::string_view status_name(Status s);

struct BackendInfo {
  std::string op;
  std::string backend;
  Status status;
  Device device;
};

// Every registered (op, backend) pair, in registration order.
std::vector<BackendInfo> list_backends();

// The CPU backends' thread pool: one for all ops, sized to the machine (or DECODELAB_THREADS).
// Resizing waits for no running op; call it between ops.
void set_cpu_threads(int threads);
int cpu_threads();

// The library build that produced a result: the git commit (with "-dirty" for local changes).
std::string_view build_id();

// What a trust record is keyed by. CPU: model name and the ISA extensions the kernels care about.
// GPU: name, compute capability and driver version.
struct ChipInfo {
  Device device = Device::cpu;
  std::string name;
  std::string detail;  // CPU: ISA flags; GPU: "sm_90 driver 13000"
  std::string fingerprint() const { return name + " | " + detail; }
};

ChipInfo cpu_chip();
std::vector<ChipInfo> gpu_chips();  // empty without CUDA or without a GPU

// One verified (op, backend, dtype): how many cases ran and passed, and the worst NMSE seen.
struct TrustRecord {
  std::string op;
  std::string backend;
  std::string dtype;
  int cases = 0;
  int passed = 0;
  double worst_nmse = 0.0;
  bool trusted() const { return cases > 0 && passed == cases; }
};

// The trust store of one chip: $XDG_CACHE_HOME/decodelab/trust-<hash of the fingerprint>.json
// (~/.cache when XDG_CACHE_HOME is unset). A file that is corrupt, of another schema, another
// chip or another build is reported through `warning` and ignored, never trusted.
class TrustStore {
 public:
  explicit TrustStore(ChipInfo chip, std::string directory = default_directory());
  static std::string default_directory();

  std::string path() const;
  const ChipInfo& chip() const { return chip_; }
  // Loads the records; returns false (with warning() set) when the file is unusable.
  bool load();
  void save() const;
  const std::string& warning() const { return warning_; }

  void put(const TrustRecord& record);
  const TrustRecord* find(std::string_view op, std::string_view backend, std::string_view dtype) const;
  const std::vector<TrustRecord>& records() const { return records_; }

 private:
  ChipInfo chip_;
  std::string directory_;
  std::vector<TrustRecord> records_;
  std::string warning_;
};

}  // namespace decodelab
