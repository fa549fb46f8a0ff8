/* frugalrt static runner: the model built in, validated against the golden vectors it carries,
 * benchmarked on the device, one JSON object printed (and written with --json FILE).
 *
 *   runner [--input FILE] [--output FILE] [--json FILE] [--warmup N] [--runs N] [--seconds S]
 *          [--op-runs N]
 *
 * Inputs: the golden inputs (default) or FILE (uint32 n_samples, uint32 repeat, then n_samples x
 * MODEL_INPUT_SIZE float32, frugalrt's bundle input format). Every sample runs once; --output
 * writes the n_samples x MODEL_OUTPUT_SIZE float32 outputs. With the golden inputs the outputs are
 * checked against the golden outputs (tolerances baked in at compile time, frugalrt validate's rule).
 * Latency: sample 0, --warmup untimed runs, then --runs timed runs (or as many as fit --seconds),
 * each timed with CLOCK_MONOTONIC around model_run alone. Per-op: --op-runs runs of
 * model_run_timed (a second driver with a clock read around each kernel call, so the latency
 * path carries no per-op cost); each kernel's median over those runs, the cost of one clock read
 * pair subtracted per call ("op_run_ms": the median of those whole runs), with its time in each run
 * ("samples_ms", run order) and the ONNX nodes it computes ("nodes", recorded by the bundle).
 * Exit status: 0 ok, 1 golden check failed, 2 usage, 3 I/O, 4 the model failed.
 */
#define _GNU_SOURCE
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/utsname.h>
#include <time.h>

#include "model.h"
#include "runner.h"

/* RUNNER_TARGET and RUNNER_CFLAGS (string literals) come from the compiler command line. */
static FILE *json_out[2];

static void emit(const char *fmt, ...) {
  for (int i = 0; i < 2; i++) {
    if (!json_out[i]) continue;
    va_list ap;
    va_start(ap, fmt);
    vfprintf(json_out[i], fmt, ap);
    va_end(ap);
  }
}

static void emit_string(const char *s) {
  emit("\"");
  for (; *s; s++) {
    if (*s == '"' || *s == '\\') emit("\\%c", *s);
    else if ((unsigned char)*s < 0x20) emit("\\u%04x", *s);
    else emit("%c", *s);
  }
  emit("\"");
}

static void emit_number(double v) {
  if (isfinite(v)) emit("%.9g", v);
  else emit("null");
}

static int fail(int code, const char *what, const char *detail) {
  fprintf(stderr, "runner: %s%s%s\n", what, detail ? ": " : "", detail ? detail : "");
  return code;
}

uint64_t runner_now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

/* numpy.percentile's default (linear interpolation) on sorted values. */
static double percentile(const double *sorted, size_t n, double p) {
  double at = p / 100.0 * (double)(n - 1);
  size_t lo = (size_t)at;
  size_t hi = lo + 1 < n ? lo + 1 : lo;
  return sorted[lo] + (sorted[hi] - sorted[lo]) * (at - (double)lo);
}

static float from_bits(uint32_t w) {
  float f;
  memcpy(&f, &w, sizeof f);
  return f;
}

typedef struct {
  double max_abs;
  unsigned long outside, values, rows, argmax_agree;
} output_check;

/* frugalrt validate's rule: |y - ref| <= tol + rtol |ref|; NaN matches NaN, inf the same inf. */
static void check_output(const float *got, const float *want, int k, output_check *c) {
  int size = runner_output_sizes[k], classes = runner_output_classes[k];
  for (int i = 0; i < size; i++) {
    double g = got[i], w = want[i];
    int ok;
    if (isfinite(g) && isfinite(w)) {
      double d = fabs(g - w);
      if (d > c->max_abs) c->max_abs = d;
      ok = d <= runner_output_tolerance[k] + runner_rtol * fabs(w);
    } else {
      ok = (isnan(g) && isnan(w)) || (isinf(g) && g == w);
    }
    c->outside += !ok;
    c->values++;
  }
  if (classes <= 1) return;
  for (int r = 0; r < size / classes; r++) {
    const float *g = got + r * classes, *w = want + r * classes;
    int ag = 0, aw = 0;
    for (int j = 1; j < classes; j++) {
      if (g[j] > g[ag]) ag = j;
      if (w[j] > w[aw]) aw = j;
    }
    c->rows++;
    c->argmax_agree += ag == aw;
  }
}

