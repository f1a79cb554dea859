/* y = x W^T (+ bias) with W in 4 bits, as GGUF's Q4_1 (and Q4_0) keeps it, or in 8 bits as Q8_0
 * does (see dequant_pair8), for x in bf16 on x86 CPUs with AVX512-BF16: on AMX tiles where the CPU
 * has them, else on VNNI with x rounded to 8 bits (see quantize_row).
 *
 * Why a kernel: a decode step reads every weight once, and with few rows that is what it waits on.
 * In bf16 the default model's projections are 212 MB a step; in 4 bits a quarter of that. torch's
 * own 4-bit CPU kernel dequantizes again for each row, so it lost to bf16 from 8 rows on; this one
 * dequantizes a panel of weights once per call and runs every row through it.
 *
 * The weights: w[o][k] = bf16(d * q + m) for q in 0..15 and d, m fp16 per 32 inputs of an output
 * (a Q4_1 block), computed in fp32 (d * q is exact, so one rounding to fp32, then one to bf16: the
 * bits of gguf's dequantized float32 weights cast to bf16, the weights a bf16 model loaded from the
 * same file had before). Packed per 16 outputs and two groups of 32 inputs as 640 bytes: d [2][16]
 * and m [2][16] fp16, then per output 32 bytes, byte i holding input i of the first group (low
 * nibble) and of the second (high nibble) (parley/kernels/linear.py packs it; an odd last group has
 * an empty second). That is the AMX path's layout; the VNNI path's has d and m where they are and
 * the values laid out for vpdpbusd (see there).
 *
 * Dequantizing is most of a one-row call, so it is a table lookup: an output's 32 inputs of a group
 * take one of 16 values, computed once (one fma for all 16, one rounding to bf16), and one vpermw
 * puts them in place: ~10 vector ops per 64 weights against ~20 converting each weight (the
 * default model's projections at one row, a step's worth on a Xeon, when a dpbf16 path used it too:
 * 5.9 -> 3.8 ms). The panel it fills is [groups][32 outputs][32 inputs]: an output's group is one
 * table's lookup and an AMX tile row.
 *
 * Batch invariance by construction: every row of x is multiplied by the panel with a sum per
 * output whose order does not depend on the other rows: on AMX tiles W is the left operand (16
 * outputs x 32 inputs) and x's input pairs the right ([16 pairs][rows][2]), each element of the
 * product its own fp32 sum over the pairs in order; on VNNI exact integer sums per group of 32, the
 * groups added in order. So a row's bits do not depend on how many rows the call has, where the
 * row sits, or the number of threads. The two paths round differently; a process takes one path for
 * every call (`amx`).
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

#define GROUP 32        /* inputs per d, m */
#define BLOCK 16        /* outputs per block */
#define Q4_PAIR 640     /* one block's two groups in 4 bits: d, m, nibbles */
#define Q8_PAIR 1088    /* in 8 bits: d, bytes */
#define PANEL 32        /* outputs dequantized together */
#define PANEL_GROUP (PANEL * GROUP) /* bf16 of a group of the panel */
#define TILE_ROWS 16

typedef struct {
    float d, s;  /* VNNI: a row's group of inputs is d * xq, and s = d * sum(xq) (see quantize_row) */
    int32_t sum; /* sum(xq) */
} XScale;

typedef struct {
    int64_t rows, out_features, in_features, x_stride, y_stride;
    const bf16 *x, *bias;
    const uint8_t *w;
    bf16 *y;
    uint32_t *xt;      /* AMX: x's input pairs, [16-row chunk][in_features / 2][16 rows] */
    int8_t *xq;        /* VNNI: x in 8 bits, [rows][in_features] */
    XScale *xs;        /* VNNI: [rows][in_features / 32] */
    int bits;          /* 4 or 8 */
    int64_t pair_bytes, block_bytes; /* a block's pair of groups; a block's groups */
} Call;

#if PARLEY_SIMD

/* One block of 16 outputs, a pair of groups (the second only if `second`) -> output j's first
 * group at out + j * GROUP, its second `stride` bf16 further. */
