// The subcommands of the decodelab command-line tool.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace decodelab::cli {

struct VerifyOptions {
  std::string op;
  std::string backend;     // empty: every backend of the chosen device(s)
  std::string device = "cpu";  // cpu, cuda or all
  uint64_t seed = 1;
  std::string json_path;   // write the per-case results here when set
  bool write_trust = true;
};

// Runs the grid, prints the table and (unless told not to) writes the trust records. Returns the
// process exit code: 0 when every case passed.
int run_verify(const VerifyOptions& options);

int run_info();

struct GenerateCommandOptions {
  std::string checkpoint;  // a Hugging Face checkpoint directory; with --toy, where to write one
  bool toy = false;
  std::string synthetic;  // "llama3-8b": random weights of that shape made in memory
  int64_t context = 0;    // positions skipped before the prompt (decode speed at a context length)
  std::vector<int32_t> tokens;  // the prompt
  int steps = 32;
  std::string device = "cpu";
  std::string dtype = "f32";
  std::string quantize;  // "", mlx.q4.g64, gguf.q4_0, ...
  std::string backend = "auto";
  std::vector<std::string> op_backends;  // "OP=BACKEND": per-op choices over `backend`
  float temperature = 0.0f;
  int top_k = 0;
  float top_p = 1.0f;
  uint64_t seed = 0;
  bool check_finite = false;
  // KV-cache quantization: "" (the activation dtype) or "turboquant"; K and V bits per coordinate
  // (kv_bits sets both where k_bits/v_bits are 0; a fraction such as 2.5 is a split width), the
  // scale mode, and the layers kept in the activation dtype.
  std::string kv_quant;
  double kv_bits = 4, k_bits = 0, v_bits = 0;
  std::string kv_scale = "plain";
  std::vector<int> f16_layers;
};
int run_generate(const GenerateCommandOptions& options);

struct BenchCommandOptions {
  std::string op;
  std::string backend;
  std::string shape;
  std::string device = "cpu";
  std::string json_path = "decodelab-bench.json";
  bool quick = false;
};

// Probes the machine, verifies and times the grid, prints the table and writes the JSON.
int run_bench(const BenchCommandOptions& options);

// Times the trusted candidates and writes the autotune cache.
int run_tune(const BenchCommandOptions& options);

struct KvEvalCommandOptions {
  std::string input = "unit";  // unit, keys or a .npy path
  int64_t dim = 128;
  bool dim_given = false;      // a file's D is its own unless --dim says otherwise
  int64_t count = 10000;
  int64_t context = 1024;
  uint64_t seed = 1;
  std::vector<std::string> codecs;
  std::vector<double> bits;
  std::string json_path;       // write the records here when set
};

// Measures every selected KV codec and width, prints the table and writes the JSON.
int run_kv_eval(const KvEvalCommandOptions& options);

// Writes `json` and a newline to `path` (`command`'s --json) and says so; a path that cannot be
// written is an error naming it, not a silent success.
void write_json(const char* command, const std::string& path, const std::string& json);

}  // namespace decodelab::cli
