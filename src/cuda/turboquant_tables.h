// The TurboQuant codecs' rotations on the GPU, for the CUDA append and fused attention
// (turboquant_append.cu, turboquant_attention.cu; RaBitQ's rotations and QJL's sketches likewise,
// rabitq_attention.cu and qjl_attention.cu). Plain C++ (implemented in turboquant_tables.cpp).
//
// A codec is a host object (kvquant.h) that the cache struct points to; its codebook (two for a
// split width) is at most 16 centroids and 15 boundaries, which the launchers pass by value in the
// kernel parameters. Its
// rotation is D x D and is uploaded once per rotation and kept, in a small per-device table keyed
// by (kind, D, seed): the seed fully defines the rotation (kvquant.h), so two codecs with the same
// key share one upload, and a codec freed and another built at the same address cannot be served
// a stale entry, as a table keyed by pointer could. The entries are freed at exit.
//
// Each entry holds
//   - R^T and R as dense f32 matrices, row-major, for the attention: q' = R_K q is thread i
//     summing column i of R_K^T over j, and out = R_V^T o' thread i summing column i of R_V, so
//     the threads of a block read consecutive floats (a Hadamard rotation costs a D x D matvec
//     there too, which is nothing next to the cache at decode);
//   - the factors that encode() multiplies by, in double, for the append, whose codes must be
//     bit-exact with the host encoder: dense R^T (so the encoder's row sums read coalesced), or
//     the Hadamard signs S1, S2 and permutation P.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "decodelab/kvquant.h"

namespace decodelab::cuda {

struct DeviceRotation {
  int dim = 0;
  kvquant::RotationKind kind = kvquant::RotationKind::dense;
  const float* forward_t = nullptr;   // R^T, [D, D] f32
  const float* inverse = nullptr;     // R, [D, D] f32: out_i = sum_j R[j][i] o'_j
  const double* dense_t = nullptr;    // dense: R^T in double
  const double* signs1 = nullptr;     // hadamard: S1, [D]
  const double* signs2 = nullptr;     // hadamard: S2, [D]
  const int32_t* permutation = nullptr;  // hadamard: (P v)[i] = v[permutation[i]]
};

// The device table of `rotation` on the current device, uploaded on first use: the upload is
// stream-ordered on `stream` and waited for before the entry is published, so any stream may use
// it after this returns. A first use inside a CUDA graph capture is refused
// (cudaErrorStreamCaptureUnsupported): the upload would only happen when the graph runs.
cudaError_t device_rotation(const kvquant::Rotation& rotation, cudaStream_t stream, DeviceRotation* out);

// A QJL codec's sketch S (m x D) on the device, transposed so that thread i of a block reads
// column i of a row (consecutive threads, consecutive elements):
//   - S^T as f32 for the attention's q' = S q (qjl_attention.cu);
//   - S^T in double, the encoder's own values, for the append's signs of S k (qjl_append.cu).
struct DeviceSketch {
  const float* projection_t = nullptr;  // [D, m] f32
  const double* encode_t = nullptr;     // [D, m] f64
};

// The sketch of `codec` on the current device, uploaded once per sketch and kept, keyed by
// (D, m, seed) like the rotations (the seed fully defines the sketch), under the same rules.
cudaError_t device_sketch(const kvquant::QjlKeys& codec, cudaStream_t stream, DeviceSketch* out);

}  // namespace decodelab::cuda
