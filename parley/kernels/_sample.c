/* The draw of a sampled row: temperature, top_k, top_p and min_p, then one uniform u inverted
 * through the CDF of the tokens left, in token-id order. One call for a batch of float32 logit rows
 * on CPUs with AVX512-BF16 (the project's machines; the kernels share cpu.h).
 *
 * Why a kernel: in torch a row took ~0.6 ms of a one-row decode step (a softmax, a topk, an argmax
 * and a nonzero over the 49,152-token vocabulary, and ~40 small ops), ~9 ms of a 32-row one.
 *
 * How: only the tokens within D of the row's largest scaled logit (D = 4 first: e^-4 of its
 * probability) are candidates, collected in one pass and sorted (value descending, id ascending).
 * The filters keep a prefix of that order: top_k the tokens at least the k-th value (ties at the
 * k-th kept), top_p the smallest prefix whose probability reaches p (ties at its last value kept;
 * where the most likely token reaches p alone, only it, the lowest id among tied ones, as greedy
 * takes it), min_p the tokens at least min_p times as likely as the first. Where the candidates
 * cannot hold what a filter keeps (fewer than k; less than p of the mass; min_p below e^-D) D
 * doubles (up to 1024; past it every token is a candidate). Without any of those filters every token
 * is drawn from. A token's weight is e^(y - max) (a vector exp, ~1 ulp); top_p compares float64
 * running sums of them with p times the sum over the tokens top_k left (over every token without
 * it); the draw sums the weights left in float64, by id.
 *
 * Each row is computed by one thread from its own logits and parameters alone: its token never
 * depends on the rows beside it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu.h"

typedef struct {
    float y, w; /* scaled logit, weight e^(y - top) */
    int32_t id;
} Candidate;

__attribute__((unused)) static int by_value(const void *a, const void *b) { /* unused in a build without SIMD */
    const Candidate *x = a, *y = b;
    return x->y > y->y ? -1 : x->y < y->y ? 1 : (x->id > y->id) - (x->id < y->id);
}

typedef struct {
    float temperature, top_p, log_min_p; /* 1, 1 and -inf: unused */
    int64_t top_k;                       /* 0: unused */
    double u;                            /* in [0, 1) */
} Row;

#if PARLEY_SIMD
/* y = x / temperature (as torch divides); returns the largest y. */
TARGET static float scale(const float *x, float *y, int64_t width, float temperature) {
    __m512 high = _mm512_set1_ps(-INFINITY);
    const __m512 t = _mm512_set1_ps(temperature);
    int64_t i = 0;
    for (; i + 16 <= width; i += 16) {
        const __m512 v = _mm512_div_ps(_mm512_loadu_ps(x + i), t);
        _mm512_storeu_ps(y + i, v);
        high = _mm512_max_ps(high, v);
    }
    float top = _mm512_reduce_max_ps(high);
    for (; i < width; i++) {
        y[i] = x[i] / temperature;
        top = y[i] > top ? y[i] : top;
    }
    return top;
}

/* w = e^(y - top) over the row (0 where y is -inf); returns their float64 sum, 16 at a time in
 * lane order, each 16's sum also kept in blocks[i / 16] (for `pick`). */
TARGET static double weigh(const float *y, float *w, double *blocks, int64_t width, float top) {
    const __m512 t = _mm512_set1_ps(top), none = _mm512_set1_ps(-INFINITY);
    double sum = 0.0;
    for (int64_t i = 0; i < width; i += 16) {
        const __mmask16 m = width - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (width - i)) - 1);
        const __m512 v = _mm512_mask_loadu_ps(none, m, y + i);
        const __mmask16 finite = _mm512_cmp_ps_mask(v, none, _CMP_GT_OQ);
        const __m512 e = _mm512_maskz_mov_ps(finite, exp_nonpositive(_mm512_sub_ps(v, t)));
        _mm512_mask_storeu_ps(w + i, m, e);
        const double block = _mm512_reduce_add_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(e))) +
                             _mm512_reduce_add_pd(_mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(e), 1))));
        blocks[i / 16] = block;
        sum += block;
    }
    return sum;
}

/* The token at which the running sum of w (by id) passes target: the block of 16 whose running
 * sum passes it, then the token within it (its last weighed one where rounding passes none). */