static int validate(const float *outputs, unsigned n) {
  output_check checks[MODEL_NUM_OUTPUTS];
  float want[MODEL_OUTPUT_SIZE];
  int passed = 1;
  memset(checks, 0, sizeof checks);
  for (unsigned s = 0; s < n; s++) {
    for (int i = 0; i < MODEL_OUTPUT_SIZE; i++) want[i] = from_bits(runner_golden_out[s * MODEL_OUTPUT_SIZE + i]);
    for (int k = 0, at = 0; k < MODEL_NUM_OUTPUTS; at += runner_output_sizes[k++])
      check_output(outputs + s * MODEL_OUTPUT_SIZE + at, want + at, k, &checks[k]);
  }
  emit("\"validation\": {\"reference\": \"golden\", \"mode\": \"%s\", \"rtol\": %g, \"outputs\": [",
       runner_binary_mode ? "binary" : "float", runner_rtol);
  for (int k = 0; k < MODEL_NUM_OUTPUTS; k++) {
    output_check *c = &checks[k];
    int argmax_ok = c->argmax_agree == c->rows;
    int values_ok = runner_binary_mode ? c->values - c->outside >= 0.9 * c->values : c->outside == 0;
    passed &= argmax_ok && values_ok;
    emit("%s{\"name\": ", k ? ", " : "");
    emit_string(runner_output_names[k]);
    emit(", \"max_abs\": ");
    emit_number(c->max_abs);
    emit(", \"tolerance\": %.9g, \"outside\": %lu, \"values\": %lu, \"argmax_agreement\": ",
         runner_output_tolerance[k], c->outside, c->values);
    if (c->rows) emit("%.9g", (double)c->argmax_agree / (double)c->rows);
    else emit("null");
    emit(", \"passed\": %s}", argmax_ok && values_ok ? "true" : "false");
  }
  emit("], \"passed\": %s},\n", passed ? "true" : "false");
  return passed;
}

static float *read_inputs(const char *path, unsigned *n) {
  uint32_t header[2];
  FILE *f = fopen(path, "rb");
  if (!f || fread(header, sizeof header, 1, f) != 1) {
    if (f) fclose(f);
    return NULL;
  }
  float *in = malloc((size_t)header[0] * MODEL_INPUT_SIZE * sizeof(float) + 1);
  if (in && header[0] && fread(in, MODEL_INPUT_SIZE * sizeof(float), header[0], f) != header[0]) {
    free(in);
    in = NULL;
  }
  fclose(f);
  *n = header[0];
  return in;
}

static int parse_count(const char *text, long *value) {
  char *end;
  *value = strtol(text, &end, 10);
  return *end == 0 && *value >= 0;
}

static const char usage[] =
    "usage: runner [--input FILE] [--output FILE] [--json FILE] [--warmup N] [--runs N] [--seconds S] "
    "[--op-runs N]";

