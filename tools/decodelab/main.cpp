// decodelab: verify, benchmark and inspect the kernels on this machine.
// With no arguments it runs the main job on the CPU: verify the default grid, benchmark the quick
// grid against the measured bandwidth, print the tables and write the results.
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <exception>
#include <fstream>

#include "commands.h"
#include "decodelab/error.h"

void decodelab::cli::write_json(const char* command, const std::string& path, const std::string& json) {
  std::ofstream file(path);
  file << json << '\n';
  if (!file.flush()) fail(command, "--json", "a file this process can write", path);
  fmt::print("results: {}\n", path);
}

int main(int argc, char** argv) {
  using namespace decodelab::cli;
  CLI::App app{"decodelab: hand-written LLM decode kernels, each proven against a reference"};
  app.require_subcommand(0, 1);

  app.add_subcommand("info", "chip fingerprint, ISA, backends and their status, trust records");

  VerifyOptions verify;
  CLI::App* verify_cmd = app.add_subcommand("verify", "run the verification grid and write trust records");
  verify_cmd->add_option("--op", verify.op, "only this op (e.g. decode_attention)");
  verify_cmd->add_option("--backend", verify.backend, "only this backend (reference, cpu, cpu.<variant>, cuda, ...)");
  verify_cmd->add_option("--device", verify.device, "cpu, cuda or all")->check(CLI::IsMember({"cpu", "cuda", "all"}));
  verify_cmd->add_option("--seed", verify.seed, "seed of the random inputs");
  verify_cmd->add_option("--json", verify.json_path, "write every case's result to this JSON file");
  verify_cmd->add_flag("!--no-trust", verify.write_trust, "do not write trust records");

  BenchCommandOptions bench;
  CLI::App* bench_cmd = app.add_subcommand("bench", "measure bandwidth, verify, then time every backend");
  bench_cmd->add_option("--op", bench.op, "only this op");
  bench_cmd->add_option("--backend", bench.backend, "only this backend (cpu also selects cpu.<variant>)");
  bench_cmd->add_option("--device", bench.device, "cpu or cuda")->check(CLI::IsMember({"cpu", "cuda"}));
  bench_cmd->add_option("--shape", bench.shape, "only cases whose shape contains this text (e.g. 'B=1 N=4096')");
  bench_cmd->add_option("--json", bench.json_path, "where to write the results")->capture_default_str();
  bench_cmd->add_flag("--quick", bench.quick, "the small grid of the main job");

  GenerateCommandOptions gen;
  CLI::App* gen_cmd = app.add_subcommand("generate", "decode token ids with a Llama-family checkpoint (or a toy one)");
  gen_cmd->add_option("checkpoint", gen.checkpoint, "checkpoint directory (config.json, *.safetensors); with --toy, where to write it");
  gen_cmd->add_flag("--toy", gen.toy, "write a small random Llama checkpoint and use it");
  gen_cmd->add_option("--synthetic", gen.synthetic,
                      "random weights of a real model's shape made in memory, no checkpoint (speed only)")
      ->check(CLI::IsMember({"llama3-8b"}));
  gen_cmd->add_option("--context", gen.context,
                      "start at this context length: positions skipped (zero K/V), not computed (speed only)")
      ->check(CLI::Range(int64_t{0}, int64_t{1} << 20));
  gen_cmd->add_option("--tokens", gen.tokens, "prompt token ids")->delimiter(',');
  gen_cmd->add_option("--steps", gen.steps, "tokens to generate")->check(CLI::Range(1, 1 << 20));
  gen_cmd->add_option("--device", gen.device, "cpu or cuda")->check(CLI::IsMember({"cpu", "cuda"}));
  gen_cmd->add_option("--dtype", gen.dtype, "activations and dense weights: f32, f16 or bf16");
  gen_cmd->add_option("--quantize", gen.quantize, "quantize on load: mlx.q4.g64, mlx.q8.g64, gguf.q4_0, gguf.q8_0, ...");
  gen_cmd->add_option("--backend", gen.backend, "backend of every op (auto, reference, cpu, cuda, ...)");
  gen_cmd->add_option("--op-backend", gen.op_backends, "OP=BACKEND: this op's backend instead (repeatable), e.g. matvec_multi=cuda.mma");
  gen_cmd->add_option("--temperature", gen.temperature, "0: greedy");
  gen_cmd->add_option("--top-k", gen.top_k, "keep the k most likely tokens (0: all)");
  gen_cmd->add_option("--top-p", gen.top_p, "keep the smallest set of this probability (1: all)");
  gen_cmd->add_option("--seed", gen.seed, "seed of the sampler and of the toy weights");
  gen_cmd->add_flag("--check-finite", gen.check_finite, "refuse NaN or Inf weights");
  gen_cmd->add_option("--kv-quant", gen.kv_quant, "KV cache as TurboQuant (MSE) records instead of --dtype")
      ->check(CLI::IsMember({"turboquant"}));
  gen_cmd->add_option("--kv-bits", gen.kv_bits, "bits of K and V codes with --kv-quant (2.5, 3.5: split widths)")
      ->capture_default_str()
      ->check(CLI::Range(1.0, 4.0));
  gen_cmd->add_option("--k-bits", gen.k_bits, "bits of K codes (instead of --kv-bits)")->check(CLI::Range(1.0, 4.0));
  gen_cmd->add_option("--v-bits", gen.v_bits, "bits of V codes (instead of --kv-bits)")->check(CLI::Range(1.0, 4.0));
  gen_cmd->add_option("--kv-scale", gen.kv_scale, "TurboQuant scale mode")
      ->capture_default_str()
      ->check(CLI::IsMember({"plain", "norm_corrected", "unbiased"}));
  gen_cmd->add_option("--f16-layers", gen.f16_layers, "layers whose KV stay in --dtype with --kv-quant (e.g. 0,31)")
      ->delimiter(',');

  BenchCommandOptions tune;
  CLI::App* tune_cmd = app.add_subcommand("tune", "time the trusted backends and write the autotune cache for auto");
  tune_cmd->add_option("--op", tune.op, "only this op");
  tune_cmd->add_option("--device", tune.device, "cpu")->check(CLI::IsMember({"cpu"}));
  tune_cmd->add_flag("--quick", tune.quick, "only the small grid");

  KvEvalCommandOptions kv;
  CLI::App* kv_cmd = app.add_subcommand("kv-eval", "KV-cache codecs: distortion, inner-product bias, attention error, bytes, with the theory");
  kv_cmd->add_option("--input", kv.input, "unit (random unit vectors), keys (synthetic keys: outlier channels, RoPE) or a .npy file [n, D]")
      ->capture_default_str();
  CLI::Option* dim_option = kv_cmd->add_option("--dim", kv.dim, "head dim D of generated inputs (a file's own by default)")
                                ->capture_default_str();
  kv_cmd->add_option("--count", kv.count, "keys measured")->capture_default_str()->check(CLI::PositiveNumber);
  kv_cmd->add_option("--context", kv.context, "tokens per attention trial")->capture_default_str()->check(CLI::PositiveNumber);
  kv_cmd->add_option("--seed", kv.seed, "seed of the inputs, rotations and sketches")->capture_default_str();
  kv_cmd->add_option("--codec", kv.codecs,
                     "only these codecs (f16, turboquant[.plain|.norm_corrected|.unbiased|.split|.prod], rabitq, qjl, polarquant, kivi, product_vq, commvq)")
      ->delimiter(',');
  kv_cmd->add_option("--bits", kv.bits, "only these bit widths (e.g. 2,2.5,4)")->delimiter(',');
  kv_cmd->add_option("--json", kv.json_path, "write the records to this JSON file");

  CLI11_PARSE(app, argc, argv);
  kv.dim_given = dim_option->count() > 0;
  try {
    if (app.got_subcommand("info")) return run_info();
    if (app.got_subcommand("verify")) return run_verify(verify);
    if (app.got_subcommand("bench")) return run_bench(bench);
    if (app.got_subcommand("tune")) return run_tune(tune);
    if (app.got_subcommand("generate")) return run_generate(gen);
    if (app.got_subcommand("kv-eval")) return run_kv_eval(kv);
    // The main job: verify the default grid, then benchmark the quick grid.
    fmt::print("decodelab: verifying the default grid on the CPU (decodelab --help for more)\n");
    const int verified = run_verify(VerifyOptions{});
    if (verified != 0) return verified;
    BenchCommandOptions quick;
    quick.quick = true;
    return run_bench(quick);
  } catch (const std::exception& e) {
    fmt::print(stderr, "decodelab: {}\n", e.what());
    return 2;
  }
}