TARGET static inline void dequant_pair4(const uint8_t *w, bf16 *out, int64_t stride, int second) {
    const __m512 q = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i sixteen = _mm512_set1_epi16(16);
    float dm[4][BLOCK] __attribute__((aligned(64))); /* d and m of both groups, in fp32 */
    for (int i = 0; i < 4; i++) _mm512_store_ps(dm[i], _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(w + 32 * i))));
    /* read back from memory: broadcasts from memory cost no vector op; from registers (what the
     * compiler would do) they are permutes on the port the lookups need */
    __asm__ volatile("" ::: "memory");
    for (int j = 0; j < BLOCK; j++) {
        /* both groups' 16 values in one table: the second's first, then the first's. vpermw reads an
         * index's low 5 bits: a byte's high nibble shifted down picks from the second's, the byte
         * with bit 4 set from the first's (its low nibble in bits 0-3) */
        const __m512 values = _mm512_fmadd_ps(q, _mm512_set1_ps(dm[0][j]), _mm512_set1_ps(dm[2][j]));
        const __m512 next = _mm512_fmadd_ps(q, _mm512_set1_ps(dm[1][j]), _mm512_set1_ps(dm[3][j]));
        const __m512i table = (__m512i)_mm512_cvtne2ps_pbh(values, next);
        const __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(w + 128 + 32 * j)));
        _mm512_storeu_si512(out + j * GROUP, _mm512_permutexvar_epi16(_mm512_or_si512(bytes, sixteen), table));
        if (second)
            _mm512_storeu_si512(out + stride + j * GROUP, _mm512_permutexvar_epi16(_mm512_srli_epi16(bytes, 4), table));
    }
}

/* The same for 8 bits (GGUF's Q8_0): w = bf16(d * q) for q in -128..127 (d * q exact in fp32, as
 * in gguf's float32 weights), packed as d [2][16] fp16, then per output 64 bytes, the first group's
 * 32 then the second's. No table: converting each weight costs ~8 vector ops per 32 here. The
 * default model's Q8_0 lm_head (49152 x 576) at one row on a Xeon, from L3: 1.06 ms, against 1.15 for
 * oneDNN on its bf16 copy; in a decode step, where it comes from memory: 1.79 -> 1.74 ms on AMX
 * (at 32 rows 0.3-0.6 ms slower); and 26 MB less than that copy. */
TARGET static inline void dequant_pair8(const uint8_t *w, bf16 *out, int64_t stride, int second) {
    float d[2][BLOCK] __attribute__((aligned(64)));
    for (int i = 0; i < 2; i++) _mm512_store_ps(d[i], _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(w + 32 * i))));
    __asm__ volatile("" ::: "memory"); /* broadcasts from memory, see dequant_pair4 */
    for (int j = 0; j < BLOCK; j++)
        for (int h = 0; h < 1 + second; h++) {
            const uint8_t *q = w + 64 + 64 * j + 32 * h;
            const __m512 scale = _mm512_set1_ps(d[h][j]);
            const __m512 lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)q))), scale);
            const __m512 hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + 16)))), scale);
            _mm512_storeu_si512(out + h * stride + j * GROUP, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
        }
}

TARGET static inline void dequant_pair(const uint8_t *w, bf16 *out, int64_t stride, int second, int bits) {
    if (bits == 8)
        dequant_pair8(w, out, stride, second);
    else
        dequant_pair4(w, out, stride, second);
}

/* One block of 16 outputs, all groups -> output j's group g at out + g * stride + j * GROUP. */
TARGET static void dequant_block(const uint8_t *w, int64_t groups, bf16 *out, int64_t stride, int bits) {
    const int64_t pair = bits == 8 ? Q8_PAIR : Q4_PAIR;
    for (int64_t g = 0; g < groups; g += 2, w += pair) dequant_pair(w, out + g * stride, stride, g + 1 < groups, bits);
}

/* The 16 x 16 matrix of 32-bit values in r[0..15] (row i in r[i]) transposed in place. */
TARGET static inline void transpose16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int i = 0; i < 4; i++) { /* 128-bit lane L of r[4a + i] holds column 4L + i, rows 4a.. 4a + 3 */
        t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
        t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);
        t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
        t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
    }
    for (int i = 0; i < 8; i++) {
        r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
    }
}

/* y[row][o0 + j] = bf16(sums[j] + bias) for the 16 outputs of a block. */
TARGET static inline void write_sums(const Call *c, __m512 sums, int64_t row, int64_t o0) {
    if (c->bias) sums = _mm512_add_ps(sums, load_bf16(c->bias + o0));
    store_bf16(c->y + row * c->y_stride + o0, sums);
}

/* x's rows from 16 * chunk, pairs 16 * part.. + 16, into xt: [chunk][pair][16 rows] (rows past the
 * last read as 0). */
TARGET static void pack_x(const Call *c, int64_t chunk, int64_t part) {
    __m512i r[16];
    for (int64_t i = 0; i < 16; i++) {
        const int64_t row = chunk * TILE_ROWS + i;
        r[i] = row < c->rows ? _mm512_loadu_si512(c->x + row * c->x_stride + part * GROUP) : _mm512_setzero_si512();
    }
    transpose16(r);
    uint32_t *out = c->xt + (chunk * (c->in_features / 2) + part * 16) * TILE_ROWS;
    for (int i = 0; i < 16; i++) _mm512_storeu_si512(out + i * TILE_ROWS, r[i]);
}

/* AMX's tile configuration: tile i has 16 rows of colsb[i] bytes (none if 0). */
AMX static void configure(const uint16_t colsb[8]) {
    TileConfig config __attribute__((aligned(64))) = {.palette = 1};
    for (int i = 0; i < 8; i++) config.colsb[i] = colsb[i], config.rows[i] = colsb[i] ? TILE_ROWS : 0;
    _tile_loadconfig(&config);
}

