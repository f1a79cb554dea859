/* Multi-LoRA for a mixed batch on x86 CPUs with AVX512-BF16: y[t] += B_a (A_a x[t]) for each token t
 * and its own adapter a, computed only for that adapter (segmented, as punica's SGMV), in one call
 * per fused projection.
 *
 * Why a kernel: stacking every adapter of the batch into two dense matmuls (parley/adapters/ops.py)
 * makes each token pay for all adapters and for the zero blocks between fused modules (6x the
 * FLOPs with 4 adapters), and its small oneDNN calls cost ~12 us each before any work.
 *
 * At decode sizes LoRA is bound by memory: every adapter's weights come from DRAM once per step.
 * So the work is cut by weights, not by tokens: each unit reads its own rows of one adapter's A
 * (the shrink) or its own 64 output rows of one B (the expand), once, and runs all of that
 * adapter's tokens over them, four at a time, from registers. The two threads then stream
 * different weights instead of waiting on the same cache lines. Both phases vectorize over
 * output rows (16 per register, dpbf16 over column pairs), so no sum is reduced across lanes.
 *
 * Batch invariance: a token's sums run in the same order whatever tokens share its block or
 * batch, so a request gets the same bits alone or in any mix.
 *
 * Numerics follow PEFT in bfloat16: the shrink is summed in fp32 and rounded to bf16 (lora_A's
 * output), the expand (scale folded into B) is summed in fp32 and added to the base output, which
 * is rounded once.
 *
 * One projection of one layer for one adapter is described by int64 words:
 *   [0] R: rows of A (each module's rank padded to even, the sum to a multiple of 16, with zero rows)
 *   [1] in: A's columns       [2] A: bf16 [R / 16, in / 2 (rounded up), 16, 2]: 16-row blocks,
 *       each with A's column pairs interleaved, a zero column past an odd `in`
 *   [3] number of segments, then per segment (one per module of the fused projection):
 *       col (even), ncols (even): its columns of A x;  row, nrows: its rows of the fused output;
 *       B: bf16 [nrows / 64 (rounded up), ncols / 2, 64, 2]: 64-row blocks, each with B's column
 *       pairs interleaved (the layout dpbf16 reads), zero rows past nrows
 * Blocks are int32 [slot, count, t0, t1, t2, t3]: up to four tokens of one adapter (slot), grouped
 * by slot; first[s] is slot s's first block.
 *
 * Off x86-64 (or built with -DPARLEY_NO_SIMD) the module still loads, says it is unsupported, and
 * parley/adapters keeps its torch path.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu.h"

#define TOKENS 4 /* tokens per block */
#define BLOCK_WORDS (2 + TOKENS)

typedef struct {
    const int32_t *blocks; /* [n, BLOCK_WORDS], grouped by slot */
    const int32_t *first;  /* [slots + 1]: each slot's first block */
    const int64_t *const *descs;
    const bf16 *x;
    int64_t x_stride;
    bf16 *y;
    int64_t y_stride;
    bf16 *h; /* [tokens, h_stride]: every token's A x */
    int64_t h_stride;
} Call;

/* A unit of work reads its own part of one adapter's weights, once, for a run of that adapter's
 * token blocks (all of them at decode sizes). */
typedef struct {
    int32_t slot;
    int32_t segment; /* -1: the shrink of A's 16-row blocks start..start+3; else that segment's
                        EXPAND_ROWS output rows from `start` */
    int64_t start;
    int32_t first_block, end_block;
} Unit;

#define SHRINK_VECTORS 4  /* 16-row blocks of A per shrink unit */
#define EXPAND_ROWS 256   /* output rows per expand unit */
#define UNIT_BLOCKS 8     /* token blocks per unit: prefill's many tokens split over threads */

#if PARLEY_SIMD

TARGET static inline __m512 widen(__m256i v) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

static inline int32_t pair_at(const bf16 *p) {
    int32_t pair;
    memcpy(&pair, p, sizeof pair);
    return pair;
}

/* h_t[16 v + i] = bf16(sum_k x_t[k] A[16 v + i][k]) for i < 16, v < nv, over one block's tokens;
 * `a` points at A's first 16-row block of the tile ([pairs][16][2] each, `a_stride` apart). */
