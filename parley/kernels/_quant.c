/* y = x W^T (+ bias) with W in 4 bits, as GGUF's Q4_1 (and Q4_0) keeps it, or in 8 bits as Q8_0
 * does (see dequant_pair8), for x in bf16 on x86 CPUs with AVX512-BF16, on AMX tiles where the CPU
 * has them.
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
 * an empty second).
 *
 * Dequantizing is most of a one-row call, so it is a table lookup: an output's 32 inputs of a group
 * take one of 16 values, computed once (one fma for all 16, one rounding to bf16), and one vpermw
 * puts them in place: ~10 vector ops per 64 weights against ~20 converting each weight (the
 * default model's projections at one row, a step's worth on a Xeon on the dpbf16 path: 5.9 -> 3.8
 * ms). The panel it fills is [groups][32 outputs][32 inputs]: an output's group is one table's
 * lookup and an AMX tile row.
 *
 * Batch invariance by construction: every row of x is multiplied by the panel with a sum per
 * output whose order does not depend on the other rows: on AMX tiles W is the left operand (16
 * outputs x 32 inputs) and x's input pairs the right ([16 pairs][rows][2]), each element of the
 * product its own fp32 sum over the pairs in order; on dpbf16 (AMD's path) 16 lanes of partial sums
 * per output and row, over the groups in order, then added in one fixed tree. So a row's bits do
 * not depend on how many rows the call has, where the row sits, or the number of threads. The two
 * paths round differently; a process takes one path for every call (`amx`).
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
    int64_t rows, out_features, in_features, x_stride, y_stride;
    const bf16 *x, *bias;
    const uint8_t *w;
    bf16 *y;
    uint32_t *xt;      /* AMX: x's input pairs, [16-row chunk][in_features / 2][16 rows] */
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
 * oneDNN on its bf16 copy; in a decode step, where it comes from memory: 1.79 -> 1.74 ms on AMX,
 * 2.59 -> 2.10 on dpbf16 (at 32 rows 0.3-0.6 ms slower); and 26 MB less than that copy. */
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

/* y[row + r][o0 + j] = bf16(sums[r * n + j] + bias) for r < rows, j < n (16, 8 or 4; rows * n <= 16). */
TARGET static inline void write_sums(const Call *c, __m512 sums, int64_t row, int64_t rows, int64_t o0, int n) {
    if (c->bias) {
        bf16 b[16];
        for (int i = 0; i < 16; i++) b[i] = c->bias[o0 + i % n];
        sums = _mm512_add_ps(sums, load_bf16(b));
    }
    bf16 out[16];
    _mm256_storeu_si256((__m256i *)out, (__m256i)_mm512_cvtneps_pbh(sums));
    for (int64_t r = 0; r < rows; r++) memcpy(c->y + (row + r) * c->y_stride + o0, out + r * n, n * sizeof(bf16));
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

/* The sums of 16 accumulators, each over its 16 lanes in the same tree: (l + l+8) + (l+4 + l+12)
 * for l < 4, then (0 + 2) + (1 + 3). */
TARGET static inline __m512 reduce16(const __m512 a[16]) {
    __m512 b[8], c4[4], d[2];
    for (int i = 0; i < 8; i++)
        b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x44),
                             _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xee));
    for (int i = 0; i < 4; i++) /* 128-bit lane L: accumulator 4i + L's four partial sums */
        c4[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88),
                              _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xdd));
    for (int i = 0; i < 2; i++)
        d[i] = _mm512_add_ps(_mm512_shuffle_ps(c4[2 * i], c4[2 * i + 1], 0x44),
                             _mm512_shuffle_ps(c4[2 * i], c4[2 * i + 1], 0xee));
    const __m512 e = _mm512_add_ps(_mm512_shuffle_ps(d[0], d[1], 0x88), _mm512_shuffle_ps(d[0], d[1], 0xdd));
    /* e[4L + k] is accumulator 4k + L's sum */
    return _mm512_permutexvar_ps(_mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0), e);
}