/* Calls of more than 16 rows, a chunk of `count` rows (1-32): 0, 1 the sums [16 outputs][rows 0-15]
 * of the panel's blocks 0, 1; 2, 3 the same for rows 16-31; 4, 5 x's [16 input pairs][those
 * rows][2]; 6, 7 the blocks' [16 outputs][32 inputs]. Tiles hold only the rows there are. */
AMX static void configure_wide(int64_t count) {
    const uint16_t first = (uint16_t)(count < TILE_ROWS ? count : TILE_ROWS), second = (uint16_t)(count - first);
    const uint16_t colsb[8] = {4 * first, 4 * first, 4 * second, 4 * second, 4 * first, 4 * second, 64, 64};
    configure(colsb);
}

/* Calls of up to 16 rows: 0-3 the sums [16 outputs][rows] of four blocks (two panels), 4 x's pairs,
 * 6 and 7 the blocks in turn. A tile product waits for the one before it on the same sums: with
 * four sums in flight instead of two, a one-row step's projections took 4.9 ms instead of 5.6
 * (before narrow_amx dequantized just in time). */
AMX static void configure_narrow(int64_t count) {
    const uint16_t n = (uint16_t)(4 * count), colsb[8] = {n, n, n, n, n, 0, 64, 64};
    configure(colsb);
}

AMX static inline void store_tile(int t, float *sums, int64_t stride) {
    switch (t) { /* tile numbers are immediates */
    case 0: _tile_stored(0, sums, stride); break;
    case 1: _tile_stored(1, sums, stride); break;
    case 2: _tile_stored(2, sums, stride); break;
    default: _tile_stored(3, sums, stride); break;
    }
}

/* Sums tile t, [16 outputs][rows] fp32, into y's rows from `row`, outputs from o0: one row stored
 * in a row's order; more transposed. */
AMX static void write_tile(const Call *c, int t, float *sums, int64_t row, int64_t rows, int64_t o0) {
    if (rows == 1) {
        store_tile(t, sums, sizeof(float));
        write_sums(c, _mm512_load_ps(sums), row, o0);
        return;
    }
    store_tile(t, sums, TILE_ROWS * sizeof(float));
    __m512i r[16];
    for (int i = 0; i < 16; i++) r[i] = _mm512_load_si512(sums + 16 * i);
    transpose16(r);
    for (int64_t i = 0; i < rows; i++) write_sums(c, _mm512_castsi512_ps(r[i]), row + i, o0);
}

/* The 32-row chunk `chunk` (`count` rows) times one panel, on the wide tiles. */
AMX static void chunk_amx(const Call *c, const bf16 *panel, int64_t o0, int64_t blocks, int64_t chunk, int64_t count,
                          float *sums) {
    const int64_t groups = c->in_features / GROUP, pairs = c->in_features / 2;
    const int two = count > TILE_ROWS;
    const uint32_t *x0 = c->xt + 2 * chunk * pairs * TILE_ROWS, *x1 = x0 + pairs * TILE_ROWS;
    _tile_zero(0);
    _tile_zero(1);
    if (two) {
        _tile_zero(2);
        _tile_zero(3);
    }
    for (int64_t g = 0; g < groups; g++) {
        const bf16 *w = panel + g * PANEL_GROUP;
        _tile_loadd(4, x0 + g * GROUP / 2 * TILE_ROWS, 64);
        _tile_loadd(6, w, 64);
        _tile_dpbf16ps(0, 6, 4);
        if (blocks == 2) {
            _tile_loadd(7, w + BLOCK * GROUP, 64);
            _tile_dpbf16ps(1, 7, 4);
        }
        if (two) {
            _tile_loadd(5, x1 + g * GROUP / 2 * TILE_ROWS, 64);
            _tile_dpbf16ps(2, 6, 5);
            if (blocks == 2) _tile_dpbf16ps(3, 7, 5);
        }
    }
    const int64_t row = chunk * 2 * TILE_ROWS;
    for (int64_t b = 0; b < blocks; b++) {
        write_tile(c, (int)b, sums, row, two ? TILE_ROWS : count, o0 + b * BLOCK);
        if (two) write_tile(c, 2 + (int)b, sums, row + TILE_ROWS, count - TILE_ROWS, o0 + b * BLOCK);
    }
}

/* Every row (at most 16) times up to four blocks from output o0, on the narrow tiles: x's pairs at
 * `x`, `x_bytes` apart (xt; for one row the row itself, its pairs 4 bytes apart). A narrow call
 * reads each weight once, so a pair of groups is dequantized just before its products, into
 * `panel` ([2 groups][64 outputs][32 inputs]), where the tiles load it from L1: a one-row step's
 * projections took 3.4 ms, against 5.3 dequantizing the whole panel first into L2. */
