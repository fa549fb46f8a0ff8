/* The small runtime shim that lets TVM-generated kernels run bare metal (see frugalrt_runtime.h). */
#include "frugalrt_runtime.h"

#include <string.h>

#define FRUGALRT_MAX_ARGS 16

static char last_error[128];
static size_t workspace_top;

void TVMFFIErrorSetRaisedFromCStrParts(const char *kind, const char **parts, int32_t num_parts) {
  size_t n = 0;
  last_error[0] = 0;
  for (int32_t i = -1; i < num_parts && n + 1 < sizeof last_error; i++) {
    const char *s = i < 0 ? kind : parts[i];
    size_t k = strlen(s);
    if (k > sizeof last_error - 1 - n) k = sizeof last_error - 1 - n;
    memcpy(last_error + n, s, k);
    n += k;
    if (i < 0 && n + 2 < sizeof last_error) last_error[n++] = ':', last_error[n++] = ' ';
  }
  last_error[n] = 0;
}

const char *frugalrt_last_error(void) { return last_error; }

/* Kernels free their workspace in LIFO order, so a bump pointer into a static array suffices. */
void *TVMBackendAllocWorkspace(int device_type, int device_id, uint64_t nbytes, int dtype_code_hint,
                               int dtype_bits_hint) {
  size_t size = (size_t)((nbytes + 15u) & ~(uint64_t)15u);
  (void)device_type, (void)device_id, (void)dtype_code_hint, (void)dtype_bits_hint;
  if (size > frugalrt_workspace_size - workspace_top) {
    const char *parts[1] = {"frugalrt workspace arena exhausted"};
    TVMFFIErrorSetRaisedFromCStrParts("MemoryError", parts, 1);
    return NULL;
  }
  void *p = frugalrt_workspace + workspace_top;
  workspace_top += size;
  return p;
}

int TVMBackendFreeWorkspace(int device_type, int device_id, void *ptr) {
  (void)device_type, (void)device_id;
  workspace_top = (size_t)((uint8_t *)ptr - frugalrt_workspace);
  return 0;
}

/* Parallel loops run serially: a microcontroller has one core. */
int TVMBackendParallelLaunch(FTVMParallelLambda flambda, void *cdata, int num_task) {
  TVMParallelGroupEnv env = {NULL, 1};
  (void)num_task;
  return flambda(0, &env, cdata);
}

int frugalrt_call(frugalrt_kernel fn, const frugalrt_arg *args, int num_args, void *const bases[3]) {
  DLTensor tensors[FRUGALRT_MAX_ARGS];
  TVMFFIAny packed[FRUGALRT_MAX_ARGS], result;
  if (num_args > FRUGALRT_MAX_ARGS) return -1;
  for (int i = 0; i < num_args; i++) {
    const frugalrt_arg *a = &args[i];
    DLTensor *t = &tensors[i];
    t->data = a->base == FRUGALRT_CONST ? (void *)a->data : (uint8_t *)bases[a->base] + a->offset;
    t->device.device_type = kDLCPU;
    t->device.device_id = 0;
    t->ndim = a->ndim;
    t->dtype.code = a->dtype_code;
    t->dtype.bits = a->dtype_bits;
    t->dtype.lanes = 1;
    t->shape = (int64_t *)a->shape;
    t->strides = NULL;
    t->byte_offset = 0;
    memset(&packed[i], 0, sizeof packed[i]);
    packed[i].type_index = kTVMFFIDLTensorPtr;
    packed[i].v_ptr = t;
  }
  memset(&result, 0, sizeof result);
  return fn(NULL, packed, num_args, &result);
}
