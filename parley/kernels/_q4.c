/* y = x W^T (+ bias) with W in 4 bits, as GGUF's Q4_1 keeps it, for x in bf16 on x86 CPUs with
 * AVX512-BF16, on AMX tiles where the CPU has them.
 *
 * Why a kernel: a decode step reads every weight once, and with few rows that is what it waits on.
 * In bf16 the default model's projections are 212 MB a step; in 4 bits a quarter of that. torch's
 * own 4-bit CPU kernel dequantizes again for each row, so it lost to bf16 from 8 rows on; this one
 * dequantizes a panel of weights once per call and runs every row through it.
 *
 * The weights: w[o][k] = bf16(d * q + m) for q in 0..15 and d, m fp16 per 32 inputs of an output
 * (a Q4_1 block), computed in fp32 (d * q is exact, so one rounding to fp32, then one to bf16: the
 * bits of gguf's dequantized float32 weights cast to bf16, the weights a bf16 model loaded from the
 * same file had before). Packed per 16 outputs and group of 32 inputs as 320 bytes: d [16] and m
 * [16] fp16, then 8 chunks of 32 bytes, chunk c holding input pairs 2c (low nibbles) and 2c + 1
 * (high nibbles) of the group, byte j for output j / 2, input j % 2 of the pair
 * (parley/kernels/linear.py packs it).
 *
 * Batch invariance by construction: a panel of 16 or 32 outputs is dequantized into VNNI order
 * ([input pairs][outputs][2], one 64-byte row per pair, which is both a dpbf16 operand and an AMX
 * tile row), then every row of x is multiplied by it with one fp32 sum per output, over the input
 * pairs in order: dpbf16 (one lane per output, one accumulator per row and output) or AMX tile
 * products (each element its own sum, whatever the other rows of the tile). So a row's bits do not
 * depend on how many rows the call has, where the row sits, or the number of threads. The dpbf16
 * and AMX sums round differently; a process takes one path for every call (`amx`).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu.h"

#define GROUP 32         /* inputs per block of d, m */
#define BLOCK 16         /* outputs per block */
#define BLOCK_BYTES 320  /* one block's group: d, m, nibbles */
#define PANEL 32         /* outputs dequantized together */
#define DP_ROWS 8        /* rows the dpbf16 path sums together */
#define TILE_ROWS 16

typedef struct {
    int64_t rows, out_features, in_features, x_stride, y_stride;
    const bf16 *x, *bias;
    const uint8_t *w;
    bf16 *y;
} Call;

#if PARLEY_SIMD

static inline float bf16_to_float(bf16 v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* 32 quantized values (byte j: output j / 2, input j % 2 of a pair) -> one row of the VNNI panel. */
TARGET static inline void dequant_pair(bf16 *out, __m256i q, __m512 d_lo, __m512 m_lo, __m512 d_hi, __m512 m_hi) {
    const __m512 lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(q))), d_lo, m_lo);
    const __m512 hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(q, 1))), d_hi, m_hi);
    _mm512_storeu_si512(out, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
}

/* One block of 16 outputs, all groups -> rows [in_features / 2] of 32 bf16 at `out`, `stride` bf16 apart. */
TARGET static void dequant_block(const uint8_t *w, int64_t groups, bf16 *out, int64_t stride) {
    const __m512i lo_idx = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    const __m512i hi_idx = _mm512_set_epi32(15, 15, 14, 14, 13, 13, 12, 12, 11, 11, 10, 10, 9, 9, 8, 8);
    const __m256i nibble = _mm256_set1_epi8(0x0F);
    for (int64_t g = 0; g < groups; g++, w += BLOCK_BYTES) {
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)w));
        const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(w + 32)));
        const __m512 d_lo = _mm512_permutexvar_ps(lo_idx, d), d_hi = _mm512_permutexvar_ps(hi_idx, d);
        const __m512 m_lo = _mm512_permutexvar_ps(lo_idx, m), m_hi = _mm512_permutexvar_ps(hi_idx, m);
        bf16 *rows = out + g * (GROUP / 2) * stride;
        for (int c = 0; c < 8; c++) {
            const __m256i q = _mm256_loadu_si256((const __m256i *)(w + 64 + 32 * c));
            dequant_pair(rows + (2 * c) * stride, _mm256_and_si256(q, nibble), d_lo, m_lo, d_hi, m_hi);
            dequant_pair(rows + (2 * c + 1) * stride, _mm256_and_si256(_mm256_srli_epi16(q, 4), nibble), d_lo, m_lo,
                         d_hi, m_hi);
        }
    }
}