AMX static void narrow_amx(const Call *c, bf16 *panel, int64_t o0, int64_t blocks, const void *x, int64_t x_bytes,
                           float *sums) {
    const int64_t groups = c->in_features / GROUP, block_bytes = c->block_bytes;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t g = 0; g < groups; g++) {
        const bf16 *w = panel + g % 2 * 2 * PANEL_GROUP;
        if (g % 2 == 0)
            for (int64_t b = 0; b < blocks; b++)
                dequant_pair(c->w + (o0 / BLOCK + b) * block_bytes + g / 2 * c->pair_bytes, panel + b * BLOCK * GROUP,
                             2 * PANEL_GROUP, g + 1 < groups, c->bits);
        _tile_loadd(4, (const char *)x + g * GROUP / 2 * x_bytes, x_bytes);
        _tile_loadd(6, w, 64);
        _tile_dpbf16ps(0, 6, 4);
        if (blocks > 1) {
            _tile_loadd(7, w + BLOCK * GROUP, 64);
            _tile_dpbf16ps(1, 7, 4);
        }
        if (blocks > 2) {
            _tile_loadd(6, w + 2 * BLOCK * GROUP, 64);
            _tile_dpbf16ps(2, 6, 4);
        }
        if (blocks > 3) {
            _tile_loadd(7, w + 3 * BLOCK * GROUP, 64);
            _tile_dpbf16ps(3, 7, 4);
        }
    }
    for (int64_t b = 0; b < blocks; b++) write_tile(c, (int)b, sums, 0, c->rows, o0 + b * BLOCK);
}

/* The panels from `first` to `last` (exclusive), each dequantized once into `panel`, then every row
 * through it: up to 16 rows two panels at a time (see configure_narrow); more 32 rows at a time. A
 * last chunk of fewer rows needs its own tile configuration: every other panel takes it first, so
 * that the configuration changes once a panel, not twice. */
AMX static void run_panels_amx(const Call *c, int64_t first, int64_t last, bf16 *panel, float *sums) {
    const int64_t groups = c->in_features / GROUP, block_bytes = c->block_bytes;
    if (c->rows <= TILE_ROWS) {
        const int64_t end = last * PANEL < c->out_features ? last * PANEL : c->out_features;
        configure_narrow(c->rows);
        for (int64_t o0 = first * PANEL; o0 < end; o0 += 2 * PANEL) {
            const int64_t blocks = (end - o0) / BLOCK < 4 ? (end - o0) / BLOCK : 4;
            if (c->rows == 1)
                narrow_amx(c, panel, o0, blocks, c->x, 4, sums);
            else
                narrow_amx(c, panel, o0, blocks, c->xt, TILE_ROWS * 4, sums);
        }
        _tile_release();
        return;
    }
    const int64_t chunks = (c->rows + 2 * TILE_ROWS - 1) / (2 * TILE_ROWS);
    int64_t configured = 0;
    for (int64_t p = first; p < last; p++) {
        const int64_t o0 = p * PANEL, blocks = c->out_features - o0 >= PANEL ? 2 : 1;
        for (int64_t b = 0; b < blocks; b++)
            dequant_block(c->w + (o0 / BLOCK + b) * block_bytes, groups, panel + b * BLOCK * GROUP, PANEL_GROUP,
                              c->bits);
        for (int64_t i = 0; i < chunks; i++) {
            const int64_t chunk = (p - first) % 2 ? chunks - 1 - i : i, row = chunk * 2 * TILE_ROWS;
            const int64_t count = c->rows - row < 2 * TILE_ROWS ? c->rows - row : 2 * TILE_ROWS;
            if (count != configured) configure_wide(configured = count);
            chunk_amx(c, panel, o0, blocks, chunk, count, sums);
        }
    }
    _tile_release();
}