static int64_t pick(const float *w, const double *blocks, int64_t width, double target) {
    double running = 0.0;
    int64_t b = 0, last = 0;
    const int64_t count = (width + 15) / 16;
    while (b + 1 < count && running + blocks[b] <= target) running += blocks[b++];
    for (int64_t i = 16 * b; i < width && i < 16 * (b + 1); i++) {
        if (w[i] > 0.0f) last = i;
        running += w[i];
        if (w[i] > 0.0f && running > target) return i;
    }
    return last;
}

/* e^(y - top) of one value, as `weigh` computes it. */
TARGET static float weight(float y, float top) {
    float w[16];
    _mm512_storeu_ps(w, exp_nonpositive(_mm512_set1_ps(y - top)));
    return w[0];
}
#endif

#if PARLEY_SIMD
/* The tokens whose y is at least `cut` into cand, in id order, with their weights; returns how many. */
TARGET static int64_t collect(const float *y, int64_t width, float cut, float top, Candidate *cand) {
    const __m512 c = _mm512_set1_ps(cut), none = _mm512_set1_ps(-INFINITY);
    int64_t n = 0;
    for (int64_t i = 0; i < width; i += 16) {
        const __mmask16 m = width - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (width - i)) - 1);
        const __m512 v = _mm512_mask_loadu_ps(none, m, y + i);
        unsigned hits = _mm512_cmp_ps_mask(v, c, _CMP_GE_OQ) & _mm512_cmp_ps_mask(v, none, _CMP_GT_OQ);
        for (; hits; hits &= hits - 1) {
            const int64_t at = i + __builtin_ctz(hits);
            cand[n++] = (Candidate){y[at], weight(y[at], top), (int32_t)at};
        }
    }
    return n;
}
#endif

/* The token of one row: its logits x [width]; scratch y and w [width], blocks [width / 16 + 1],
 * candidates [2 * width] (in id order, then sorted). */
static int64_t draw_row(const float *x, int64_t width, Row r, float *y, float *w, double *blocks, Candidate *cand) {
#if PARLEY_SIMD
    const float top = scale(x, y, width, r.temperature);
    if (!(top > -INFINITY) || isinf(top) || isnan(top)) { /* nothing finite to weigh: the first largest */
        for (int64_t i = 0; i < width; i++)
            if (y[i] == top) return i;
        return 0;
    }
    if (!(r.top_k > 0 || r.top_p < 1.0f || r.log_min_p > -INFINITY)) /* no filter: every token */
        return pick(w, blocks, width, r.u * weigh(y, w, blocks, width, top));

    /* top_p's total without top_k: every token's weight */
    const double total = r.top_k > 0 || r.top_p >= 1.0f ? 0.0 : weigh(y, w, blocks, width, top);
    int64_t n = 0;
    float depth = r.log_min_p > -INFINITY && -r.log_min_p > 4.0f ? -r.log_min_p : 4.0f;
    for (;; depth = depth < 1024.0f ? 2.0f * depth : INFINITY) {
        n = collect(y, width, isinf(depth) ? -INFINITY : top - depth, top, cand);
        if (isinf(depth)) break;
        if (r.top_k > 0 && n < r.top_k) continue;
        if (r.log_min_p > -INFINITY && r.log_min_p < -depth) continue;
        if (r.top_k == 0 && r.top_p < 1.0f) { /* the candidates must hold p of the mass, with margin */
            double held = 0.0;
            for (int64_t j = 0; j < n; j++) held += cand[j].w;
            if (held < (double)r.top_p * total + 1e-9 * total) continue;
        }
        break;
    }
    Candidate *sorted = cand + n;
    memcpy(sorted, cand, sizeof *cand * (size_t)n);
    qsort(sorted, (size_t)n, sizeof *sorted, by_value);
    int64_t kept = n;
    if (r.top_k > 0 && r.top_k < kept) { /* the k-th value and its ties */
        kept = r.top_k;
        while (kept < n && sorted[kept].y == sorted[r.top_k - 1].y) kept++;
    }
    if (r.top_p < 1.0f) {
        double sum = total;
        if (r.top_k > 0) {
            sum = 0.0;
            for (int64_t j = 0; j < kept; j++) sum += sorted[j].w;
        }
        const double target = (double)r.top_p * sum;
        if (sorted[0].w >= target) return sorted[0].id; /* the most likely token alone: the lowest id among ties */
        double cumulative = 0.0;
        int64_t last = kept - 1;
        for (int64_t j = 0; j < kept; j++)
            if ((cumulative += sorted[j].w) >= target) {
                last = j;
                break;
            }
        while (last + 1 < kept && sorted[last + 1].y == sorted[last].y) last++;
        kept = last + 1;
    }
    if (r.log_min_p > -INFINITY) {
        const float floor = top + r.log_min_p;
        int64_t j = 1;
        while (j < kept && sorted[j].y >= floor) j++;
        kept = j;
    }
    /* the draw over the tokens left (those at least the last value kept), by id */
    const float least = sorted[kept - 1].y;
    double sum = 0.0;
    for (int64_t j = 0; j < n; j++)
        if (cand[j].y >= least) sum += cand[j].w;
    const double target = r.u * sum;
    double running = 0.0;
    int64_t last = sorted[0].id;
    for (int64_t j = 0; j < n; j++)
        if (cand[j].y >= least) {
            last = cand[j].id;
            if ((running += cand[j].w) > target) return last;
        }
    return last;
#else
    (void)x, (void)width, (void)r, (void)y, (void)w, (void)blocks, (void)cand;
    return 0;
#endif
}