int main(int argc, char **argv) {
  const char *input = NULL, *output = NULL, *json = NULL;
  long warmup = 10, runs = 100, op_runs = 10;
  double seconds = 0;
  for (int i = 1; i < argc; i++) {
    const char *opt = argv[i], *val = i + 1 < argc ? argv[i + 1] : NULL;
    int ok = val != NULL;
    if (!strcmp(opt, "--input")) input = val;
    else if (!strcmp(opt, "--output")) output = val;
    else if (!strcmp(opt, "--json")) json = val;
    else if (!strcmp(opt, "--warmup")) ok = ok && parse_count(val, &warmup);
    else if (!strcmp(opt, "--runs")) ok = ok && parse_count(val, &runs);
    else if (!strcmp(opt, "--op-runs")) ok = ok && parse_count(val, &op_runs);
    else if (!strcmp(opt, "--seconds")) ok = ok && (seconds = strtod(val, NULL)) > 0;
    else return fail(2, "unknown option", opt), fail(2, usage, NULL);
    if (!ok) return fail(2, "bad or missing value for", opt), fail(2, usage, NULL);
    i++;
  }

  unsigned n = runner_golden_samples;
  float *in;
  if (input) {
    if (!(in = read_inputs(input, &n))) return fail(3, "cannot read inputs from", input);
  } else {
    in = malloc((size_t)n * MODEL_INPUT_SIZE * sizeof(float) + 1);
    if (!in) return fail(3, "out of memory", NULL);
    for (size_t i = 0; i < (size_t)n * MODEL_INPUT_SIZE; i++) in[i] = from_bits(runner_golden_in[i]);
  }
  float *out = malloc((size_t)n * MODEL_OUTPUT_SIZE * sizeof(float) + 1);
  if (!out) return fail(3, "out of memory", NULL);
  for (unsigned s = 0; s < n; s++)
    if (model_run(in + (size_t)s * MODEL_INPUT_SIZE, out + (size_t)s * MODEL_OUTPUT_SIZE))
      return fail(4, "model_run failed", model_last_error());
  if (output) {
    FILE *f = fopen(output, "wb");
    if (!f || fwrite(out, MODEL_OUTPUT_SIZE * sizeof(float), n, f) != n || fclose(f))
      return fail(3, "cannot write outputs to", output);
  }

  json_out[0] = stdout;
  if (json && !(json_out[1] = fopen(json, "w"))) return fail(3, "cannot write", json);
  struct utsname uts;
  emit("{\"runner\": 1, \"target\": ");
  emit_string(RUNNER_TARGET);
  emit(", \"cflags\": ");
  emit_string(RUNNER_CFLAGS);
  emit(", \"machine\": ");
  emit_string(uname(&uts) == 0 ? uts.machine : "unknown");
  emit(", \"clock\": \"CLOCK_MONOTONIC\", \"batch\": 1, \"samples\": %u, \"input\": \"%s\",\n", n,
       input ? "file" : "golden");
  emit("\"arena_bytes\": %d, \"workspace_bytes\": %lu, \"weights_bytes\": %lu,\n", MODEL_ARENA_BYTES,
       (unsigned long)runner_workspace_bytes, runner_weights_bytes);
  int passed = 1;
  if (!input && n) passed = validate(out, n);

  /* latency: sample 0 (zeros when there is none), model_run alone between two clock reads */
  static float one_in[MODEL_INPUT_SIZE], one_out[MODEL_OUTPUT_SIZE];
  if (n) memcpy(one_in, in, sizeof one_in);
  for (long i = 0; i < warmup; i++)
    if (model_run(one_in, one_out)) return fail(4, "model_run failed", model_last_error());
  size_t cap = runs > 0 ? (size_t)runs : 1024, count = 0;
  double *ms = malloc(cap * sizeof(double));
  if (!ms) return fail(3, "out of memory", NULL);
  uint64_t bench_start = runner_now_ns();
  while (seconds > 0 ? (double)(runner_now_ns() - bench_start) < seconds * 1e9 : (long)count < runs) {
    if (count == cap && !(ms = realloc(ms, (cap *= 2) * sizeof(double)))) return fail(3, "out of memory", NULL);
    uint64_t t0 = runner_now_ns();
    int rc = model_run(one_in, one_out);
    uint64_t t1 = runner_now_ns();
    if (rc) return fail(4, "model_run failed", model_last_error());
    ms[count++] = (double)(t1 - t0) / 1e6;
  }
  emit("\"warmup\": %ld, \"runs\": %lu, \"seconds\": %g, \"latency_ms\": ", warmup, (unsigned long)count, seconds);
  if (count) {
    double *sorted = malloc(count * sizeof(double)), sum = 0, sq = 0;
    if (!sorted) return fail(3, "out of memory", NULL);
    memcpy(sorted, ms, count * sizeof(double));
    qsort(sorted, count, sizeof(double), cmp_double);
    for (size_t i = 0; i < count; i++) sum += ms[i];
    double mean = sum / (double)count;
    for (size_t i = 0; i < count; i++) sq += (ms[i] - mean) * (ms[i] - mean);
    emit("{\"mean\": %.9g, \"median\": %.9g, \"p50\": %.9g, \"p90\": %.9g, \"p95\": %.9g, \"p99\": %.9g, "
         "\"min\": %.9g, \"max\": %.9g, \"std\": %.9g},\n\"samples_ms\": [",
         mean, percentile(sorted, count, 50), percentile(sorted, count, 50), percentile(sorted, count, 90),
         percentile(sorted, count, 95), percentile(sorted, count, 99), sorted[0], sorted[count - 1],
         sqrt(sq / (double)count));
    for (size_t i = 0; i < count; i++) emit("%s%.9g", i ? ", " : "", ms[i]);
    emit("],\n");
    free(sorted);
  } else {
    emit("null, \"samples_ms\": [],\n");
  }

  /* per-op: the cheapest clock read pair is what each timed call costs on top of its kernel; each
   * step's median over the runs (like the latency's, robust to the device's other load) */
  uint64_t overhead = UINT64_MAX;
  for (int i = 0; i < 1000; i++) {
    uint64_t t0 = runner_now_ns(), t1 = runner_now_ns();
    if (t1 - t0 < overhead) overhead = t1 - t0;
  }
  size_t op_n = op_runs > 0 ? (size_t)op_runs : 1;
  uint64_t *op_ns = malloc(op_n * RUNNER_NUM_STEPS * sizeof(uint64_t));
  double *column = malloc(op_n * sizeof(double)), *whole = malloc(op_n * sizeof(double));
  if (!op_ns || !column || !whole) return fail(3, "out of memory", NULL);
  for (long r = 0; r < op_runs; r++) {
    uint64_t t0 = runner_now_ns();
    if (model_run_timed(one_in, one_out, op_ns + (size_t)r * RUNNER_NUM_STEPS))
      return fail(4, "model_run failed", model_last_error());
    whole[r] = (double)(runner_now_ns() - t0) / 1e6;
  }
  emit("\"op_runs\": %ld, \"timer_overhead_ns\": %lu, \"op_run_ms\": ", op_runs, (unsigned long)overhead);
  qsort(whole, op_n, sizeof(double), cmp_double);
  emit_number(op_runs ? percentile(whole, op_n, 50) : NAN);
  emit(", \"ops\": [");
  for (int i = 0; op_runs && i < RUNNER_NUM_STEPS; i++) {
    for (long r = 0; r < op_runs; r++) {
      double net = (double)op_ns[(size_t)r * RUNNER_NUM_STEPS + i] - (double)overhead;
      column[r] = (net > 0 ? net : 0) / 1e6;
    }
    emit("%s\n {\"step\": %d, \"name\": ", i ? "," : "", i);
    emit_string(runner_step_names[i]);
    emit(", \"kernel\": ");
    emit_string(runner_step_kernels[i]);
    emit(", \"nodes\": %s, \"samples_ms\": [", runner_step_nodes[i]);
    for (long r = 0; r < op_runs; r++) emit("%s%.9g", r ? ", " : "", column[r]);
    qsort(column, op_n, sizeof(double), cmp_double);
    emit("], \"ms\": %.9g}", percentile(column, op_n, 50));
  }
  emit("],\n\"status\": \"%s\"}\n", passed ? "ok" : "golden check failed");
  if (json_out[1] && fclose(json_out[1])) return fail(3, "cannot write", json);
  return passed ? 0 : 1;
}