/* 4- and 8-bit weights times 8-bit activations on AVX512-VNNI: the path of CPUs without AMX (AMD's).
 *
 * Why: with many rows the dpbf16 path this replaced was bound by vdpbf16ps, 32 multiply-adds an
 * instruction, and the default model's projections took ~1 ms a row (bench/quant.py at 512 rows:
 * 527 ms; oneDNN's own bf16 kernel 506 ms), so a prompt could not prefill faster than ~900 tok/s.
 * vpdpbusd does 64 (bytes times bytes into 32-bit sums), and on a Xeon runs 2.6x as many of them a
 * cycle (4.9 against 1.8 a ns a core, measured). llama.cpp multiplies Q4_1 and Q8_0 weights by
 * 8-bit activations on it.
 *
 * The arithmetic, the same at every number of rows: each row's group of 32 inputs is quantized on
 * its own, d = max |x| / 127, xq = round(x * 127 / max |x|) (to nearest even), s = d * sum(xq);
 * then per output, over the groups in order, in fp32:
 *     acc = fma(float(sum q * xq), d_w * d, acc); acc = fma(m_w, s, acc)   (8 bits: no m_w)
 * (w = d_w q + m_w, so sum w x ~ d_w d sum(q xq) + m_w d sum(xq)), and y = bf16(acc + bias). The
 * integer sums are exact (at most 32 * 128 * 255), so how the lanes add them up does not matter: a
 * row's bits depend on its own values only. The weights are those GGUF stores, d_w q (+ m_w) in
 * fp32, not rounded to bf16 as on AMX; x is rounded to 8 bits per group, as llama.cpp's activations
 * are (quality against the bf16 path: BENCHMARKS.md).
 *
 * vpdpbusd wants, per 32-bit lane, 4 consecutive inputs of one output, one operand unsigned: the
 * weights are laid out so at load (parley/kernels/linear.py's pack, in a process without AMX), a
 * block's group as [8][16 outputs][4 inputs] bytes, so that each 64-byte load is an operand as it
 * is. 4 bits: a pair's two groups in the low and high nibbles of one such 512 bytes; 8 bits: q + 128,
 * the pair's groups one after the other, and 128 times the row's sum of the group's xq comes off
 * again. Before, the weights were kept as for AMX and transposed in every call (24 permutes for a
 * block's pair of groups). Measured on an AMD EPYC (Zen 5, 2 cores), old and new one after the
 * other: bench/quant.py, a step's projections at 1 / 8 / 32 rows 3.27 / 4.83 / 9.91 -> 2.41 / 4.35 /
 * 9.09 ms; served over HTTP at concurrency 1 (bench/run.py, three runs each) 97-113 -> 138-193
 * tok/s. The same integer sums, so the same bits. */
#define VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vnni")))
#define VNNI_GROUP 512 /* bytes of one block's group: [8][16 outputs][4 inputs] */

/* x's row quantized to 8 bits per group of 32, as described above, into c->xq and c->xs. */
VNNI static void quantize_row(const Call *c, int64_t row) {
    const int64_t groups = c->in_features / GROUP;
    const bf16 *x = c->x + row * c->x_stride;
    int8_t *q = c->xq + row * c->in_features;
    XScale *s = c->xs + row * groups;
    const __m512 magnitude = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
    for (int64_t g = 0; g < groups; g++) {
        const __m512 lo = load_bf16(x + g * GROUP), hi = load_bf16(x + g * GROUP + 16);
        const float most = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_and_ps(lo, magnitude), _mm512_and_ps(hi, magnitude)));
        const __m512 scale = _mm512_set1_ps(most > 0 ? 127.0f / most : 0.0f);
        const __m512i qlo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, scale)), qhi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, scale));
        _mm_storeu_si128((__m128i *)(q + g * GROUP), _mm512_cvtsepi32_epi8(qlo));
        _mm_storeu_si128((__m128i *)(q + g * GROUP + 16), _mm512_cvtsepi32_epi8(qhi));
        s[g].sum = _mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi));
        s[g].d = most / 127.0f;
        s[g].s = s[g].d * (float)s[g].sum;
    }
}

/* d_w and (4 bits) m_w of group g of the block of outputs from o0, in fp32. */
VNNI static inline void load_scales(const Call *c, int64_t o0, int64_t g, __m512 *d, __m512 *m) {
    const uint8_t *scales = c->w + o0 / BLOCK * c->block_bytes + g / 2 * c->pair_bytes + g % 2 * 32;
    *d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)scales));
    if (m) *m = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(scales + 64)));
}

/* R rows (1 or 4) from `row` times NB blocks (1 or 2) from output o0, group g, read where the weights
 * lie: the weights are vpdpbusd's unsigned bytes, x's the signed. The integer sums are exact; then
 * acc[r][b] as the comment above says (8 bits: no m_w). R, NB and bits are constants where inlined. */
