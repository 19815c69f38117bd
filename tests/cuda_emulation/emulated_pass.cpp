// csrc/cuda/zo_pass.cu compiled for the host against include/cuda_runtime.h, behind a C interface for ctypes
// (tests/cuda_emulated.py). Built with -fsanitize=alignment,...: undefined behaviour in the kernels (a 16-byte access
// to a misaligned address, a signed overflow, a shift out of range, an index past an array) calls the handlers at
// the end of this file instead of happening: they abandon the call, which returns kUndefinedBehaviour naming the
// check. (Going on would not do: a misaligned 16-byte access is compiled to an aligned SSE instruction, which
// faults.) The kernels' frames hold nothing to destroy, so jumping out of them is safe.
#include <csetjmp>
#include <vector>

#include "../../csrc/cuda/zo_pass.cu"

using zokern_emulation::state;

namespace {
constexpr int kUndefinedBehaviour = -1;
std::jmp_buf* abandon = nullptr;  // set while an emulated launch runs
const char* report = "";
}  // namespace

extern "C" {

// sources: null for an in-place pass, else each tensor's source (the out-of-place pass of bindings.cpp).
int zk_emu_zo_pass(void* const* data, const void* const* sources, const int64_t* numel, const int64_t* base,
                   int64_t count, int format,
                   uint64_t seed, uint64_t seed2, uint64_t rounding_seed, float alpha, float alpha2, float lr,
                   float weight_decay, float grad, const float* grad_ptr, const int64_t* scalars, uint32_t domain,
                   int update, int second, int stochastic) {
  std::vector<zokern::gpu::TensorSpan> spans;
  for (int64_t k = 0; k < count; ++k) spans.push_back({data[k], sources ? sources[k] : data[k], numel[k], base[k]});
  zokern::gpu::PassConfig config{};
  config.seed = seed;
  config.seed2 = seed2;
  config.rounding_seed = rounding_seed;
  config.alpha = alpha;
  config.alpha2 = alpha2;
  config.lr = lr;
  config.weight_decay = weight_decay;
  config.grad = grad;
  config.grad_ptr = grad_ptr;
  config.scalars = scalars;
  config.domain = domain;
  config.update = update != 0;
  config.second = second != 0;
  config.stochastic = stochastic != 0;
  std::jmp_buf jump;
  if (setjmp(jump) != 0) {
    abandon = nullptr;  // the frame it pointed into is gone
    return kUndefinedBehaviour;
  }
  abandon = &jump;
  const int status =
      zokern::gpu::launch_zo_pass(spans.data(), count, static_cast<zokern::gpu::Format>(format), config, nullptr);
  abandon = nullptr;
  return status;
}

int zk_emu_philox_words(uint64_t seed, uint32_t domain, uint64_t first_block, int64_t n_blocks, int64_t* out) {
  std::jmp_buf jump;
  if (setjmp(jump) != 0) {
    abandon = nullptr;  // the frame it pointed into is gone
    return kUndefinedBehaviour;
  }
  abandon = &jump;
  const int status = zokern::gpu::launch_philox_words(seed, domain, first_block, n_blocks, out, nullptr);
  abandon = nullptr;
  return status;
}

// The check that abandoned the last call returning kUndefinedBehaviour.
const char* zk_emu_report() { return report; }

float zk_emu_log_unit_interval(float u) { return zokern::log_unit_interval(u); }

void zk_emu_configure(int multiprocessors) { state.multiprocessors = multiprocessors; }

// Launches and the largest grid since the last call, which zeroes them.
void zk_emu_counters(int64_t out[2]) {
  out[0] = state.launches;
  out[1] = state.largest_grid;
  state.launches = state.largest_grid = 0;
}

// The sanitizer's report hooks (normally libubsan's, which this build does not link). Their data arguments describe
// the failed check; the hook's name says enough.
#define ZK_ABANDON_ON(check, name, ...) \
  void name(__VA_ARGS__) {              \
    report = check;                     \
    if (abandon != nullptr) std::longjmp(*abandon, 1); \
  }
ZK_ABANDON_ON("misaligned or null access", __ubsan_handle_type_mismatch_v1, void*, void*)
ZK_ABANDON_ON("signed overflow in +", __ubsan_handle_add_overflow, void*, void*, void*)
ZK_ABANDON_ON("signed overflow in -", __ubsan_handle_sub_overflow, void*, void*, void*)
ZK_ABANDON_ON("signed overflow in *", __ubsan_handle_mul_overflow, void*, void*, void*)
ZK_ABANDON_ON("signed overflow in negation", __ubsan_handle_negate_overflow, void*, void*)
ZK_ABANDON_ON("division overflow", __ubsan_handle_divrem_overflow, void*, void*, void*)
ZK_ABANDON_ON("shift out of range", __ubsan_handle_shift_out_of_bounds, void*, void*, void*)
ZK_ABANDON_ON("index out of bounds", __ubsan_handle_out_of_bounds, void*, void*)
ZK_ABANDON_ON("pointer overflow", __ubsan_handle_pointer_overflow, void*, void*, void*)
#undef ZK_ABANDON_ON
}
