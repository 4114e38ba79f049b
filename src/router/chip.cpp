// Chip fingerprints for trust records: the CPU's model and ISA flags, the GPUs' names, compute
// capabilities and driver.
#include <fmt/format.h>

#include <fstream>
#include <string>

#include "core/device_memory.h"
#include "decodelab/router.h"

namespace decodelab {

ChipInfo cpu_chip() {
  ChipInfo chip;
  chip.device = Device::cpu;
  std::ifstream cpuinfo("/proc/cpuinfo");
  for (std::string line; std::getline(cpuinfo, line);) {
    if (line.rfind("model name", 0) == 0) {
      chip.name = line.substr(line.find(':') + 2);
      break;
    }
  }
  if (chip.name.empty()) chip.name = "unknown cpu";
#if defined(__x86_64__)
  __builtin_cpu_init();
  const std::pair<const char*, bool> flags[] = {
      {"sse4.2", __builtin_cpu_supports("sse4.2")},     {"avx", __builtin_cpu_supports("avx")},
      {"avx2", __builtin_cpu_supports("avx2")},         {"fma", __builtin_cpu_supports("fma")},
      {"avx512f", __builtin_cpu_supports("avx512f")},   {"avx512bw", __builtin_cpu_supports("avx512bw")},
      {"avx512vl", __builtin_cpu_supports("avx512vl")}, {"avx512vnni", __builtin_cpu_supports("avx512vnni")},
      {"avx512bf16", __builtin_cpu_supports("avx512bf16")},
  };
  for (const auto& [name, present] : flags) {
    if (present) chip.detail += chip.detail.empty() ? name : fmt::format(" {}", name);
  }
#else
  chip.detail = "non-x86";
#endif
  return chip;
}

std::vector<ChipInfo> gpu_chips() {
  std::vector<ChipInfo> chips;
  for (const auto& gpu : detail::cuda_devices()) {
    chips.push_back({Device::cuda, gpu.name, fmt::format("sm_{} driver {}", gpu.sm, gpu.driver)});
  }
  return chips;
}

}  // namespace decodelab