VNNI static inline __attribute__((always_inline)) void group_vnni(const Call *c, int64_t o0, int64_t g, int64_t row,
                                                                  __m512 acc[4][2], const int R, const int NB,
                                                                  const int bits) {
    const int64_t groups = c->in_features / GROUP;
    const int high = bits == 4 && g % 2; /* 4 bits: the pair's second group, in the high nibbles */
    const __m512i nibble = _mm512_set1_epi8(0x0f);
    const uint8_t *w[2];
    for (int b = 0; b < NB; b++)
        w[b] = c->w + (o0 / BLOCK + b) * c->block_bytes + g / 2 * c->pair_bytes + (bits == 4 ? 128 : 64 + g % 2 * VNNI_GROUP);
    __m512i sums[4][2];
    for (int r = 0; r < R; r++)
        for (int b = 0; b < NB; b++) sums[r][b] = _mm512_setzero_si512();
    for (int k = 0; k < 8; k++) {
        __m512i wk[2];
        for (int b = 0; b < NB; b++) {
            wk[b] = _mm512_loadu_si512(w[b] + 64 * k);
            if (bits == 4) wk[b] = _mm512_and_si512(high ? _mm512_srli_epi16(wk[b], 4) : wk[b], nibble);
        }
        for (int r = 0; r < R; r++) {
            const int8_t *four = c->xq + (row + r) * c->in_features + g * GROUP + 4 * k;
            if (R == 1) { /* x broadcast by each vpdpbusd itself ({1to16}; gcc will not, so in asm): the
                             same sums; a decode step's projections at one row 5% faster on an AMD EPYC
                             (both builds alternated in one process), at 4 rows slower (twice the loads) */
                typedef int32_t __attribute__((may_alias)) Bytes4; /* the four int8s as one operand */
                for (int b = 0; b < NB; b++)
                    __asm__("vpdpbusd %[x]%{1to16%}, %[w], %[a]" : [a] "+v"(sums[r][b]) : [w] "v"(wk[b]), [x] "m"(*(const Bytes4 *)four));
                continue;
            }
            int32_t bytes;
            memcpy(&bytes, four, sizeof(bytes));
            const __m512i xr = _mm512_set1_epi32(bytes);
            for (int b = 0; b < NB; b++) sums[r][b] = _mm512_dpbusd_epi32(sums[r][b], wk[b], xr);
        }
    }
    for (int b = 0; b < NB; b++) {
        __m512 d, m;
        load_scales(c, o0 + b * BLOCK, g, &d, bits == 4 ? &m : NULL);
        for (int r = 0; r < R; r++) {
            const XScale x = c->xs[(row + r) * groups + g];
            /* the one order every row takes, so that a row's bits depend on the row alone */
            if (bits == 8) sums[r][b] = _mm512_sub_epi32(sums[r][b], _mm512_set1_epi32(128 * x.sum));
            acc[r][b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[r][b]), _mm512_mul_ps(d, _mm512_set1_ps(x.d)), acc[r][b]);
            if (bits == 4) acc[r][b] = _mm512_fmadd_ps(m, _mm512_set1_ps(x.s), acc[r][b]);
        }
    }
}

/* R rows from `row` times NB blocks from o0, the groups in order; with next_blocks (the first rows'
 * pass over a panel, see run_panels_vnni), the next panel's pair of groups on its way as each pair
 * starts. */
VNNI static inline __attribute__((always_inline)) void rows_vnni(const Call *c, int64_t o0, int64_t row, const int R,
                                                                 const int NB, const int bits, int next_blocks) {
    const int64_t groups = c->in_features / GROUP;
    __m512 acc[4][2];
    for (int r = 0; r < R; r++)
        for (int b = 0; b < NB; b++) acc[r][b] = _mm512_setzero_ps();
    const char *next = (const char *)c->w + (o0 / BLOCK + NB) * c->block_bytes;
    for (int64_t g = 0; g < groups; g++) {
        if (next_blocks && g % 2 == 0)
            for (int b = 0; b < next_blocks; b++)
                for (int64_t at = 0; at < c->pair_bytes; at += 64)
                    _mm_prefetch(next + b * c->block_bytes + g / 2 * c->pair_bytes + at, _MM_HINT_T0);
        group_vnni(c, o0, g, row, acc, R, NB, bits);
    }
    for (int r = 0; r < R; r++)
        for (int b = 0; b < NB; b++) write_sums(c, acc[r][b], row + r, o0 + b * BLOCK);
}

/* rows_vnni with its constants spelled out, so that each combination is compiled on its own */
VNNI static void rows_vnni_for(const Call *c, int64_t o0, int64_t row, int R, int NB, int next_blocks) {
#define ROWS(R_, NB_)                                                                                                  \
    if (R == R_ && NB == NB_) {                                                                                        \
        if (c->bits == 4) rows_vnni(c, o0, row, R_, NB_, 4, next_blocks);                                              \
        else rows_vnni(c, o0, row, R_, NB_, 8, next_blocks);                                                           \
        return;                                                                                                        \
    }
    ROWS(4, 2) ROWS(4, 1) ROWS(1, 2) ROWS(1, 1)
#undef ROWS
}

/* The outputs of panel p: 2 blocks, or 1 for a last odd one. */
static inline int panel_blocks(const Call *c, int64_t p) { return c->out_features - p * PANEL >= PANEL ? 2 : 1; }

/* Panel p's weights on their way into the caches (its one or two blocks lie one after the other). */
static inline void prefetch_panel(const Call *c, int64_t p) {
    const char *panel = (const char *)c->w + p * 2 * c->block_bytes;
    for (int64_t at = 0; at < panel_blocks(c, p) * c->block_bytes; at += 64) _mm_prefetch(panel + at, _MM_HINT_T0);
}