/* R (1, 2 or 4) rows from `row` times 16 / R outputs of the panel from `first`: 16 accumulators of
 * 16 lanes over the groups in order, then reduce16. R is a constant where inlined. */
TARGET static inline __attribute__((always_inline)) void dp_rows(const Call *c, const bf16 *panel, int64_t o0,
                                                                   int64_t first, int64_t row, const int R) {
    const int n = BLOCK / R;
    __m512 acc[16];
    for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_ps();
    const int64_t groups = c->in_features / GROUP;
    for (int64_t g = 0; g < groups; g++) {
        __m512bh x[4];
        for (int r = 0; r < R; r++) x[r] = (__m512bh)_mm512_loadu_si512(c->x + (row + r) * c->x_stride + g * GROUP);
        const bf16 *w = panel + g * PANEL_GROUP + first * GROUP;
        for (int j = 0; j < n; j++) {
            const __m512bh wj = (__m512bh)_mm512_loadu_si512(w + j * GROUP);
            for (int r = 0; r < R; r++) acc[r * n + j] = _mm512_dpbf16_ps(acc[r * n + j], wj, x[r]);
        }
    }
    write_sums(c, reduce16(acc), row, R, o0 + first, n);
}

/* The dpbf16 path for one panel of `outputs` (16 or 32): rows four at a time, then two, then one. */
TARGET static void panel_dp(const Call *c, const bf16 *panel, int64_t o0, int64_t outputs) {
    int64_t row = 0;
    for (; row + 4 <= c->rows; row += 4)
        for (int64_t first = 0; first < outputs; first += 4) dp_rows(c, panel, o0, first, row, 4);
    for (; row + 2 <= c->rows; row += 2)
        for (int64_t first = 0; first < outputs; first += 8) dp_rows(c, panel, o0, first, row, 2);
    for (; row < c->rows; row++)
        for (int64_t first = 0; first < outputs; first += 16) dp_rows(c, panel, o0, first, row, 1);
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
        write_sums(c, _mm512_load_ps(sums), row, 1, o0, BLOCK);
        return;
    }
    store_tile(t, sums, TILE_ROWS * sizeof(float));
    __m512i r[16];
    for (int i = 0; i < 16; i++) r[i] = _mm512_load_si512(sums + 16 * i);
    transpose16(r);
    for (int64_t i = 0; i < rows; i++) write_sums(c, _mm512_castsi512_ps(r[i]), row + i, 1, o0, BLOCK);
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

/* One row times the blocks from output o0 to `end`, each pair of groups dequantized into `buf`
 * just before its products, as narrow_amx does: the same sums as dp_rows with R = 1. */
TARGET static void row_dp(const Call *c, int64_t o0, int64_t end, bf16 *buf) {
    const int64_t groups = c->in_features / GROUP, block_bytes = c->block_bytes;
    for (; o0 < end; o0 += BLOCK) {
        __m512 acc[16];
        for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_ps();
        for (int64_t g = 0; g < groups; g++) {
            if (g % 2 == 0)
                dequant_pair(c->w + o0 / BLOCK * block_bytes + g / 2 * c->pair_bytes, buf, BLOCK * GROUP, g + 1 < groups,
                             c->bits);
            const __m512bh x = (__m512bh)_mm512_loadu_si512(c->x + g * GROUP);
            const bf16 *w = buf + g % 2 * BLOCK * GROUP;
            for (int j = 0; j < BLOCK; j++)
                acc[j] = _mm512_dpbf16_ps(acc[j], (__m512bh)_mm512_loadu_si512(w + j * GROUP), x);
        }
        write_sums(c, reduce16(acc), 0, 1, o0, BLOCK);
    }
}