/* draw(threads, rows, width, x, x_stride, temperature, top_k, top_p, log_min_p, u, out): x float32
 * rows; per row float32 temperature, top_p, log_min_p, int64 top_k, float64 u; out int64. Pointers
 * as ints; the caller checks shapes (parley/kernels/sample.py). */
static PyObject *draw(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 11) {
        PyErr_SetString(PyExc_TypeError, "draw takes 11 arguments");
        return NULL;
    }
    const int threads = (int)PyLong_AsLong(args[0]);
    const int64_t rows = PyLong_AsLongLong(args[1]), width = PyLong_AsLongLong(args[2]);
    const float *x = PyLong_AsVoidPtr(args[3]);
    const int64_t stride = PyLong_AsLongLong(args[4]);
    const float *temperature = PyLong_AsVoidPtr(args[5]), *top_p = PyLong_AsVoidPtr(args[7]),
                *log_min_p = PyLong_AsVoidPtr(args[8]);
    const int64_t *top_k = PyLong_AsVoidPtr(args[6]);
    const double *u = PyLong_AsVoidPtr(args[9]);
    int64_t *out = PyLong_AsVoidPtr(args[10]);
    if (PyErr_Occurred()) return NULL;
    if (!cpu_supported() || width < 1 || width > INT32_MAX || stride < width) {
        PyErr_SetString(PyExc_ValueError, "draw: unsupported CPU or layout");
        return NULL;
    }
    const int team = threads < 1 ? 1 : (rows < threads ? (int)(rows > 0 ? rows : 1) : threads);
    const size_t per_thread = (size_t)width * (2 * sizeof(float) + 2 * sizeof(Candidate)) + sizeof(double) * (size_t)(width / 16 + 1);
    char *scratch = malloc(per_thread * (size_t)team);
    if (scratch == NULL) return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel num_threads(team) if (team > 1)
    {
        int me = 0;
#ifdef _OPENMP
        me = omp_get_thread_num();
#endif
        Candidate *cand = (Candidate *)(scratch + per_thread * (size_t)me);
        float *y = (float *)(cand + 2 * width), *w = y + width;
        double *blocks = (double *)(w + width);
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < rows; i++) {
            const Row r = {temperature[i], top_p[i], log_min_p[i], top_k[i], u[i]};
            out[i] = draw_row(x + i * stride, width, r, y, w, blocks, cand);
        }
    }
    Py_END_ALLOW_THREADS
    free(scratch);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"draw", (PyCFunction)(void (*)(void))draw, METH_FASTCALL, "The sampled token of every row."},
    {"supported", supported, METH_NOARGS, "Whether this CPU runs the kernel (AVX512-BF16)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_sample", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__sample(void) { return PyModule_Create(&module); }