/* The 8-bit-activation path for the panels from `first` to `last` (exclusive): every row through a
 * panel's weights, which stay in L1 from one rows' pass to the next. The next panel's weights are
 * prefetched: a call streams 0.3-1.1 MB of weights (a decode step ~75 MB), and with the hardware
 * prefetchers alone a call of a few rows waited on DRAM. Prefetched whole as a panel started, both
 * builds alternated in one process on an AMD EPYC (Zen 5; bench/quant.py's step, lm_head included):
 * 1 row 3.12-3.22 -> 2.22-2.56 ms, 4 rows 4.95-5.83 -> 3.08-3.78, 32 rows 11.4-12.5 -> 10.3-10.7, 512
 * rows unchanged (134); two panels ahead, or into L2 only (T1), gained less. Then spread over the
 * panel, a pair of groups at a time as the first rows' pass reaches the same pair (rows_vnni): on an
 * AMD EPYC Zen 4 (CPU family 25, ~30 GB/s), where 15% of a one-request decode step's samples sat on
 * the burst's prefetch instructions, the engine alone (128-token sampled requests, the two builds
 * in alternate processes, 4 rounds) went 229.7 -> 234.8 tok/s at concurrency 1 and 777 -> 830 at 8
 * (medians), 2% faster at 32 in each of 3 rounds, and prefill at 2,000 tokens unchanged. */
VNNI static void run_panels_vnni(const Call *c, int64_t first, int64_t last) {
    for (int64_t p = first; p < last; p++) {
        const int64_t o0 = p * PANEL;
        const int blocks = panel_blocks(c, p);
        const int next = p + 1 < last ? panel_blocks(c, p + 1) : 0;
        int64_t row = 0;
        for (; row + 4 <= c->rows; row += 4) rows_vnni_for(c, o0, row, 4, blocks, row == 0 ? next : 0);
        for (; row < c->rows; row++) rows_vnni_for(c, o0, row, 1, blocks, row == 0 ? next : 0);
    }
}

#endif

/* Whether the CPU has AVX512-VNNI (every CPU with AVX512-BF16 does: Cooper Lake, Sapphire Rapids, Zen 4). */
static int vnni_supported(void) {
#if PARLEY_SIMD
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512vnni");
#else
    return 0;
#endif
}

/* y = x W^T (+ bias): pointers, strides in elements; the caller checks shapes (parley/kernels/linear.py).
 * NULL, or what went wrong (see cpu.h's entry points). */
static const char *quant_linear(int threads, int64_t rows, int64_t out_features, int64_t in_features, const bf16 *x,
                                int64_t x_stride, const uint8_t *w, const bf16 *bias, bf16 *y, int64_t y_stride,
                                int amx, int bits) {
    Call c = {.rows = rows, .out_features = out_features, .in_features = in_features, .x = x, .x_stride = x_stride,
              .w = w, .bias = bias, .y = y, .y_stride = y_stride, .bits = bits};
    if (!cpu_supported() || (amx && !amx_supported()) || (!amx && !vnni_supported()) || c.out_features % BLOCK ||
        c.in_features % GROUP || (c.bits != 4 && c.bits != 8))
        return "quantized linear: unsupported CPU, shape or bits";
    c.pair_bytes = c.bits == 8 ? Q8_PAIR : Q4_PAIR;
    c.block_bytes = (c.in_features / GROUP + 1) / 2 * c.pair_bytes;
#if PARLEY_SIMD
    const int64_t panels = (c.out_features + PANEL - 1) / PANEL, pairs = c.in_features / 2;
    const int64_t chunks = c.rows > 1 ? (c.rows + TILE_ROWS - 1) / TILE_ROWS : 0, parts = pairs / 16;
    const int team = threads < 1 ? 1 : (panels < threads ? (int)panels : threads);
    /* per thread, on AMX: the panel ([in / 32][64][32] bf16, two panels, see configure_narrow), then
     * the sums [16][16] fp32; then AMX's x pairs, or VNNI's x in 8 bits and its scales */
    const size_t panel_bytes = sizeof(bf16) * (size_t)(c.in_features * 2 * PANEL);
    const size_t per_thread = amx ? panel_bytes + sizeof(float) * TILE_ROWS * TILE_ROWS : 0;
    const size_t xt_bytes = amx ? sizeof(uint32_t) * (size_t)(chunks * pairs * TILE_ROWS) : 0;
    const size_t xq_bytes = amx ? 0 : (size_t)(c.rows * c.in_features + 63) / 64 * 64;
    const size_t xs_bytes = amx ? 0 : sizeof(XScale) * (size_t)(c.rows * (c.in_features / GROUP));
    char *scratch = aligned_alloc(64, (team * per_thread + xt_bytes + xq_bytes + xs_bytes + 63) / 64 * 64);
    if (scratch == NULL) return KERNEL_NO_MEMORY;
    c.xt = (uint32_t *)(scratch + team * per_thread);
    c.xq = (int8_t *)(scratch + team * per_thread + xt_bytes);
    c.xs = (XScale *)(scratch + team * per_thread + xt_bytes + xq_bytes);
#pragma omp parallel num_threads(team) if (team > 1)
    {
        int me = 0;
#ifdef _OPENMP
        me = omp_get_thread_num();
#endif
        char *mine = scratch + me * per_thread;
        const int64_t first = panels * me / team, last = panels * (me + 1) / team;
        if (amx) {
#pragma omp for /* one row is read as it lies (narrow_amx) */
            for (int64_t i = 0; i < chunks * parts; i++) pack_x(&c, i / parts, i % parts);
            run_panels_amx(&c, first, last, (bf16 *)mine, (float *)(mine + panel_bytes));
        } else {
            /* this thread's first panel on its way while the rows are quantized (run_panels_vnni
               prefetches the next ones): a step's projections at 1 and 4 rows 2-3% faster */
            prefetch_panel(&c, first);
#pragma omp for
            for (int64_t row = 0; row < c.rows; row++) quantize_row(&c, row);
            run_panels_vnni(&c, first, last);
        }
    }
    free(scratch);
#else
    (void)threads;
#endif
    return NULL;
}

