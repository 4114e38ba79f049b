// CPU matvec family (matvec.cpp): y = W x for a batch of inputs, over dense f32/f16/bf16 weights and
// quantized ones (MLX affine 4/8-bit, GGUF Q4_0/Q8_0), and the ops built on it. Each kernel is listed
// in matvec_kernels.inc.
#pragma once

#include "ops/args.h"

namespace decodelab::cpu {

// The stable kernels. Decode is a stream over the weights: each weight byte is read from memory
// once per call for all B inputs, rows are spread over the thread pool in chunks.
void matvec(const MatvecArgs& a);
void matvec_multi(const MatvecMultiArgs& a);  // the rows of all weights as one row space
void output_projection(const OutputProjectionArgs& a);
void mlp_block(const MlpBlockArgs& a);  // gate and up in one pass with SwiGLU at the output, then down

// cpu.rowpar (experimental): plain row-parallel, one output (row, input) at a time; the row is
// re-read from cache for each input of the batch.
void matvec_rowpar(const MatvecArgs& a);

// cpu.tiled (experimental): tiles of rows x K chunks, so that the slice of the inputs and the
// accumulators of a tile stay in L1 while the tile's weights stream through.
void matvec_tiled(const MatvecArgs& a);
void matvec_multi_tiled(const MatvecMultiArgs& a);

}  // namespace decodelab::cpu