/* y[r][o0 + j] for the `n` (16 or 32) outputs of a panel from their fp32 sums. */
TARGET static inline void write_rows(const Call *c, int64_t row, int64_t count, int64_t o0, int64_t n,
                                     const float *sums, int64_t sums_stride) {
    for (int64_t r = 0; r < count; r++)
        for (int64_t j = 0; j < n; j += 16) {
            __m512 s = _mm512_loadu_ps(sums + r * sums_stride + j);
            if (c->bias) {
                float b[16];
                for (int i = 0; i < 16; i++) b[i] = bf16_to_float(c->bias[o0 + j + i]);
                s = _mm512_add_ps(s, _mm512_loadu_ps(b));
            }
            _mm256_storeu_si256((__m256i *)(c->y + (row + r) * c->y_stride + o0 + j), (__m256i)_mm512_cvtneps_pbh(s));
        }
}

/* Up to DP_ROWS rows from `row` times a panel of `blocks` (1 or 2) blocks: one accumulator per row
 * and block, over the input pairs in order. R is a constant where inlined, so the sums stay in
 * registers. */
TARGET static inline __attribute__((always_inline)) void dp_rows(const Call *c, const bf16 *panel, int64_t blocks,
                                                                   int64_t row, const int R, float *sums) {
    __m512 acc[DP_ROWS][2];
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    const int64_t pairs = c->in_features / 2;
    const int32_t *x[DP_ROWS];
    for (int r = 0; r < R; r++) x[r] = (const int32_t *)(c->x + (row + r) * c->x_stride);
    if (blocks == 2) {
        for (int64_t p = 0; p < pairs; p++) {
            const __m512bh w0 = (__m512bh)_mm512_loadu_si512(panel + p * PANEL * 2);
            const __m512bh w1 = (__m512bh)_mm512_loadu_si512(panel + p * PANEL * 2 + 32);
            for (int r = 0; r < R; r++) {
                const __m512bh xr = (__m512bh)_mm512_set1_epi32(x[r][p]);
                acc[r][0] = _mm512_dpbf16_ps(acc[r][0], xr, w0);
                acc[r][1] = _mm512_dpbf16_ps(acc[r][1], xr, w1);
            }
        }
    } else {
        for (int64_t p = 0; p < pairs; p++) {
            const __m512bh w0 = (__m512bh)_mm512_loadu_si512(panel + p * PANEL * 2);
            for (int r = 0; r < R; r++)
                acc[r][0] = _mm512_dpbf16_ps(acc[r][0], (__m512bh)_mm512_set1_epi32(x[r][p]), w0);
        }
    }
    for (int r = 0; r < R; r++) {
        _mm512_storeu_ps(sums + r * PANEL, acc[r][0]);
        _mm512_storeu_ps(sums + r * PANEL + 16, acc[r][1]);
    }
}

/* The dpbf16 path for one panel: every row, DP_ROWS at a time. */
TARGET static void panel_dp(const Call *c, const bf16 *panel, int64_t o0, int64_t blocks) {
    float sums[DP_ROWS * PANEL];
    for (int64_t row = 0; row < c->rows; row += DP_ROWS) {
        const int64_t count = c->rows - row < DP_ROWS ? c->rows - row : DP_ROWS;
        switch (count) { /* a constant R for each, see dp_rows */
        case 1: dp_rows(c, panel, blocks, row, 1, sums); break;
        case 2: dp_rows(c, panel, blocks, row, 2, sums); break;
        case 3: dp_rows(c, panel, blocks, row, 3, sums); break;
        case 4: dp_rows(c, panel, blocks, row, 4, sums); break;
        case 5: dp_rows(c, panel, blocks, row, 5, sums); break;
        case 6: dp_rows(c, panel, blocks, row, 6, sums); break;
        case 7: dp_rows(c, panel, blocks, row, 7, sums); break;
        default: dp_rows(c, panel, blocks, row, 8, sums); break;
        }
        write_rows(c, row, count, o0, blocks * BLOCK, sums, PANEL);
    }
}

/* Tiles for a chunk of `count` rows (1-32): 0, 1 sums [rows 0-15][16 outputs] fp32 of block 0, 1;
 * 2, 3 the same for rows 16-31; 4, 5 x [those rows][32 inputs]; 6, 7 the panel's [16 input pairs][16
 * outputs x 2]. Tiles hold only the rows there are: no padding to copy, and a tile op on one row
 * costs less than on sixteen. */
