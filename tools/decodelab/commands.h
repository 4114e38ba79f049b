// The subcommands of the decodelab command-line tool.
#pragma once

#include <cstdint>
#include <string>

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

}  // namespace decodelab::cli