TARGET static inline __attribute__((always_inline)) void shrink_tile(
    const bf16 *const x[TOKENS], int count, const bf16 *a, int64_t a_stride, int64_t in, bf16 *const h[TOKENS],
    const int nv) {
    __m512 acc[TOKENS][4];
    for (int t = 0; t < TOKENS; t++)
        for (int v = 0; v < nv; v++) acc[t][v] = _mm512_setzero_ps();
    const int64_t pairs = (in + 1) / 2;
    for (int64_t p = 0; p < pairs; p++) {
        __m512bh av[4];
        for (int v = 0; v < nv; v++) av[v] = (__m512bh)_mm512_loadu_si512(a + v * a_stride + 32 * p);
        for (int t = 0; t < TOKENS; t++) {
            /* an odd last column pairs with zero (A's padding is zero too) */
            const int32_t xs = 2 * p + 1 < in ? pair_at(x[t] + 2 * p) : (int32_t)x[t][2 * p];
            const __m512bh xp = (__m512bh)_mm512_set1_epi32(xs);
            for (int v = 0; v < nv; v++) acc[t][v] = _mm512_dpbf16_ps(acc[t][v], xp, av[v]);
        }
    }
    for (int t = 0; t < count; t++)
        for (int v = 0; v < nv; v++) _mm256_storeu_si256((__m256i *)(h[t] + 16 * v), (__m256i)_mm512_cvtneps_pbh(acc[t][v]));
}

/* y_t[row + o + i] = bf16(y_t[row + o + i] + sum_c h_t[col + c] B[o + i][c]), i < 64, for one
 * block's tokens; `b` points at the segment's 64-row block o ([pairs][64][2]). */
TARGET static void expand64(bf16 *const y[TOKENS], const bf16 *const h[TOKENS], int count, const bf16 *b,
                            int64_t pairs, int64_t rows_left) {
    __mmask16 store_mask[4];
    for (int v = 0; v < 4; v++) {
        int64_t left = rows_left - 16 * v;
        left = left < 0 ? 0 : left > 16 ? 16 : left;
        store_mask[v] = (__mmask16)((1u << left) - 1);
    }
    __m512 acc[TOKENS][4];
    for (int t = 0; t < TOKENS; t++)
        for (int v = 0; v < 4; v++) acc[t][v] = _mm512_setzero_ps();
    for (int64_t p = 0; p < pairs; p++) {
        __m512bh bv[4];
        for (int v = 0; v < 4; v++) bv[v] = (__m512bh)_mm512_loadu_si512(b + p * 128 + 32 * v);
        for (int t = 0; t < TOKENS; t++) {
            const __m512bh hp = (__m512bh)_mm512_set1_epi32(pair_at(h[t] + 2 * p));
            for (int v = 0; v < 4; v++) acc[t][v] = _mm512_dpbf16_ps(acc[t][v], hp, bv[v]);
        }
    }
    for (int t = 0; t < count; t++)
        for (int v = 0; v < 4; v++) {
            if (!store_mask[v]) continue;
            bf16 *out = y[t] + 16 * v;
            const __m512 sum = _mm512_add_ps(widen(_mm256_maskz_loadu_epi16(store_mask[v], out)), acc[t][v]);
            _mm256_mask_storeu_epi16(out, store_mask[v], (__m256i)_mm512_cvtneps_pbh(sum));
        }
}

TARGET static void shrink_unit(const Call *c, Unit u) {
    const int64_t *desc = c->descs[u.slot];
    const int64_t vectors = desc[0] / 16, in = desc[1], a_stride = (in + 1) / 2 * 32;
    const bf16 *a = (const bf16 *)(intptr_t)desc[2] + u.start * a_stride;
    const int64_t left = vectors - u.start;
    const int nv = left < SHRINK_VECTORS ? (int)left : SHRINK_VECTORS;
    for (int32_t b = u.first_block; b < u.end_block; b++) {
        const int32_t *block = c->blocks + BLOCK_WORDS * b;
        const bf16 *xs[TOKENS];
        bf16 *hs[TOKENS];
        for (int t = 0; t < TOKENS; t++) {
            const int64_t token = block[2 + t];
            xs[t] = c->x + token * c->x_stride;
            hs[t] = c->h + token * c->h_stride + 16 * u.start;
        }
        switch (nv) { /* one register tile per width */
            case 1: shrink_tile(xs, block[1], a, a_stride, in, hs, 1); break;
            case 2: shrink_tile(xs, block[1], a, a_stride, in, hs, 2); break;
            case 3: shrink_tile(xs, block[1], a, a_stride, in, hs, 3); break;
            default: shrink_tile(xs, block[1], a, a_stride, in, hs, 4); break;
        }
    }
}

