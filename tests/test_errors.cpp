// Bad input gets a clear error naming the op, the argument, what was expected and what was given:
// one or more cases per op, each checking the message.
#include <gtest/gtest.h>


#include "decodelab/attention.h"
#include "decodelab/error.h"
#include "error_of.h"
#include "decodelab/model.h"
#include "decodelab/quant.h"
#include "verify/random.h"

namespace decodelab {
namespace {

using verify::i32_array;

TEST(Errors, RmsNorm) {
  Array x(DType::f32, {2, 8}), w(DType::f32, {7}), w16(DType::f16, {8}), out(DType::f32, {2, 8});
  EXPECT_ERROR(rms_norm(x, w, 1e-5f, out), "rms_norm: weight: expected shape [8] [hidden], got [7] f32");
  EXPECT_ERROR(rms_norm(x, w16, 1e-5f, out), "rms_norm: weight: expected dtype f32 (the dtype of x), got [8] f16");
  Array w8(DType::f32, {8});
  EXPECT_ERROR(rms_norm(x, w8, 0.0f, out), "rms_norm: eps: expected a finite eps > 0, got 0");
  Tensor strided = x.view();
  strided.strides[0] = 16;
  EXPECT_ERROR(rms_norm(strided, w8, 1e-5f, out), "rms_norm: x: expected a contiguous row-major tensor, got [2, 8] f32 strides [16, 1]");
  std::string names;  // the backends this build registered for rms_norm (cuda only with CUDA)
  for (const BackendInfo& b : list_backends()) {
    if (b.op == "rms_norm") names += (names.empty() ? "" : ", ") + b.backend;
  }
  EXPECT_ERROR(rms_norm(x, w8, 1e-5f, out, {"cpu.fast"}), "rms_norm: backend: expected auto or one of: " + names + ", got cpu.fast");
  Tensor on_gpu = x.view();
  on_gpu.device = Device::cuda;
  Tensor out_gpu = out.view(), w_gpu = w8.view();
  out_gpu.device = w_gpu.device = Device::cuda;
  EXPECT_ERROR(rms_norm(on_gpu, w_gpu, 1e-5f, out_gpu, {"reference"}),
               "rms_norm: backend 'reference' runs on cpu, but the tensors are on cuda");
}

TEST(Errors, ResidualAndSwiglu) {
  Array a(DType::f16, {2, 8}), b(DType::f16, {2, 9}), out(DType::f16, {2, 8});
  EXPECT_ERROR(residual_add(a, b, out), "residual_add: b: expected the shape of a [2, 8] f16, got [2, 9] f16");
  Array i(DType::i32, {2, 8});
  EXPECT_ERROR(swiglu(i, a, out), "swiglu: gate: expected dtype f32, f16 or bf16, got [2, 8] i32");
}

TEST(Errors, BiasAdd) {
  Array x(DType::bf16, {2, 8}), out(DType::bf16, {2, 8}), b(DType::bf16, {8});
  EXPECT_EQ(error_of([&] { bias_add(x, b, x); }), "");  // in place
  Array b7(DType::bf16, {7}), b32(DType::f32, {8}), out9(DType::bf16, {2, 9});
  EXPECT_ERROR(bias_add(x, b7, out), "bias_add: bias: expected shape [8] [N], got [7] bf16");
  EXPECT_ERROR(bias_add(x, b32, out), "bias_add: bias: expected dtype bf16 (the dtype of x), got [8] f32");
  EXPECT_ERROR(bias_add(x, b, out9), "bias_add: out: expected the shape of x [2, 8] bf16, got [2, 9] bf16");
}

TEST(Errors, Rope) {
  Array x(DType::f32, {3, 2, 64}), out(DType::f32, {3, 2, 64});
  Array two = i32_array({2}, {0, 1}), negative = i32_array({3}, {0, -4, 2}), good = i32_array({3}, {0, 1, 2});
  EXPECT_ERROR(rope(x, two, {}, out), "rope: positions: expected 3 positions, one per token of x [3, 2, 64] f32, got [2] i32");
  EXPECT_ERROR(rope(x, negative, {}, out), "rope: positions[1]: expected a position >= 0, got -4");
  EXPECT_ERROR(rope(x, good, RopeParams{10000.0f, RopeStyle::half_split, 33}, out),
               "rope: rope.rotary_dim: expected an even number in [2, head_dim = 64] (or 0), got 33");
}

struct CacheFixture {
  Array q{DType::f32, {2, 1, 4, 64}}, out{DType::f32, {2, 1, 4, 64}};
  Array k{DType::f32, {2, 2, 10, 64}}, v{DType::f32, {2, 2, 10, 64}};
  Array lengths = i32_array({2}, {3, 10});
};

TEST(Errors, DecodeAttention) {
  CacheFixture f;
  EXPECT_EQ(error_of([&] { decode_attention(f.q, {f.k, f.v, f.lengths}, f.out); }), "");
  Array q72(DType::f32, {2, 1, 4, 72});
  EXPECT_ERROR(decode_attention(q72, {f.k, f.v, f.lengths}, q72),
               "decode_attention: q: expected head_dim D a multiple of 16 in [16, 256], got D = 72");
  Array q6(DType::f32, {2, 1, 6, 64}), k4(DType::f32, {2, 4, 10, 64});
  EXPECT_ERROR(decode_attention(q6, {k4, k4, f.lengths}, q6),
               "decode_attention: heads: expected Hq a positive multiple of Hkv (GQA/MQA group), got Hq = 6, Hkv = 4");
  Array too_long = i32_array({2}, {3, 11});
  EXPECT_ERROR(decode_attention(f.q, {f.k, f.v, too_long}, f.out),
               "decode_attention: lengths[1]: expected a length in [1, 10], got 11");
  Array empty = i32_array({2}, {0, 4});
  EXPECT_ERROR(decode_attention(f.q, {f.k, f.v, empty}, f.out),
               "decode_attention: lengths[0]: expected a length in [1, 10], got 0");
  Array q0(DType::f32, {0, 1, 4, 64});
  EXPECT_ERROR(decode_attention(q0, {f.k, f.v, f.lengths}, q0), "decode_attention: q: expected a batch B >= 1, got [0, 1, 4, 64] f32");
  Array lengths16(DType::f16, {2});
  EXPECT_ERROR(decode_attention(f.q, {f.k, f.v, lengths16}, f.out), "decode_attention: lengths: expected dtype i32, got [2] f16");
}

TEST(Errors, PagedAttentionAndAppend) {
  Array q(DType::f16, {1, 1, 4, 64}), out(DType::f16, {1, 1, 4, 64});
  Array pages(DType::f16, {4, 16, 2, 64});
  Array table = i32_array({1, 3}, {2, 9, 0}), lengths = i32_array({1}, {20});
  EXPECT_ERROR(decode_attention_paged(q, {pages, pages, table, lengths}, out),
               "decode_attention_paged: cache.page_table[0, 1]: expected a page index in [0, 4), got 9");
  Array k_new(DType::f16, {1, 30, 2, 64});
  Array ok_table = i32_array({1, 3}, {2, 1, 0});
  EXPECT_ERROR(kv_append_paged(k_new, k_new, {pages, pages, ok_table, lengths}),
               "kv_append_paged: lengths[0]: expected a length in [0, 18] so that 30 new tokens fit, got 20");
  Array k32(DType::f32, {1, 1, 2, 64});
  EXPECT_ERROR(kv_append_paged(k32, k32, {pages, pages, ok_table, lengths}),
               "kv_append_paged: cache.k_pages: expected dtype f32 (the dtype of the queries/new tokens), got [4, 16, 2, 64] f16");
}

TEST(Errors, ContiguousAppendAndQkv) {
  CacheFixture f;
  Array k_new(DType::f32, {2, 1, 2, 64});
  EXPECT_ERROR(kv_append(k_new, k_new, {f.k, f.v, f.lengths}),
               "kv_append: lengths[1]: expected a length in [0, 9] so that 1 new tokens fit, got 10");
  Array qkv(DType::f32, {3, 500}), q(DType::f32, {3, 4, 64}), k(DType::f32, {3, 2, 64});
  EXPECT_ERROR(qkv_split(qkv, q, k, k),
               "qkv_split: qkv: expected rank 1..4 [..., (Hq + 2 Hkv) D] with last dimension 512, got [3, 500] f32");
}

TEST(Errors, Quantization) {
  Array w(DType::f32, {4, 96});
  EXPECT_ERROR(make_quantized(QuantSpec::mlx(4, 64), 4, 96), "make_quantized: cols: expected a positive multiple of the group size 64, got 96");
  EXPECT_ERROR(make_quantized(QuantSpec::mlx(3, 32), 4, 96), "make_quantized: spec.bits: expected 4 or 8, got 3");
  QuantizedArray q = make_quantized(QuantSpec::q4_0(), 4, 96);
  verify::fill_value(w, 0.5);
  w.ptr<float>()[100] = NAN;
  EXPECT_ERROR(quantize(w, q.weight), "quantize: w[1, 4]: expected a finite value of magnitude <= 1e30, got nan");
  Array x(DType::f32, {1, 64}), y(DType::f32, {1, 4});
  EXPECT_ERROR(matvec(x, Weight::of(q.weight), y), "matvec: w: expected K = 64 input columns, got 96 columns");
  Array x96(DType::f32, {1, 96}), y16(DType::f16, {1, 4});
  EXPECT_ERROR(matvec(x96, Weight::of(q.weight), y16), "matvec: y: expected dtype f32 (the dtype of x), got [1, 4] f16");
  QuantizedWeight broken = q.weight;
  broken.packed.dtype = DType::u32;
  EXPECT_ERROR(matvec(x96, Weight::of(broken), y), "matvec: w.packed: expected dtype u8, got [4, 54] u32");
}

TEST(Errors, MlpAndDecodeBlock) {
  Array x(DType::f32, {1, 32}), g(DType::f32, {64, 32}), d(DType::f32, {16, 64}), out(DType::f32, {1, 32});
  EXPECT_ERROR(mlp_block(x, Weight::of(g), Weight::of(g), Weight::of(d), out),
               "mlp_block: down: expected 32 rows (the hidden size of x), got 16");
  DecodeLayerConfig c{32, 2, 1, 16, 64, 1e-5f, {}};
  DecodeLayerWeights w;
  Array norm(DType::f32, {32}), wq(DType::f32, {32, 32}), wkv(DType::f32, {16, 32}), wo(DType::f32, {32, 32});
  w.attn_norm = w.mlp_norm = norm;
  w.wq = Weight::of(wq);
  w.wk = w.wv = Weight::of(wkv);
  w.wo = Weight::of(wo);
  w.gate = w.up = Weight::of(g);
  w.down = Weight::of(g);  // wrong: [64, 32] where [32, 64] is needed
  Array pages(DType::f32, {2, 16, 1, 16});
  Array table = i32_array({1, 2}, {0, 1}), lengths = i32_array({1}, {3});
  EXPECT_ERROR(decode_block(x, w, c, {pages, pages, table, lengths}, out),
               "decode_block: weights.down: expected K = 64 input columns, got 32 columns");
  // Qwen2's biases: checked where given, each against its projection's width.
  Array down(DType::f32, {32, 64}), bq(DType::f32, {32}), bk16(DType::f16, {16}), bv32(DType::f32, {32});
  w.down = Weight::of(down);
  w.bq = bq;
  w.bv = bv32;
  EXPECT_ERROR(decode_block(x, w, c, {pages, pages, table, lengths}, out),
               "decode_block: weights.bv: expected shape [16] [num_kv_heads * head_dim], got [32] f32");
  w.bk = bk16;
  EXPECT_ERROR(decode_block(x, w, c, {pages, pages, table, lengths}, out),
               "decode_block: weights.bk: expected dtype f32 (the dtype of x), got [16] f16");
  w.bk = Tensor{};  // absent
  w.bv = Tensor::contiguous(nullptr, DType::f32, {16});  // shaped but without data: not taken as absent
  EXPECT_ERROR(decode_block(x, w, c, {pages, pages, table, lengths}, out),
               "decode_block: weights.bv: expected a tensor with data, got a null data pointer");
}

TEST(Errors, RmsNormResidualAndPrefill) {
  Array x(DType::bf16, {2, 16}), r(DType::bf16, {2, 16}), w(DType::bf16, {16}), out(DType::f32, {2, 16});
  EXPECT_ERROR(rms_norm_residual(x, r, w, 1e-5f, out), "rms_norm_residual: out: expected dtype bf16 (the dtype of x), got [2, 16] f32");
  Array q(DType::f32, {1, 9, 4, 64}), k(DType::f32, {1, 8, 2, 64}), o(DType::f32, {1, 9, 4, 64});
  EXPECT_ERROR(prefill_attention(q, k, k, o), "prefill_attention: q: expected Sq <= Skv = 8 for causal attention, got [1, 9, 4, 64] f32");
  EXPECT_EQ(error_of([&] { prefill_attention(q, k, k, o, {false, 0.0f}); }), "");
  Array k2(DType::f32, {2, 8, 2, 64});
  EXPECT_ERROR(prefill_attention(q, k2, k2, o), "prefill_attention: k: expected shape [1, *, *, 64] [B, Skv, Hkv, D], got [2, 8, 2, 64] f32");
}

TEST(Errors, QkvRopeFamily) {
  Array qkv(DType::f16, {2, 1, 512}), q_out(DType::f16, {2, 1, 4, 64});
  Array k(DType::f16, {2, 2, 16, 64}), lengths = i32_array({2}, {16, 3});
  EXPECT_ERROR(qkv_rope_append(qkv, {}, {k, k, lengths}, q_out),
               "qkv_rope_append: lengths[0]: expected a length in [0, 15] so that 1 new tokens fit, got 16");
  Array pages(DType::f16, {3, 8, 2, 64}), table = i32_array({2, 2}, {0, 1, 2, -1}), short_lengths = i32_array({2}, {3, 8});
  EXPECT_ERROR(qkv_rope_append_paged(qkv, {}, {pages, pages, table, short_lengths}, q_out),
               "qkv_rope_append_paged: cache.page_table[1, 1]: expected a page index in [0, 3), got -1");
  Array flat(DType::f16, {2, 512}), q(DType::f16, {2, 4, 64}), kv(DType::f16, {2, 2, 64});
  Array positions = i32_array({3}, {0, 1, 2});
  EXPECT_ERROR(qkv_split_rope(flat, positions, {}, q, kv, kv), "qkv_split_rope: positions: expected 2 positions, one per token, got [3] i32");
}

TEST(Errors, DequantizeAndProjections) {
  QuantizedArray q = make_quantized(QuantSpec::mlx(4, 32), 8, 64);
  Array out(DType::f16, {8, 32});
  EXPECT_ERROR(dequantize(q.weight, out), "dequantize: out: expected shape [8, 64] [rows, cols], got [8, 32] f16");
  QuantizedWeight mixed = q.weight;
  Array biases32(DType::f32, {8, 2});
  mixed.biases = biases32;
  Array full(DType::f16, {8, 64});
  EXPECT_ERROR(dequantize(mixed, full), "dequantize: w.biases: expected dtype f16 (the dtype of the scales), got [8, 2] f32");
  Array x(DType::f16, {2, 64}), y(DType::f16, {2, 8}), wide(DType::f16, {2, 9});
  const Weight w[] = {Weight::of(q.weight), Weight::of(q.weight)};
  const Tensor ys[] = {y, wide};
  EXPECT_ERROR(matvec_multi(x, w, ys), "matvec_multi: y[1]: expected shape [2, 8] [B, N], got [2, 9] f16");
  EXPECT_ERROR(matvec_multi(x, std::span<const Weight>(w, 1), ys), "matvec_multi: w, y: expected 1 to 4 weights and as many outputs, got 1 weights, 2 outputs");
  Array attn(DType::f16, {2, 64}), residual(DType::f16, {3, 8});
  EXPECT_ERROR(output_projection(attn, Weight::of(q.weight), residual, y),
               "output_projection: residual: expected shape [2, 8] [B, N], got [3, 8] f16");
  Array dense_k(DType::f16, {8, 32});
  EXPECT_ERROR(qkv_projection(x, Weight::of(q.weight), Weight::of(dense_k), Weight::of(dense_k), y, y, y),
               "matvec_multi: w[1]: expected K = 64 input columns, got 32 columns");
}

}  // namespace
}  // namespace decodelab
