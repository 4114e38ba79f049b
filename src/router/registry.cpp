// Builds each op's kernel list from the backends' kernel lists and picks kernels by name.
#include "router/registry.h"

#include <fmt/format.h>

#include <type_traits>
#include <vector>

#include "decodelab/error.h"
#include "cpu/attention.h"
#include "cpu/cpu.h"
#include "cpu/matvec.h"
#include "ops/common.h"
#ifdef DECODELAB_HAS_CUDA
#include "cuda/cuda.h"
#endif
#include "reference/reference.h"
#include "router/autotune.h"

namespace decodelab {
namespace {

template <class Args>
std::vector<Kernel<Args>> build_kernel_list() {
  std::vector<Kernel<Args>> list;
#define DECODELAB_KERNEL(ARGS, BACKEND, STATUS, DEVICE, RUN, SUPPORTS)                  \
  if constexpr (std::is_same_v<Args, ARGS>) {                                           \
    list.push_back(Kernel<Args>{BACKEND, Status::STATUS, Device::DEVICE, RUN, SUPPORTS}); \
  }
#include "reference/kernels.inc"
#include "cpu/kernels.inc"
#ifdef DECODELAB_HAS_CUDA
#include "cuda/kernels.inc"
#endif
#undef DECODELAB_KERNEL
  return list;
}

template <class Args>
std::string backend_names() {
  std::string names;
  for (const auto& k : kernels<Args>()) names += fmt::format("{}{}", names.empty() ? "" : ", ", k.backend);
  return names;
}

}  // namespace

template <class Args>
std::span<const Kernel<Args>> kernels() {
  static const std::vector<Kernel<Args>> list = build_kernel_list<Args>();
  return list;
}

template <class Args>
const Kernel<Args>& select_kernel(const Args& args, std::string_view backend, Device device) {
  const char* op = Args::kOp;
  if (backend == "auto") {
    // An autotuned choice first, when `decodelab tune` made one for this shape class on this chip
    // and its backend still holds a trust record.
    if (device == Device::cpu) {
      if (const auto chosen = autotuned_backend(op, args_dtype(args), shape_class(args))) {
        for (const auto& k : kernels<Args>()) {
          if (k.backend == *chosen && k.device == device && k.refusal(args).empty()) return k;
        }
      }
    }
    // The stable default for the device: the first stable kernel registered for it that takes
    // these arguments; `reference` is listed first but only chosen when nothing else can.
    const Kernel<Args>* fallback = nullptr;
    std::string reasons;
    for (const auto& k : kernels<Args>()) {
      if (k.device != device || k.status != Status::stable) continue;
      const std::string why = k.refusal(args);
      if (!why.empty()) {
        reasons += fmt::format("; {}: {}", k.backend, why);
        continue;
      }
      if (k.backend != "reference") return k;
      fallback = &k;
    }
    if (fallback != nullptr) return *fallback;
    fail(op, fmt::format("no stable backend on {} takes these arguments{}", device_name(device), reasons));
  }
  for (const auto& k : kernels<Args>()) {
    if (k.backend != backend) continue;
    if (k.device != device) {
      fail(op, fmt::format("backend '{}' runs on {}, but the tensors are on {}", backend,
                           device_name(k.device), device_name(device)));
    }
    const std::string why = k.refusal(args);
    if (!why.empty()) fail(op, fmt::format("backend '{}' does not support this call: {}", backend, why));
    return k;
  }
  fail(op, "backend", fmt::format("auto or one of: {}", backend_names<Args>()), backend);
}

#define DECODELAB_OP(ARGS)                                                          \
  template std::span<const Kernel<ARGS>> kernels<ARGS>();                           \
  template const Kernel<ARGS>& select_kernel<ARGS>(const ARGS&, std::string_view, Device);
#include "router/ops.inc"
#undef DECODELAB_OP

std::string_view backend_for(const RunOptions& run, std::string_view op) {
  for (const OpBackend& choice : run.per_op) {
    if (choice.op == op) return choice.backend;
  }
  return run.backend;
}

void check_op_backends(std::span<const OpBackend> per_op) {
  const std::vector<BackendInfo> all = list_backends();
  for (size_t i = 0; i < per_op.size(); ++i) {
    const OpBackend& choice = per_op[i];
    bool known_op = false, known_backend = choice.backend == "auto";
    std::string backends = "auto";
    for (const BackendInfo& b : all) {
      if (b.op != choice.op) continue;
      known_op = true;
      known_backend = known_backend || b.backend == choice.backend;
      backends += fmt::format(", {}", b.backend);
    }
    if (!known_op) fail("check_op_backends", fmt::format("per_op[{}].op", i), "a registered op (decodelab info lists them)", choice.op);
    if (!known_backend) fail("check_op_backends", fmt::format("per_op[{}].backend (for {})", i, choice.op), backends, choice.backend);
    for (size_t j = 0; j < i; ++j) {
      if (per_op[j].op == choice.op) {
        fail("check_op_backends", fmt::format("per_op[{}].op", i), fmt::format("one choice per op ({} is per_op[{}])", choice.op, j), choice.op);
      }
    }
  }
}

std::string_view status_name(Status s) { return s == Status::stable ? "stable" : "experimental"; }

std::vector<BackendInfo> list_backends() {
  std::vector<BackendInfo> out;
#define DECODELAB_OP(ARGS)                                                  \
  for (const auto& k : kernels<ARGS>()) {                                   \
    out.push_back({ARGS::kOp, std::string(k.backend), k.status, k.device}); \
  }
#include "router/ops.inc"
#undef DECODELAB_OP
  return out;
}

}  // namespace decodelab