TARGET static void expand_unit(const Call *c, Unit u) {
    const int64_t *segment = c->descs[u.slot] + 4 + 5 * u.segment;
    const int64_t col = segment[0], pairs = segment[1] / 2, row = segment[2], nrows = segment[3];
    const int64_t end = u.start + EXPAND_ROWS < nrows ? u.start + EXPAND_ROWS : nrows;
    for (int64_t o = u.start; o < end; o += 64) {
        const bf16 *b = (const bf16 *)(intptr_t)segment[4] + o * segment[1];
        for (int32_t k = u.first_block; k < u.end_block; k++) {
            const int32_t *block = c->blocks + BLOCK_WORDS * k;
            bf16 *ys[TOKENS];
            const bf16 *hs[TOKENS];
            for (int t = 0; t < TOKENS; t++) {
                const int64_t token = block[2 + t];
                ys[t] = c->y + token * c->y_stride + row + o;
                hs[t] = c->h + token * c->h_stride + col;
            }
            expand64(ys, hs, block[1], b, pairs, nrows - o);
        }
    }
}

#else /* elsewhere the module loads but reports itself unsupported, and apply is never called */
static void shrink_unit(const Call *c, Unit u) { (void)c, (void)u; }
static void expand_unit(const Call *c, Unit u) { (void)c, (void)u; }
#endif

/* Every unit of both phases: the shrinks of each slot's A, then the expands of each EXPAND_ROWS block
 * of each of its segments, each over runs of UNIT_BLOCKS token blocks. NULL when out of memory. */
static Unit *plan(const int64_t *const *descs, int64_t slots, const int32_t *first, int64_t *shrinks,
                  int64_t *expands) {
    Unit *units = NULL;
    for (int pass = 0; pass < 2; pass++) { /* count, then fill */
        int64_t n1 = 0, n2 = 0;
        for (int64_t s = 0; s < slots; s++) {
            const int64_t *d = descs[s];
            if (d == NULL) continue;
            for (int32_t b = first[s]; b < first[s + 1]; b += UNIT_BLOCKS) {
                const int32_t end = b + UNIT_BLOCKS < first[s + 1] ? b + UNIT_BLOCKS : first[s + 1];
                for (int64_t v = 0; v < d[0] / 16; v += SHRINK_VECTORS, n1++)
                    if (units) units[n1] = (Unit){(int32_t)s, -1, v, b, end};
                for (int64_t g = 0; g < d[3]; g++)
                    for (int64_t o = 0; o < d[4 + 5 * g + 3]; o += EXPAND_ROWS, n2++)
                        if (units) units[*shrinks + n2] = (Unit){(int32_t)s, (int32_t)g, o, b, end};
            }
        }
        if (units) break;
        *shrinks = n1;
        *expands = n2;
        units = malloc(sizeof(Unit) * (size_t)(n1 + n2 + 1));
        if (units == NULL) return NULL;
    }
    return units;
}

/* apply(tokens, slots, blocks, first, x, x_stride, y, y_stride, descs): pointers as ints, strides
 * in elements. */
static PyObject *apply(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 9) {
        PyErr_SetString(PyExc_TypeError, "apply takes 9 arguments");
        return NULL;
    }
    const int64_t tokens = PyLong_AsLongLong(args[0]), slots = PyLong_AsLongLong(args[1]);
    Call c = {PyLong_AsVoidPtr(args[2]), PyLong_AsVoidPtr(args[3]), PyLong_AsVoidPtr(args[8]),
              PyLong_AsVoidPtr(args[4]), PyLong_AsLongLong(args[5]), PyLong_AsVoidPtr(args[6]),
              PyLong_AsLongLong(args[7]), NULL, 0};
    if (PyErr_Occurred()) return NULL;
    for (int64_t s = 0; s < slots; s++)
        if (c.descs[s] != NULL && c.descs[s][0] > c.h_stride) c.h_stride = c.descs[s][0];
    int64_t shrinks, expands;
    Unit *units = plan(c.descs, slots, c.first, &shrinks, &expands);
    c.h = malloc(sizeof(bf16) * (size_t)(tokens * c.h_stride + 1));
    if (units == NULL || c.h == NULL) {
        free(units);
        free(c.h);
        return PyErr_NoMemory();
    }
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel if (shrinks + expands > 2)
    {
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < shrinks; i++) shrink_unit(&c, units[i]);
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < expands; i++) expand_unit(&c, units[shrinks + i]);
    }
    Py_END_ALLOW_THREADS
    free(units);
    free(c.h);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"apply", (PyCFunction)(void (*)(void))apply, METH_FASTCALL, "Add each token's own LoRA delta to y, in place."},
    {"supported", supported, METH_NOARGS, "Whether this CPU runs the kernel (AVX512-BF16)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_lora", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__lora(void) {
    PyObject *m = PyModule_Create(&module);
    if (m != NULL) {
        PyModule_AddIntConstant(m, "TOKENS", TOKENS);
    }
    return m;
}