AMX static void tile_config(int64_t count) {
    TileConfig config __attribute__((aligned(64))) = {.palette = 1};
    const uint8_t first = (uint8_t)(count < TILE_ROWS ? count : TILE_ROWS), second = (uint8_t)(count - first);
    const uint8_t rows[8] = {first, first, second, second, first, second, TILE_ROWS, TILE_ROWS};
    for (int i = 0; i < 8; i++) config.rows[i] = rows[i], config.colsb[i] = rows[i] ? 64 : 0;
    _tile_loadconfig(&config);
}

/* `count` (1-32) rows from `row` times one panel, on tiles configured for `count` rows. */
AMX static void chunk_amx(const Call *c, const bf16 *panel, int64_t o0, int64_t blocks, int64_t row, int64_t count,
                          float *sums) {
    const int64_t groups = c->in_features / GROUP, stride = c->x_stride * (int64_t)sizeof(bf16);
    const int two = count > TILE_ROWS;
    const bf16 *x = c->x + row * c->x_stride;
    _tile_zero(0);
    _tile_zero(1);
    if (two) {
        _tile_zero(2);
        _tile_zero(3);
    }
    for (int64_t g = 0; g < groups; g++) {
        const bf16 *w = panel + g * (GROUP / 2) * PANEL * 2;
        _tile_loadd(4, x + g * GROUP, stride);
        _tile_loadd(6, w, PANEL * 2 * sizeof(bf16));
        _tile_dpbf16ps(0, 4, 6);
        if (blocks == 2) {
            _tile_loadd(7, w + 32, PANEL * 2 * sizeof(bf16));
            _tile_dpbf16ps(1, 4, 7);
        }
        if (two) {
            _tile_loadd(5, x + TILE_ROWS * c->x_stride + g * GROUP, stride);
            _tile_dpbf16ps(2, 5, 6);
            if (blocks == 2) _tile_dpbf16ps(3, 5, 7);
        }
    }
    _tile_stored(0, sums, PANEL * sizeof(float));
    _tile_stored(1, sums + 16, PANEL * sizeof(float));
    if (two) {
        _tile_stored(2, sums + TILE_ROWS * PANEL, PANEL * sizeof(float));
        _tile_stored(3, sums + TILE_ROWS * PANEL + 16, PANEL * sizeof(float));
    }
    write_rows(c, row, count, o0, blocks * BLOCK, sums, PANEL);
}

/* The panels from `first` to `last` (exclusive), each dequantized once into `panel`, then every row
 * through it 32 at a time. A last chunk of fewer rows needs its own tile configuration: every
 * other panel takes it first, so that the configuration changes once a panel, not twice. */
AMX static void run_panels_amx(const Call *c, int64_t first, int64_t last, bf16 *panel, float *sums) {
    const int64_t groups = c->in_features / GROUP, block_bytes = groups * BLOCK_BYTES;
    const int64_t chunks = (c->rows + 2 * TILE_ROWS - 1) / (2 * TILE_ROWS);
    int64_t configured = 0;
    for (int64_t p = first; p < last; p++) {
        const int64_t o0 = p * PANEL, blocks = c->out_features - o0 >= PANEL ? 2 : 1;
        for (int64_t b = 0; b < blocks; b++)
            dequant_block(c->w + (o0 / BLOCK + b) * block_bytes, groups, panel + 2 * BLOCK * b, 2 * PANEL);
        for (int64_t i = 0; i < chunks; i++) {
            const int64_t chunk = (p - first) % 2 ? chunks - 1 - i : i, row = chunk * 2 * TILE_ROWS;
            const int64_t count = c->rows - row < 2 * TILE_ROWS ? c->rows - row : 2 * TILE_ROWS;
            if (count != configured) tile_config(configured = count);
            chunk_amx(c, panel, o0, blocks, row, count, sums);
        }
    }
    _tile_release();
}

TARGET static void run_panels_dp(const Call *c, int64_t first, int64_t last, bf16 *panel) {
    const int64_t groups = c->in_features / GROUP, block_bytes = groups * BLOCK_BYTES;
    for (int64_t p = first; p < last; p++) {
        const int64_t o0 = p * PANEL, blocks = c->out_features - o0 >= PANEL ? 2 : 1;
        for (int64_t b = 0; b < blocks; b++)
            dequant_block(c->w + (o0 / BLOCK + b) * block_bytes, groups, panel + 2 * BLOCK * b, 2 * PANEL);
        panel_dp(c, panel, o0, blocks);
    }
}

#endif