TARGET static void run_panels_dp(const Call *c, int64_t first, int64_t last, bf16 *panel) {
    const int64_t groups = c->in_features / GROUP, block_bytes = c->block_bytes;
    if (c->rows == 1) {
        row_dp(c, first * PANEL, last * PANEL < c->out_features ? last * PANEL : c->out_features, panel);
        return;
    }
    for (int64_t p = first; p < last; p++) {
        const int64_t o0 = p * PANEL, blocks = c->out_features - o0 >= PANEL ? 2 : 1;
        for (int64_t b = 0; b < blocks; b++)
            dequant_block(c->w + (o0 / BLOCK + b) * block_bytes, groups, panel + b * BLOCK * GROUP, PANEL_GROUP,
                              c->bits);
        panel_dp(c, panel, o0, blocks * BLOCK);
    }
}

#endif

/* linear(threads, rows, out_features, in_features, x, x_stride, w, bias or 0, y, y_stride, amx, bits):
 * pointers as ints, strides in elements. The caller checks shapes (parley/kernels/linear.py). */
static PyObject *linear(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 12) {
        PyErr_SetString(PyExc_TypeError, "linear takes 12 arguments");
        return NULL;
    }
    const int threads = (int)PyLong_AsLong(args[0]);
    Call c = {.rows = PyLong_AsLongLong(args[1]), .out_features = PyLong_AsLongLong(args[2]),
              .in_features = PyLong_AsLongLong(args[3]), .x = PyLong_AsVoidPtr(args[4]),
              .x_stride = PyLong_AsLongLong(args[5]), .w = PyLong_AsVoidPtr(args[6]),
              .bias = PyLong_AsVoidPtr(args[7]), .y = PyLong_AsVoidPtr(args[8]), .y_stride = PyLong_AsLongLong(args[9]),
              .bits = (int)PyLong_AsLong(args[11])};
    const int amx = PyObject_IsTrue(args[10]);
    if (PyErr_Occurred()) return NULL;
    if (!cpu_supported() || (amx && !amx_supported()) || c.out_features % BLOCK || c.in_features % GROUP ||
        (c.bits != 4 && c.bits != 8)) {
        PyErr_SetString(PyExc_ValueError, "quantized linear: unsupported CPU, shape or bits");
        return NULL;
    }
    c.pair_bytes = c.bits == 8 ? Q8_PAIR : Q4_PAIR;
    c.block_bytes = (c.in_features / GROUP + 1) / 2 * c.pair_bytes;
#if PARLEY_SIMD
    const int64_t panels = (c.out_features + PANEL - 1) / PANEL, pairs = c.in_features / 2;
    const int64_t chunks = c.rows > 1 ? (c.rows + TILE_ROWS - 1) / TILE_ROWS : 0, parts = pairs / 16;
    const int team = threads < 1 ? 1 : (panels < threads ? (int)panels : threads);
    /* per thread: the panel [in / 32][64][32] bf16 (two panels, see configure_narrow), then AMX's
     * sums [16][16] fp32; then AMX's x pairs */
    const size_t panel_bytes = sizeof(bf16) * (size_t)(c.in_features * 2 * PANEL);
    const size_t per_thread = panel_bytes + (amx ? sizeof(float) * TILE_ROWS * TILE_ROWS : 0);
    const size_t xt_bytes = amx ? sizeof(uint32_t) * (size_t)(chunks * pairs * TILE_ROWS) : 0;
    char *scratch = aligned_alloc(64, (team * per_thread + xt_bytes + 63) / 64 * 64);
    if (scratch == NULL) return PyErr_NoMemory();
    c.xt = (uint32_t *)(scratch + team * per_thread);
    Py_BEGIN_ALLOW_THREADS
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
            run_panels_dp(&c, first, last, (bf16 *)mine);
        }
    }
    Py_END_ALLOW_THREADS
    free(scratch);
#endif
    Py_RETURN_NONE;
}

/* dequantize(out_features, in_features, w, out, bits): the weights [out][in] bf16, as the kernel uses them. */
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

PyMODINIT_FUNC PyInit__quant(void) { return PyModule_Create(&module); }