/* linear(threads, rows, out_features, in_features, x, x_stride, w, bias or 0, y, y_stride, amx, bits):
 * quant_linear's arguments, pointers as ints. */
static PyObject *linear(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 12) {
        PyErr_SetString(PyExc_TypeError, "linear takes 12 arguments");
        return NULL;
    }
    const int threads = (int)PyLong_AsLong(args[0]);
    const int64_t rows = PyLong_AsLongLong(args[1]), out_features = PyLong_AsLongLong(args[2]),
                  in_features = PyLong_AsLongLong(args[3]), x_stride = PyLong_AsLongLong(args[5]),
                  y_stride = PyLong_AsLongLong(args[9]);
    const bf16 *x = PyLong_AsVoidPtr(args[4]), *bias = PyLong_AsVoidPtr(args[7]);
    const uint8_t *w = PyLong_AsVoidPtr(args[6]);
    bf16 *y = PyLong_AsVoidPtr(args[8]);
    const int amx = PyObject_IsTrue(args[10]), bits = (int)PyLong_AsLong(args[11]);
    if (PyErr_Occurred()) return NULL;
    const char *error;
    Py_BEGIN_ALLOW_THREADS
    error = quant_linear(threads, rows, out_features, in_features, x, x_stride, w, bias, y, y_stride, amx, bits);
    Py_END_ALLOW_THREADS
    return kernel_result(error);
}

/* dequantize(out_features, in_features, w, out, bits): the weights [out][in] bf16, as the AMX path uses them. */
static PyObject *dequantize(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "dequantize takes 5 arguments");
        return NULL;
    }
    const int64_t out_features = PyLong_AsLongLong(args[0]), in_features = PyLong_AsLongLong(args[1]);
    const uint8_t *w = PyLong_AsVoidPtr(args[2]);
    bf16 *out = PyLong_AsVoidPtr(args[3]);
    const int bits = (int)PyLong_AsLong(args[4]);
    if (PyErr_Occurred()) return NULL;
    if (!cpu_supported() || out_features % BLOCK || in_features % GROUP || (bits != 4 && bits != 8)) {
        PyErr_SetString(PyExc_ValueError, "dequantize: unsupported CPU, shape or bits");
        return NULL;
    }
#if PARLEY_SIMD
    bf16 *panel = malloc(sizeof(bf16) * (size_t)(in_features * BLOCK));
    if (panel == NULL) return PyErr_NoMemory();
    const int64_t groups = in_features / GROUP;
    for (int64_t b = 0; b < out_features / BLOCK; b++) {
        dequant_block(w + b * ((groups + 1) / 2) * (bits == 8 ? Q8_PAIR : Q4_PAIR), groups, panel, BLOCK * GROUP, bits);
        for (int64_t g = 0; g < groups; g++)
            for (int64_t j = 0; j < BLOCK; j++)
                memcpy(out + (b * BLOCK + j) * in_features + g * GROUP, panel + (g * BLOCK + j) * GROUP, GROUP * sizeof(bf16));
    }
    free(panel);
#else
    (void)w, (void)out;
#endif
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"amx", amx, METH_NOARGS, "Whether this CPU and process can run the kernel on AMX tiles."},
    {"dequantize", (PyCFunction)(void (*)(void))dequantize, METH_FASTCALL, "The weights in bf16, as the kernel sees them."},
    {"linear", (PyCFunction)(void (*)(void))linear, METH_FASTCALL, "y = x W^T (+ bias) for 4- or 8-bit W."},
    {"supported", supported, METH_NOARGS, "Whether this CPU runs the kernel (AVX512-BF16)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_quant", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__quant(void) {
    QuantLinear entry = quant_linear; /* the type checks the signature */
    return export_entry(PyModule_Create(&module), "c_linear", "parley.kernels._quant.c_linear", (void *)entry);
}
