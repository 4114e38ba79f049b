// The per-device tables of TurboQuant rotations and QJL sketches (turboquant_tables.h).
#include "cuda/turboquant_tables.h"

#include <algorithm>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>
#include <vector>

namespace decodelab::cuda {
namespace {

// Device buffers, freed with the table at exit (errors ignored then: the runtime may already be
// shutting down, and the process is ending).
struct Buffers {
  std::vector<void*> list;
  ~Buffers() {
    for (void* p : list) cudaFree(p);
  }
};

struct Entry {  // one rotation
  DeviceRotation view;
  Buffers buffers;
};

struct SketchEntry {  // one QJL sketch
  DeviceSketch view;
  Buffers buffers;
};

using Key = std::tuple<int, kvquant::RotationKind, int64_t, uint64_t>;  // device, kind, D, seed
using SketchKey = std::tuple<int, int64_t, int64_t, uint64_t>;          // device, D, m, seed

struct Table {
  std::mutex mutex;
  std::map<Key, std::unique_ptr<Entry>> entries;
  std::map<SketchKey, std::unique_ptr<SketchEntry>> sketches;
};

Table& table() {
  static Table t;
  return t;
}

// Copies `host` into a new device buffer owned by `entry`. The host vector must stay alive until
// the stream has run the copy (the caller synchronizes before returning).
template <class T>
cudaError_t upload(Buffers& buffers, const std::vector<T>& host, cudaStream_t stream, const T** out) {
  void* p = nullptr;
  if (const cudaError_t e = cudaMalloc(&p, host.size() * sizeof(T)); e != cudaSuccess) return e;
  buffers.list.push_back(p);
  *out = static_cast<const T*>(p);
  return cudaMemcpyAsync(p, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice, stream);
}

cudaError_t build(const kvquant::Rotation& r, cudaStream_t stream, Entry& entry) {
  const int64_t d = r.dim();
  const size_t n = size_t(d);
  // R column by column, as R e_j: exactly the rotation that apply() computes, either kind.
  std::vector<float> forward_t(n * n), inverse(n * n);
  std::vector<double> e(n), column(n);
  for (size_t j = 0; j < n; ++j) {
    std::fill(e.begin(), e.end(), 0.0);
    e[j] = 1.0;
    r.apply(e, column);
    for (size_t i = 0; i < n; ++i) {
      forward_t[j * n + i] = float(column[i]);  // R^T[j][i] = R[i][j]
      inverse[i * n + j] = float(column[i]);    // R[i][j]
    }
  }
  entry.view.dim = int(d);
  entry.view.kind = r.kind();
  std::vector<double> dense_t, signs1, signs2;
  std::vector<int32_t> permutation;
  if (const cudaError_t e1 = upload(entry.buffers, forward_t, stream, &entry.view.forward_t); e1 != cudaSuccess) return e1;
  if (const cudaError_t e2 = upload(entry.buffers, inverse, stream, &entry.view.inverse); e2 != cudaSuccess) return e2;
  if (r.kind() == kvquant::RotationKind::dense) {
    // The encoder's own matrix (not R e_j, whose f32 copy above is rounded), transposed.
    const auto m = r.matrix();
    dense_t.resize(n * n);
    for (size_t i = 0; i < n; ++i) {
      for (size_t j = 0; j < n; ++j) dense_t[j * n + i] = m[i * n + j];
    }
    if (const cudaError_t e3 = upload(entry.buffers, dense_t, stream, &entry.view.dense_t); e3 != cudaSuccess) return e3;
  } else {
    signs1.assign(r.signs1().begin(), r.signs1().end());
    signs2.assign(r.signs2().begin(), r.signs2().end());
    for (int64_t v : r.permutation()) permutation.push_back(int32_t(v));
    if (const cudaError_t e3 = upload(entry.buffers, signs1, stream, &entry.view.signs1); e3 != cudaSuccess) return e3;
    if (const cudaError_t e4 = upload(entry.buffers, signs2, stream, &entry.view.signs2); e4 != cudaSuccess) return e4;
    if (const cudaError_t e5 = upload(entry.buffers, permutation, stream, &entry.view.permutation); e5 != cudaSuccess) return e5;
  }
  // Once per rotation: the host vectors above die here, and other streams may use the entry next.
  return cudaStreamSynchronize(stream);
}

// S^T as [D, m] (S^T[j][i] = S[i][j]), in f32 and in double.
cudaError_t build(const kvquant::QjlKeys& codec, cudaStream_t stream, SketchEntry& entry) {
  const size_t d = size_t(codec.config().head_dim), m = size_t(codec.config().sketch_dim);
  const auto sketch = codec.sketch();
  std::vector<float> projection_t(d * m);
  std::vector<double> encode_t(d * m);
  for (size_t i = 0; i < m; ++i) {
    for (size_t j = 0; j < d; ++j) {
      encode_t[j * m + i] = sketch[i * d + j];
      projection_t[j * m + i] = float(sketch[i * d + j]);
    }
  }
  if (const cudaError_t e = upload(entry.buffers, projection_t, stream, &entry.view.projection_t); e != cudaSuccess) return e;
  if (const cudaError_t e = upload(entry.buffers, encode_t, stream, &entry.view.encode_t); e != cudaSuccess) return e;
  return cudaStreamSynchronize(stream);  // the host vectors die here
}

// The entry of `key` in `entries`, built by build(source, stream, entry) on first use; a first use
// inside a CUDA graph capture is refused.
template <class Map, class Source>
cudaError_t find_or_build(Map& entries, const typename Map::key_type& key, const Source& source, cudaStream_t stream,
                          const typename Map::mapped_type::element_type** out) {
  if (const auto it = entries.find(key); it != entries.end()) {
    *out = it->second.get();
    return cudaSuccess;
  }
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  if (const cudaError_t e = cudaStreamIsCapturing(stream, &capture); e != cudaSuccess) return e;
  if (capture != cudaStreamCaptureStatusNone) return cudaErrorStreamCaptureUnsupported;
  auto entry = std::make_unique<typename Map::mapped_type::element_type>();
  if (const cudaError_t e = build(source, stream, *entry); e != cudaSuccess) return e;  // entry freed
  *out = entry.get();
  entries.emplace(key, std::move(entry));
  return cudaSuccess;
}

}  // namespace

cudaError_t device_rotation(const kvquant::Rotation& rotation, cudaStream_t stream, DeviceRotation* out) {
  int device = 0;
  if (const cudaError_t e = cudaGetDevice(&device); e != cudaSuccess) return e;
  Table& t = table();
  const std::lock_guard<std::mutex> lock(t.mutex);
  const Entry* entry = nullptr;
  const cudaError_t e =
      find_or_build(t.entries, Key{device, rotation.kind(), rotation.dim(), rotation.seed()}, rotation, stream, &entry);
  if (e == cudaSuccess) *out = entry->view;
  return e;
}

cudaError_t device_sketch(const kvquant::QjlKeys& codec, cudaStream_t stream, DeviceSketch* out) {
  int device = 0;
  if (const cudaError_t e = cudaGetDevice(&device); e != cudaSuccess) return e;
  const kvquant::QjlConfig& c = codec.config();
  Table& t = table();
  const std::lock_guard<std::mutex> lock(t.mutex);
  const SketchEntry* entry = nullptr;
  const cudaError_t e = find_or_build(t.sketches, SketchKey{device, c.head_dim, c.sketch_dim, c.seed}, codec, stream, &entry);
  if (e == cudaSuccess) *out = entry->view;
  return e;
}

}  // namespace decodelab::cuda
