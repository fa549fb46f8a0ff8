/* Test firmware: run the model on inputs read from the host, write the outputs back.
 *
 * Used by frugalrt's qemu runners (semihosting on bare metal, plain files under Linux), and a
 * template for your own firmware. frugalrt_in.bin: uint32 n_samples, uint32 repeat, then n_samples
 * inputs of MODEL_INPUT_SIZE float32; each sample runs `repeat` times (for instruction counting).
 * frugalrt_out.bin: n_samples outputs of MODEL_OUTPUT_SIZE float32.
 */
#include <stdint.h>
#include <stdio.h>

#include "model.h"

static float input[MODEL_INPUT_SIZE], output[MODEL_OUTPUT_SIZE];

int main(void) {
  uint32_t header[2];
  FILE *in = fopen("frugalrt_in.bin", "rb"), *out = fopen("frugalrt_out.bin", "wb");
  if (!in || !out || fread(header, sizeof header, 1, in) != 1) {
    printf("frugalrt: cannot open frugalrt_in.bin / frugalrt_out.bin\n");
    return 3;
  }
  for (uint32_t i = 0; i < header[0]; i++) {
    if (fread(input, sizeof input, 1, in) != 1) return 4;
    for (uint32_t r = 0; r < header[1]; r++) {
      int rc = model_run(input, output);
      if (rc) {
        printf("frugalrt: model_run failed (%d): %s\n", rc, model_last_error());
        return 5;
      }
    }
    if (fwrite(output, sizeof output, 1, out) != 1) return 6;
  }
  fclose(in);
  fclose(out);
  return 0;
}
