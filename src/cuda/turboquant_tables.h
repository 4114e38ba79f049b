// The TurboQuant codecs' rotations on the GPU, for the CUDA append and fused attention
// (turboquant_append.cu, turboquant_attention.cu). Plain C++ (implemented in turboquant_tables.cpp).
//
// A codec is a host object (kvquant.h) that the cache struct points to; its codebook is at most 16
// centroids and 15 boundaries, which the launchers pass by value in the kernel parameters. Its
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

}  // namespace decodelab::cuda
