/* frugalrt bundle runtime: what TVM's generated C kernels need, with no TVM runtime and no malloc. */
#ifndef FRUGALRT_RUNTIME_H_
#define FRUGALRT_RUNTIME_H_
#include <stddef.h>
#include <stdint.h>
#include <tvm/ffi/c_api.h>
#include <tvm/runtime/c_backend_api.h>

/* A TVM kernel in the packed calling convention (args are DLTensor pointers). */
typedef int32_t (*frugalrt_kernel)(void *self, void *args, int32_t num_args, void *result);

/* One kernel argument, resolved at call time: data = base pointer + offset (or `data` for weights). */
enum { FRUGALRT_INPUT = 0, FRUGALRT_OUTPUT = 1, FRUGALRT_ARENA = 2, FRUGALRT_CONST = 3 };
typedef struct {
  uint8_t base, ndim, dtype_code, dtype_bits;
  uint32_t offset;
  const void *data;
  const int64_t *shape;
} frugalrt_arg;

int frugalrt_call(frugalrt_kernel fn, const frugalrt_arg *args, int num_args, void *const bases[3]);
const char *frugalrt_last_error(void);

/* Workspace for kernels' large intermediates: a static array defined by the generated model.c. */
extern uint8_t frugalrt_workspace[];
extern const size_t frugalrt_workspace_size;

/* popcount for TVM's C codegen (frugalrt.targets.kernels.popcount lowers tirx.popcount to these). */
static inline uint32_t frugalrt_popcount32(uint32_t x) { return (uint32_t)__builtin_popcount(x); }
static inline uint64_t frugalrt_popcount64(uint64_t x) { return (uint64_t)__builtin_popcountll(x); }
#endif
