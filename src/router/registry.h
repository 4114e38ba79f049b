// The kernel registry: for each op (its Args struct), the kernels of every backend compiled in,
// in the order of the backends' kernel lists (src/<backend>/kernels.inc).
#pragma once

#include <span>
#include <string>
#include <string_view>

#include "decodelab/router.h"
#include "ops/args.h"

namespace decodelab {

template <class Args>
struct Kernel {
  std::string_view backend;
  Status status;
  Device device;
  void (*run)(const Args&);
  // Empty when the kernel takes these arguments; otherwise the reason in words. Null: takes all.
  std::string (*supports)(const Args&);

  std::string refusal(const Args& args) const { return supports ? supports(args) : std::string(); }
};

template <class Args>
std::span<const Kernel<Args>> kernels();

// The kernel that runs `args` for `backend` (see router.h) with tensors on `device`, or an Error
// that says why none can.
template <class Args>
const Kernel<Args>& select_kernel(const Args& args, std::string_view backend, Device device);

// The backend that `run` names for op `op`: its per-op choice, else run.backend.
std::string_view backend_for(const RunOptions& run, std::string_view op);

template <class Args>
void dispatch(const Args& args, const RunOptions& run, Device device) {
  select_kernel(args, backend_for(run, Args::kOp), device).run(args);
}

}  // namespace decodelab