/* linear(threads, rows, out_features, in_features, x, x_stride, w, bias or 0, y, y_stride, amx):
 * pointers as ints, strides in elements. The caller checks shapes (parley/kernels/linear.py). */
static PyObject *linear(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 11) {
        PyErr_SetString(PyExc_TypeError, "linear takes 11 arguments");
        return NULL;
    }
    const int threads = (int)PyLong_AsLong(args[0]);
    Call c = {.rows = PyLong_AsLongLong(args[1]), .out_features = PyLong_AsLongLong(args[2]),
              .in_features = PyLong_AsLongLong(args[3]), .x = PyLong_AsVoidPtr(args[4]),
              .x_stride = PyLong_AsLongLong(args[5]), .w = PyLong_AsVoidPtr(args[6]),
              .bias = PyLong_AsVoidPtr(args[7]), .y = PyLong_AsVoidPtr(args[8]), .y_stride = PyLong_AsLongLong(args[9])};
    const int amx = PyObject_IsTrue(args[10]);
    if (PyErr_Occurred()) return NULL;
    if (!cpu_supported() || (amx && !amx_supported()) || c.out_features % BLOCK || c.in_features % GROUP) {
        PyErr_SetString(PyExc_ValueError, "q4 linear: unsupported CPU or shape");
        return NULL;
    }
#if PARLEY_SIMD
    const int64_t panels = (c.out_features + PANEL - 1) / PANEL;
    const int team = threads < 1 ? 1 : (panels < threads ? (int)panels : threads);
    /* per thread: the panel [in / 2][32][2] bf16, then AMX's sums [32][32] fp32 */
    const size_t panel_bytes = sizeof(bf16) * (size_t)(c.in_features * PANEL);
    const size_t per_thread = panel_bytes + (amx ? sizeof(float) * 2 * TILE_ROWS * PANEL : 0);
    char *scratch = aligned_alloc(64, (team * per_thread + 63) / 64 * 64);
    if (scratch == NULL) return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel num_threads(team) if (team > 1)
    {
        int me = 0;
#ifdef _OPENMP
        me = omp_get_thread_num();
#endif
        char *mine = scratch + me * per_thread;
        const int64_t first = panels * me / team, last = panels * (me + 1) / team;
        if (amx)
            run_panels_amx(&c, first, last, (bf16 *)mine, (float *)(mine + panel_bytes));
        else
            run_panels_dp(&c, first, last, (bf16 *)mine);
    }
    Py_END_ALLOW_THREADS
    free(scratch);
#endif
    Py_RETURN_NONE;
}

/* dequantize(out_features, in_features, w, out): the weights [out][in] bf16, as the kernel uses them. */
static PyObject *dequantize(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "dequantize takes 4 arguments");
        return NULL;
    }
    const int64_t out_features = PyLong_AsLongLong(args[0]), in_features = PyLong_AsLongLong(args[1]);
    const uint8_t *w = PyLong_AsVoidPtr(args[2]);
    bf16 *out = PyLong_AsVoidPtr(args[3]);
    if (PyErr_Occurred()) return NULL;
    if (!cpu_supported() || out_features % BLOCK || in_features % GROUP) {
        PyErr_SetString(PyExc_ValueError, "q4 dequantize: unsupported CPU or shape");
        return NULL;
    }
#if PARLEY_SIMD
    bf16 *panel = malloc(sizeof(bf16) * (size_t)(in_features * BLOCK));
    if (panel == NULL) return PyErr_NoMemory();
    const int64_t groups = in_features / GROUP;
    for (int64_t b = 0; b < out_features / BLOCK; b++) {
        dequant_block(w + b * groups * BLOCK_BYTES, groups, panel, 2 * BLOCK);
        for (int64_t p = 0; p < in_features / 2; p++)
            for (int64_t j = 0; j < 2 * BLOCK; j++) out[(b * BLOCK + j / 2) * in_features + 2 * p + j % 2] = panel[p * 2 * BLOCK + j];
    }
    free(panel);
#endif
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"amx", amx, METH_NOARGS, "Whether this CPU and process can run the kernel on AMX tiles."},
    {"dequantize", (PyCFunction)(void (*)(void))dequantize, METH_FASTCALL, "The weights in bf16, as the kernel sees them."},
    {"linear", (PyCFunction)(void (*)(void))linear, METH_FASTCALL, "y = x W^T (+ bias) for 4-bit W."},
    {"supported", supported, METH_NOARGS, "Whether this CPU runs the kernel (AVX512-BF16)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_q4", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__q4(void) { return PyModule_Create(&module); }
