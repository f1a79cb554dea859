/* Paged attention for a flat batch on x86 CPUs with AVX512-BF16: every query row (a decode token or
 * a token of a prompt chunk) attends to the first `keys` tokens of its sequence (a sliding layer's:
 * only the last `window` of them), read from the KV cache's blocks where they lie.
 *
 * Why a kernel: done with torch ops, a layer's attention gathers every sequence's blocks into one
 * tensor (a copy of the whole context per layer and step), builds float32 scores and masks for the
 * padded width, and runs a dozen ops of ~10 us each before any work; at 32 decode rows it was a third
 * of the step, and a prompt chunk's cost grew with the whole padded context.
 *
 * Batch invariance by construction: one unit of work is up to UNIT_ROWS consecutive rows of one
 * sequence and one KV head (the rows' query heads together, sharing each key and value load),
 * computed by one thread start to end, in key order. Each row's sums take nothing but that row's
 * query and its sequence's first `keys` keys and values, in an order fixed by key positions alone
 * (a row's keys beside another row's are masked to exact zeros). So a row gets the same bits
 * alone, beside other rows, as a decode token or inside a prompt chunk of any size, on any number
 * of threads.
 *
 * Long prompts on AMX (measured on a 2-core Xeon, lscpu "Intel(R) Xeon(R) Processor", 2 MB of L2 a
 * core; a 512-row chunk of SmolLM2's attention at 4,000 tokens, one thread): each unit of 4 rows
 * reads its sequence's keys and values (1 MB a KV head) and writes and re-reads its own fp32 scores
 * (192 KB); the tile ops themselves are ~2 ms of it (their count times a tile op's measured 4-5 ns).
 * Taking the KV heads outermost in the work order keeps a head's K/V in L2 from one unit to the
 * next (23 -> 14.6 ms; at 8,000 tokens, where a head's K/V is 2 MB, units go part by part too, see
 * by_keys), and the AMX unit takes its softmax's maxima as it finishes the tile
 * products and its numerators 16 keys ahead of their tile ops, with the next tile ops in flight
 * (-> 10.3-11.7 ms; see attend_unit_amx). Not kept, as measured no faster: units of 5 rows (15 of
 * 16 tile rows), and units of 32 rows whose 6 tiles share each key and value tile but recompute the
 * scores instead of storing them (the 16-row tile ops and the sums' trips through memory cost what
 * the fewer K/V reads saved). What is left is mostly the softmax's vector work: an exp and ~20
 * vector ops per 16 scores.
 *
 * RoPE: where the caller passes its tables, each row's query and new key are rotated first, in
 * place (rotate_rows): one call a layer instead of ~12 torch ops, the same bits as torch's.
 *
 * Numerics: q.k is summed in fp32 over exact bf16 products (dpbf16), scaled in fp32 (and soft-capped
 * in fp32 where the model caps scores: Gemma 2); the softmax is
 * float32 (a vector exp, ~1 ulp), its numerators rounded to bf16 as eager attention rounds its
 * probabilities; the weighted values are summed in fp32, divided by the float32 sum and rounded to
 * bf16 once. Eager attention in bf16 also rounds the scores to bf16; this does not.
 *
 * The cache of one layer: bf16, kv_heads x num_blocks blocks of block_size x head_dim elements
 * each, laid out for dpbf16 (see key_block); the new tokens' keys and values are written by the
 * same call. tables int64 [sequences, table_stride] of block ids; per row int32 seq (its table's
 * row) and keys.
 *
 * Off x86-64 (or built with -DPARLEY_NO_SIMD) the module loads, says it is unsupported, and
 * parley/models/attention.py keeps its torch path.
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

#define MAX_HEAD_DIM 256
#define MAX_GROUP 32 /* query heads per KV head */

typedef AttendCall Call; /* cpu.h */

#define UNIT_ROWS 4  /* rows of one sequence attended together */
#define KEY_TILE 128 /* tokens whose keys (or values) all of a unit's rows use before the next ones */

/* A row that sees more than PART_KEYS keys is attended in parts: the keys [k * PART_KEYS,
 * (k + 1) * PART_KEYS) of each k are a unit of their own, which leaves its rows' unnormalized
 * weighted values, softmax sums and largest scores; `combine` then rescales the parts to the
 * largest score of all and adds them in order (flash-decoding). A long decode row's three KV heads
 * were three units on two threads, one thread doing two; in parts the threads share them evenly.
 * Measured on a Xeon (bench/attention_context.py, 4,000 tokens, 2 threads, a layer): AMX 205 ->
 * 171 us, dpbf16 273 -> 205 us; the engine's decode at 4,000 tokens +6%, prefill unchanged. Parts
 * of 512 keys cost prefill 12-18% at 2,662-4,000 tokens (a part's fixed costs, in every unit of 4
 * rows). Which rows are split, and where, depends on each row alone (how many keys it sees; the
 * parts' bounds are fixed positions), so a row keeps its bits beside any others; a row of at most
 * PART_KEYS keys has the bits it had before parts. */
#define PART_KEYS 2048

typedef struct {
    int64_t first, rows;
    int64_t lo, hi; /* the keys this unit attends: [lo, hi) */
    int64_t part;   /* -1: the rows' outputs; else their partial results at parts + part * PART_FLOATS per KV head */
} Unit;

/* Rows of one sequence split into `parts` parts, whose results are at parts `part` on (in attend(),
 * while units are formed: parts 0 or 1, whether the rows are split). */
typedef struct {
    int64_t first, rows, part, parts;
} Split;

/* What a split row's unit leaves per KV head: weighted values [UNIT_ROWS][group][head_dim], then
 * largest scores and sums [UNIT_ROWS][group] each. */
#define PART_FLOATS(c) (UNIT_ROWS * ((c)->heads / (c)->kv_heads) * ((c)->head_dim + 2))

/* The first key a row sees: its window's, else its sequence's first. */
static inline int64_t first_key(const Call *c, int64_t row) {
    const int64_t from = c->keys[row] - c->window;
    return c->window > 0 && from > 0 ? from : 0;
}

/* A row's keys within its unit: from row_first (its first key, or the unit's lo) to row_end (its
 * last key + 1, or the unit's hi). Its work starts at row_first's group of 16 (row_start; the keys
 * before it in that group are masked). A group of 16 lies within one block (block_size is a
 * multiple of 16), the block of the row's first key, which its sequence still holds
 * (parley/engine/block_manager.py releases only blocks wholly before every pending token's window):
 * the kernel never reads a released block. */
static inline int64_t row_end(const Call *c, Unit u, int64_t row) { return c->keys[row] < u.hi ? c->keys[row] : u.hi; }

static inline int64_t row_first(const Call *c, Unit u, int64_t row) {
    const int64_t first = first_key(c, row);
    return first > u.lo ? first : u.lo;
}

static inline int64_t row_start(const Call *c, Unit u, int64_t row) { return row_first(c, u, row) / 16 * 16; }

/* The most keys any of the unit's rows sees (unused in a build without SIMD, as the next). */
__attribute__((unused)) static int64_t unit_keys(const Call *c, Unit u) {
    int64_t longest = 0;
    for (int64_t r = 0; r < u.rows; r++) longest = row_end(c, u, u.first + r) > longest ? row_end(c, u, u.first + r) : longest;
    return longest;
}

/* The first group any of the unit's rows starts at. */
__attribute__((unused)) static int64_t unit_first_group(const Call *c, Unit u) {
    int64_t lowest = row_start(c, u, u.first);
    for (int64_t r = 1; r < u.rows; r++) lowest = row_start(c, u, u.first + r) < lowest ? row_start(c, u, u.first + r) : lowest;
    return lowest;
}

/* The kernel's cache layout, per KV head and block of `block_size` tokens (a multiple of 16):
 *   keys   [head_dim / 2][block_size][2]: for each pair of dimensions, every token's pair, so one
 *          load gives 16 tokens' pairs and dpbf16 sums 16 scores at once, with no sum across lanes;
 *   values [block_size / 2][head_dim][2]: for each pair of tokens, each dimension of both, so one
 *          dpbf16 adds two tokens' weighted values to 16 dimensions. */
static inline const bf16 *key_block(const Call *c, int64_t kv_head, const int64_t *table, int64_t t) {
    return c->k_cache + (kv_head * c->num_blocks + table[t / c->block_size]) * c->block_size * c->head_dim +
           2 * (t % c->block_size);
}

static inline const bf16 *value_pair(const Call *c, int64_t kv_head, const int64_t *table, int64_t t) {
    return c->v_cache + (kv_head * c->num_blocks + table[t / c->block_size]) * c->block_size * c->head_dim +
           (t % c->block_size) * c->head_dim;
}

/* Each new token's key and value into its slot, in the layout above. */
static void write_cache(const Call *c) {
    const int64_t dim = c->head_dim, bs = c->block_size;
    for (int64_t r = 0; r < c->rows; r++) {
        const int64_t block = c->slots[r] / bs, at = c->slots[r] % bs;
        for (int64_t h = 0; h < c->kv_heads; h++) {
            const int64_t base = (h * c->num_blocks + block) * bs * dim;
            const bf16 *k = c->k_new + r * c->k_stride + h * dim, *v = c->v_new + r * c->v_stride + h * dim;
            bf16 *kc = c->k_cache + base + 2 * at, *vc = c->v_cache + base + (at / 2) * 2 * dim + at % 2;
            for (int64_t p = 0; p < dim / 2; p++) {
                kc[p * 2 * bs] = k[2 * p];
                kc[p * 2 * bs + 1] = k[2 * p + 1];
            }
            for (int64_t d = 0; d < dim; d++) vc[2 * d] = v[d];
        }
    }
}

#if PARLEY_SIMD

/* RoPE (rotate-half, HF's layout) of the first 2 * rope_half dims of `heads` heads from x (row r at
 * x + r * stride, heads contiguous), in place, at each row's position. As torch's apply_rope in
 * bf16 (parley/models/layers/rotary.py): each product rounded to bf16, then their difference or sum
 * rounded to bf16, so the same bits. */
TARGET static void rotate_rows(const Call *c, bf16 *x, int64_t stride, int64_t heads) {
    const int64_t half = c->rope_half;
    for (int64_t r = 0; r < c->rows; r++) {
        const bf16 *cos = c->cos + c->positions[r] * half, *sin = c->sin + c->positions[r] * half;
        for (int64_t h = 0; h < heads; h++) {
            bf16 *first = x + r * stride + h * c->head_dim, *second = first + half;
            for (int64_t i = 0; i < half; i += 16) {
                const __mmask16 m = half - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (half - i)) - 1);
                const __m512 x1 = load_bf16_masked(first + i, m), x2 = load_bf16_masked(second + i, m);
                const __m512 co = load_bf16_masked(cos + i, m), si = load_bf16_masked(sin + i, m);
                const __m512 y1 = _mm512_sub_ps(round_bf16(_mm512_mul_ps(x1, co)), round_bf16(_mm512_mul_ps(x2, si)));
                const __m512 y2 = _mm512_add_ps(round_bf16(_mm512_mul_ps(x2, co)), round_bf16(_mm512_mul_ps(x1, si)));
                store_bf16_masked(first + i, m, y1);
                store_bf16_masked(second + i, m, y2);
            }
        }
    }
}

/* Software prefetch of the keys (values) of the 16 tokens from t, PREFETCH_TOKENS ahead of their
 * use, on the dpbf16 path. At long contexts a decode row streams its sequence's K/V from DRAM
 * (4,000 tokens of SmolLM2's 3 KV heads: 3 MB a layer, 92 MB a step), and the dpbf16 loops, whose
 * loads each feed a chain of dot products, kept too few of them in flight: one thread read ~6 GB/s
 * where a plain float32 sum streams ~12 GB/s. Measured on a Xeon with bench/attention_context.py
 * (busy machine, CPU time of one thread, alternated 3x, K/V from DRAM): 480-490 -> 390-400 us a
 * layer at 4,000 tokens, 123-128 -> 101-103 at 1,000, 33-36 -> 26-27 at 200; 128 tokens ahead was
 * no better, 256 worse. The AMX path's tile loads (1 KB each) already keep enough in flight: the
 * same prefetch there changed nothing (278-305 us either way, ~10 GB/s). */
#define PREFETCH_TOKENS 64

static inline void prefetch_keys(const Call *c, int64_t kv_head, const int64_t *table, int64_t t) {
    const char *k = (const char *)key_block(c, kv_head, table, t);
    for (int64_t p = 0; p < c->head_dim / 2; p++) _mm_prefetch(k + p * 4 * c->block_size, _MM_HINT_T0);
}

static inline void prefetch_values(const Call *c, int64_t kv_head, const int64_t *table, int64_t t) {
    const char *v = (const char *)value_pair(c, kv_head, table, t);
    for (int64_t i = 0; i < 16 * c->head_dim * 2; i += 64) _mm_prefetch(v + i, _MM_HINT_T0);
}

/* softcap * tanh(s / softcap) in float32, in transformers' order (divided, tanh, multiplied):
 * tanh|x| = (1 - e) / (1 + e) with e = e^(-2|x|), the sign put back. Near 0, 1 - e loses bits to
 * cancellation, ~2^-24 / |x| of tanh relative: an absolute error under softcap * 2^-23 in the score,
 * far below the bf16 rounding of eager attention's scores. */
TARGET static inline __m512 soft_cap(__m512 s, float softcap) {
    const __m512 x = _mm512_div_ps(s, _mm512_set1_ps(softcap)), one = _mm512_set1_ps(1.0f);
    const __m512 e = exp_nonpositive(_mm512_mul_ps(_mm512_abs_ps(x), _mm512_set1_ps(-2.0f)));
    const __m512 t = _mm512_div_ps(_mm512_sub_ps(one, e), _mm512_add_ps(one, e));
    const __m512 sign = _mm512_and_ps(x, _mm512_set1_ps(-0.0f));
    return _mm512_mul_ps(_mm512_or_ps(t, sign), _mm512_set1_ps(softcap));
}

/* A group's scores times the scale, soft-capped where the model caps them. */
TARGET static inline __m512 finish(__m512 dots, float scale, float softcap) {
    const __m512 scores = _mm512_mul_ps(dots, _mm512_set1_ps(scale));
    return softcap > 0 ? soft_cap(scores, softcap) : scores;
}

TARGET static inline __m512 finish_scores(const Call *c, __m512 dots) { return finish(dots, c->scale, c->softcap); }

/* q_g . k_t * scale for the 16 tokens from t (one key group), for R rows (q[r], scores[r]) and
 * their heads g0 .. g0 + G - 1: per row and head four sums over every fourth dimension pair (four
 * chains of dpbf16, which one chain's latency would otherwise bound), added as (0 + 1) + (2 + 3).
 * Each key load serves every row and head of the call (R x G x 4 <= 24 sums in registers): one row
 * and head at a time, a key load a dpbf16 held the loop to the loads' rate (perf annotate on an
 * AMD EPYC, Zen 5). With weigh_heads' two rows, a 512-row chunk at 4,000 tokens, a layer on two
 * threads, alternated with the code before: 11.8-17.8 -> 8.7-12.3 ms (at 8,000: 25.8-34.7 ->
 * 19.3-23.1 ms). Inlined where R and G are constants. Each q pair is broadcast by the dpbf16 itself
 * ({1to16}, spelled in asm: gcc emitted a vpbroadcastd before every dpbf16, twice the instructions;
 * the same products, so the same bits): in one process, the two builds alternated on an AMD EPYC,
 * a 512-row chunk at 4,000 tokens 2.5-3% faster on one thread, 2-6% on two, a decode row 5%. */
TARGET static inline __attribute__((always_inline)) void score_heads(const Call *c, const int32_t *const q[2],
                                                                     const bf16 *k, float *const scores[2], int64_t stride,
                                                                     int64_t g0, const int R, const int G) {
    const int64_t half = c->head_dim / 2, pair_stride = 2 * c->block_size;
    __m512 acc[2][3][4];
    for (int r = 0; r < R; r++)
        for (int g = 0; g < G; g++)
            for (int j = 0; j < 4; j++) acc[r][g][j] = _mm512_setzero_ps();
    for (int64_t p = 0; p < half; p += 4)
        for (int j = 0; j < 4; j++) {
            const __m512bh keys = (__m512bh)_mm512_loadu_si512(k + (p + j) * pair_stride);
            for (int r = 0; r < R; r++)
                for (int g = 0; g < G; g++)
                    __asm__("vdpbf16ps %[q]%{1to16%}, %[k], %[a]" : [a] "+v"(acc[r][g][j]) : [k] "v"(keys), [q] "m"(q[r][(g0 + g) * half + p + j]));
        }
    for (int r = 0; r < R; r++)
        for (int g = 0; g < G; g++) {
            const __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[r][g][0], acc[r][g][1]), _mm512_add_ps(acc[r][g][2], acc[r][g][3]));
            _mm512_storeu_ps(scores[r] + (g0 + g) * stride, finish_scores(c, sum));
        }
}

/* score_heads for R (1 or 2) rows and all `group` heads, three at a time. */
TARGET static void score_group(const Call *c, const int32_t *const q[2], const bf16 *k, float *const scores[2],
                               int64_t stride, int64_t group, int R) {
    for (int64_t g0 = 0; g0 < group; g0 += 3) {
        const int64_t G = group - g0 < 3 ? group - g0 : 3;
#define SCORE(R_, G_) score_heads(c, q, k, scores, stride, g0, R_, G_)
        if (R == 2)
            G == 3 ? SCORE(2, 3) : G == 2 ? SCORE(2, 2) : SCORE(2, 1);
        else
            G == 3 ? SCORE(1, 3) : G == 2 ? SCORE(1, 2) : SCORE(1, 1);
#undef SCORE
    }
}

/* A row's scores [group][stride] of keys [first, keys) -> softmax numerators rounded to bf16 (as
 * eager attention rounds its probabilities), in place from first's group of 16 on, zero before
 * first and past `keys`; sums[g]: their float32 sum (lanes of 16 tokens, then in lane order),
 * highs[g]: the largest score (-inf and a sum of 0 where the row sees no key here). */
TARGET static void softmax_row(float *scores, int64_t stride, int64_t group, int64_t first, int64_t keys, float *sums,
                               float *highs) {
    const int64_t start = first / 16 * 16, full = keys / 16 * 16;
    const __mmask16 tail = (__mmask16)((1u << (keys - full)) - 1), head = (__mmask16)(0xFFFFu << (first - start));
    for (int64_t g = 0; g < group; g++) {
        float *s = scores + g * stride;
        bf16 *probs = (bf16 *)s;
        __m512 high = _mm512_set1_ps(-INFINITY);
        for (int64_t t = start; t < keys; t += 16) {
            const __mmask16 valid = (t < full ? (__mmask16)0xFFFF : tail) & (t == start ? head : (__mmask16)0xFFFF);
            high = _mm512_mask_max_ps(high, valid, high, _mm512_maskz_loadu_ps(valid, s + t));
        }
        highs[g] = _mm512_reduce_max_ps(high);
        const __m512 top = _mm512_set1_ps(highs[g]);
        __m512 sum = _mm512_setzero_ps();
        for (int64_t t = start; t < keys; t += 16) { /* t's probabilities overwrite scores before t */
            const __mmask16 valid = (t < full ? (__mmask16)0xFFFF : tail) & (t == start ? head : (__mmask16)0xFFFF);
            const __m512 e = _mm512_maskz_mov_ps(valid, exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(s + t), top)));
            sum = _mm512_add_ps(sum, e);
            _mm256_storeu_si256((__m256i *)(probs + t), (__m256i)_mm512_cvtneps_pbh(e));
        }
        sums[g] = _mm512_reduce_add_ps(sum);
    }
}

/* weigh_values for R rows (probs[r], acc[r]) and heads g0 .. g0 + gn - 1, inlined where R, gn and
 * vecs (head_dim / 16) are constants: then the sums and the loaded values stay in registers;
 * compiled for any gn and vecs they went through the stack at every token pair (perf annotate: the
 * spills of the loaded values were the loop's hottest instructions). The same operations in the same
 * order: the same bits. Measured as the prefetch below (one thread, 4,000 tokens from DRAM,
 * alternated 3x): 421-436 -> 395-405 us a layer. Two rows share each value load where the sums fit
 * in registers (head_dim 64, up to 3 heads); the value pointer steps within a block, where
 * value_pair's division took an idiv per token pair (both seen in perf annotate on an AMD EPYC). */
TARGET static inline __attribute__((always_inline)) void weigh_heads(
    const Call *c, int64_t kv_head, const int64_t *table, const bf16 *const probs[2], int64_t stride, int64_t g0,
    const int R, const int64_t gn, const int64_t vecs, int64_t from, int64_t to, int64_t keys, float *const acc[2]) {
    const int64_t dim = 16 * vecs, bs = c->block_size;
    __m512 sums[2][4][MAX_HEAD_DIM / 16];
    for (int r = 0; r < R; r++)
        for (int64_t g = 0; g < gn; g++)
            for (int64_t d = 0; d < vecs; d++) sums[r][g][d] = _mm512_loadu_ps(acc[r] + (g0 + g) * dim + 16 * d);
    for (int64_t t = from; t < to;) {
        const int64_t end = (t / bs + 1) * bs < to ? (t / bs + 1) * bs : to; /* within t's block */
        for (const bf16 *v = value_pair(c, kv_head, table, t); t < end; t += 2, v += 2 * dim) {
            if (g0 == 0 && t % 16 == 0 && t + PREFETCH_TOKENS < keys) prefetch_values(c, kv_head, table, t + PREFETCH_TOKENS);
            /* past the last key: its probability is zero, and its value (whatever the slot holds) is
               read as zero too, so that no stale inf or NaN gets in. Only that pair takes a masked
               load: on an AMD EPYC (Zen 5) a masked load in every pair was the loop's hottest
               instruction, and a decode row at 4,000 tokens (bench/attention_context.py, a layer on
               two threads, caches of 1,100 blocks, alternated 3x) took 144-185 us, now 123-127 */
            __m512bh vv[MAX_HEAD_DIM / 16];
            if (__builtin_expect(t + 1 < keys, 1))
                for (int64_t d = 0; d < vecs; d++) vv[d] = (__m512bh)_mm512_loadu_si512(v + 32 * d);
            else
                for (int64_t d = 0; d < vecs; d++) vv[d] = (__m512bh)_mm512_maskz_loadu_epi16(0x55555555u, v + 32 * d);
            for (int r = 0; r < R; r++)
                for (int64_t g = 0; g < gn; g++) {
                    int32_t pair;
                    memcpy(&pair, probs[r] + (g0 + g) * 2 * stride + t, sizeof pair);
                    const __m512bh p = (__m512bh)_mm512_set1_epi32(pair);
                    for (int64_t d = 0; d < vecs; d++) sums[r][g][d] = _mm512_dpbf16_ps(sums[r][g][d], p, vv[d]);
                }
        }
    }
    for (int r = 0; r < R; r++)
        for (int64_t g = 0; g < gn; g++)
            for (int64_t d = 0; d < vecs; d++) _mm512_storeu_ps(acc[r] + (g0 + g) * dim + 16 * d, sums[r][g][d]);
}

/* acc[r][g][dim] += sum over tokens t in [from, to) of p_rg[t] v_t, two tokens a dpbf16, for one
 * row or (R = 2, head_dim 64 only) two, heads taken up to 4 at a time (3 for two rows) to share
 * each value load. `probs[r]`: bf16 [group][2 * stride]. Two rows: every pair in [from, to) is
 * whole for both (to <= either's keys, even). */
TARGET static void weigh_values(const Call *c, int64_t kv_head, const int64_t *table, const bf16 *const probs[2],
                                int64_t stride, int64_t group, int R, int64_t from, int64_t to, int64_t keys,
                                float *const acc[2]) {
    const int64_t vecs = c->head_dim / 16;
#define WEIGH(R, gn, vecs) weigh_heads(c, kv_head, table, probs, stride, g0, R, gn, vecs, from, to, keys, acc)
#define WEIGH_ANY_GN(vecs) (gn == 4 ? WEIGH(1, 4, vecs) : gn == 3 ? WEIGH(1, 3, vecs) : gn == 2 ? WEIGH(1, 2, vecs) : WEIGH(1, 1, vecs))
    if (R == 2) {
        for (int64_t g0 = 0; g0 < group; g0 += 3) {
            const int64_t gn = group - g0 < 3 ? group - g0 : 3;
            gn == 3 ? WEIGH(2, 3, 4) : gn == 2 ? WEIGH(2, 2, 4) : WEIGH(2, 1, 4);
        }
        return;
    }
    for (int64_t g0 = 0; g0 < group; g0 += 4) {
        const int64_t gn = group - g0 < 4 ? group - g0 : 4;
        if (vecs == 4) /* head_dim 64 */
            WEIGH_ANY_GN(4);
        else if (vecs == 8) /* 128 */
            WEIGH_ANY_GN(8);
        else
            WEIGH(1, gn, vecs);
    }
#undef WEIGH_ANY_GN
#undef WEIGH
}

/* The weighted values of the unit's rows r (and r + 1 where `two`) over the tile's keys: the pairs
 * whole for both rows together, each row's others (before and after) on its own, every row's tokens
 * still in order. */
TARGET static void weigh_tile(const Call *c, Unit u, int64_t kv_head, const int64_t *table, const float *scratch,
                              int64_t stride, int64_t tile, int64_t r, int two, float *acc) {
    const int64_t group = c->heads / c->kv_heads, dim = c->head_dim;
    int64_t from[2], to[2], keys[2];
    const bf16 *probs[2];
    float *sums[2];
    for (int i = 0; i <= two; i++) {
        const int64_t row = u.first + r + i, start = row_start(c, u, row);
        keys[i] = row_end(c, u, row);
        from[i] = tile > start ? tile : start;
        to[i] = keys[i] < tile + KEY_TILE ? keys[i] : tile + KEY_TILE;
        probs[i] = (const bf16 *)(scratch + (r + i) * group * stride);
        sums[i] = acc + (r + i) * group * dim;
    }
    int64_t lo = 0, hi = 0; /* the pairs whole for both */
    int joint = 0;
    if (two) {
        lo = from[0] > from[1] ? from[0] : from[1];
        hi = (to[0] < to[1] ? to[0] : to[1]) / 2 * 2;
        joint = hi > lo;
    }
    for (int i = 0; i <= two; i++) {
        const bf16 *const p[2] = {probs[i], NULL};
        float *const a[2] = {sums[i], NULL};
        const int64_t before = joint ? lo : to[i];
        if (from[i] < before) weigh_values(c, kv_head, table, p, stride, group, 1, from[i], before, keys[i], a);
    }
    if (!joint) return;
    weigh_values(c, kv_head, table, probs, stride, group, 2, lo, hi, keys[0] < keys[1] ? keys[0] : keys[1], sums);
    for (int i = 0; i < 2; i++) {
        const bf16 *const p[2] = {probs[i], NULL};
        float *const a[2] = {sums[i], NULL};
        if (hi < to[i]) weigh_values(c, kv_head, table, p, stride, group, 1, hi, to[i], keys[i], a);
    }
}

/* The unit's rows' outputs: their weighted values `acc` [rows][group][head_dim] times 1 / each
 * head's sum, rounded to bf16; a split row's unit leaves them, its sums and largest scores as
 * they are, for `combine`. */
TARGET static void write_out(const Call *c, Unit u, int64_t kv_head, const float *acc, float sums[UNIT_ROWS][MAX_GROUP],
                             float highs[UNIT_ROWS][MAX_GROUP]) {
    const int64_t group = c->heads / c->kv_heads, dim = c->head_dim;
    if (u.part >= 0) {
        float *part = c->parts + (u.part * c->kv_heads + kv_head) * PART_FLOATS(c);
        float *part_highs = part + UNIT_ROWS * group * dim, *part_sums = part_highs + UNIT_ROWS * group;
        memcpy(part, acc, sizeof(float) * (size_t)(u.rows * group * dim));
        for (int64_t r = 0; r < u.rows; r++)
            for (int64_t g = 0; g < group; g++) part_highs[r * group + g] = highs[r][g], part_sums[r * group + g] = sums[r][g];
        return;
    }
    for (int64_t r = 0; r < u.rows; r++) {
        bf16 *out = c->out + (u.first + r) * c->out_stride + kv_head * group * dim;
        for (int64_t g = 0; g < group; g++) {
            const __m512 norm = _mm512_set1_ps(1.0f / sums[r][g]);
            for (int64_t d = 0; d < dim / 16; d++)
                _mm256_storeu_si256((__m256i *)(out + g * dim + 16 * d),
                                    (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(acc + (r * group + g) * dim + 16 * d), norm)));
        }
    }
}

/* A unit: up to UNIT_ROWS consecutive rows of one sequence, one KV head. The rows go through the
 * keys together, KEY_TILE at a time, so each tile of keys and values is read from memory once for
 * all of them; each row's arithmetic is the same as alone (its sums run over its own tokens in
 * order, and each row's running sums wait in `acc` between tiles as they are).
 * scratch: [UNIT_ROWS][group][stride] scores, then acc [UNIT_ROWS][group][head_dim]. */
TARGET static void attend_unit(const Call *c, Unit u, int64_t kv_head, float *scratch, int64_t stride) {
    const int64_t group = c->heads / c->kv_heads, dim = c->head_dim;
    const int64_t *table = c->tables + (int64_t)c->seq[u.first] * c->table_stride;
    float *acc = scratch + UNIT_ROWS * group * stride, sums[UNIT_ROWS][MAX_GROUP], highs[UNIT_ROWS][MAX_GROUP];
    const int64_t longest = unit_keys(c, u), lowest = unit_first_group(c, u);

    /* two rows at a time, over the groups either sees: a row's scores past its own keys (at most the
       one group where the rows' last keys differ) land in its scratch, within stride, and are never
       read (softmax_row and weigh_values take the row's own keys only) */
    for (int64_t tile = lowest; tile < longest; tile += KEY_TILE)
        for (int64_t r = 0; r < u.rows; r += 2) {
            const int R = u.rows - r < 2 ? 1 : 2;
            const int32_t *q[2] = {NULL, NULL};
            float *scores[2] = {NULL, NULL};
            int64_t keys = 0, start = INT64_MAX;
            for (int i = 0; i < R; i++) {
                const int64_t row = u.first + r + i;
                q[i] = (const int32_t *)(c->q + row * c->q_stride + kv_head * group * dim);
                scores[i] = scratch + (r + i) * group * stride;
                keys = row_end(c, u, row) > keys ? row_end(c, u, row) : keys;
                start = row_start(c, u, row) < start ? row_start(c, u, row) : start;
            }
            for (int64_t t = tile > start ? tile : start; t < keys && t < tile + KEY_TILE; t += 16) {
                if (r == 0 && t + PREFETCH_TOKENS < longest) prefetch_keys(c, kv_head, table, t + PREFETCH_TOKENS);
                float *const at[2] = {scores[0] + t, R == 2 ? scores[1] + t : NULL};
                score_group(c, q, key_block(c, kv_head, table, t), at, stride, group, R);
            }
        }
    for (int64_t r = 0; r < u.rows; r++)
        softmax_row(scratch + r * group * stride, stride, group, row_first(c, u, u.first + r), row_end(c, u, u.first + r),
                    sums[r], highs[r]);
    memset(acc, 0, sizeof(float) * (size_t)(u.rows * group * dim));
    for (int64_t tile = lowest; tile < longest; tile += KEY_TILE)
        for (int64_t r = 0, two; r < u.rows; r += 1 + two) {
            two = r + 1 < u.rows && dim == 64;
            weigh_tile(c, u, kv_head, table, scratch, stride, tile, r, (int)two, acc);
        }
    write_out(c, u, kv_head, acc, sums, highs);
}


/* The same unit on AMX tiles (Intel Sapphire Rapids and later), where oneDNN's matmuls run too:
 * one tile op multiplies all of the unit's rows and heads (M = rows x group <= 16) by 16 tokens'
 * keys, or 16 tokens' values, where dpbf16 took one head and 16 tokens (or 2) at a time. Each
 * element of a tile product is its own sum over the same pairs in the same order whatever the
 * other rows of the tile, so a row still keeps its bits alone or beside others; they are not the
 * dpbf16 path's bits, and a machine takes one path for good (`amx` in attend()). */
AMX static void tile_config(int64_t m, int qk) {
    TileConfig config __attribute__((aligned(64))) = {.palette = 1};
    if (qk) { /* 0, 3: scores [M][16] fp32; 1: q [M][32 bf16]; 2: keys [16 pairs][16 tokens x 2] */
        config.rows[0] = config.rows[1] = config.rows[3] = (uint8_t)m, config.rows[2] = 16;
        config.colsb[0] = config.colsb[1] = config.colsb[2] = config.colsb[3] = 64;
    } else { /* 0-3: sums [M][16 dims] fp32; 4: probabilities [M][16 tokens]; 5: values [8 token pairs][16 dims x 2] */
        for (int i = 0; i < 4; i++) config.rows[i] = (uint8_t)m, config.colsb[i] = 64;
        config.rows[4] = (uint8_t)m, config.colsb[4] = 32;
        config.rows[5] = 8, config.colsb[5] = 64;
    }
    _tile_loadconfig(&config);
}

/* The lanes of the 16 tokens from t that lie in [first, end); whole: first rounded up to 16. */
static inline __mmask16 valid_lanes(int64_t first, int64_t end, int64_t whole, int64_t t) {
    if (t >= whole && t + 16 <= end) return 0xFFFF;
    const int64_t lo = first - t < 0 ? 0 : first - t, hi = end - t > 16 ? 16 : end - t;
    return hi <= lo ? 0 : (__mmask16)(((1u << hi) - 1) & ~((1u << lo) - 1));
}

/* softmax_row's numerators of the 16 tokens from t for the unit's m rows x heads (scores [m][stride]),
 * over their scores (zero where masked), their sums lane by lane in sum_lanes [m][16]; inner: every
 * lane is valid for every row. */
TARGET static inline void numerators(float *scores, int64_t stride, int64_t m, int64_t t, int inner, const int64_t *firsts,
                                     const int64_t *ends, const int64_t *wholes, const __m512 *top, float *sum_lanes) {
    if (inner) {
        for (int64_t i = 0; i < m; i++) {
            float *s = scores + i * stride;
            const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(s + t), top[i]));
            _mm512_storeu_ps(sum_lanes + 16 * i, _mm512_add_ps(_mm512_loadu_ps(sum_lanes + 16 * i), e));
            _mm256_storeu_si256((__m256i *)((bf16 *)s + t), (__m256i)_mm512_cvtneps_pbh(e));
        }
        return;
    }
    for (int64_t i = 0; i < m; i++) {
        float *s = scores + i * stride;
        const __mmask16 valid = valid_lanes(firsts[i], ends[i], wholes[i], t);
        __m512 e = _mm512_setzero_ps();
        if (valid) {
            e = _mm512_maskz_mov_ps(valid, exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(s + t), top[i])));
            _mm512_storeu_ps(sum_lanes + 16 * i, _mm512_add_ps(_mm512_loadu_ps(sum_lanes + 16 * i), e));
        }
        _mm256_storeu_si256((__m256i *)((bf16 *)s + t), (__m256i)_mm512_cvtneps_pbh(e));
    }
}

/* scratch as attend_unit's, then q [16][head_dim] bf16, a [16][16] fp32 tile, the largest scores
 * and the sums [16][16] fp32 lane by lane, and one block's values [8][head_dim][2] bf16.
 *
 * softmax_row's work in two pieces, each where the data already is: the largest scores as the
 * tile products are finished (in registers), the numerators and sums 16 tokens at a time just
 * before their tile ops (in L1 then). The same operations on the same values in the same order
 * as softmax_row: the same bits. */
AMX static void attend_unit_amx(const Call *c, Unit u, int64_t kv_head, float *scratch, int64_t stride) {
    const int64_t group = c->heads / c->kv_heads, dim = c->head_dim, m = u.rows * group;
    const int64_t *table = c->tables + (int64_t)c->seq[u.first] * c->table_stride;
    float *acc = scratch + UNIT_ROWS * group * stride, sums[UNIT_ROWS][MAX_GROUP], highs[UNIT_ROWS][MAX_GROUP];
    bf16 *q = (bf16 *)(acc + UNIT_ROWS * group * dim);
    float *tile = (float *)(q + 16 * dim), *high_lanes = tile + 256, *sum_lanes = high_lanes + 256;
    bf16 *last_values = (bf16 *)(sum_lanes + 256);
    const int64_t longest = unit_keys(c, u), lowest = unit_first_group(c, u);
    const float scale = c->scale, softcap = c->softcap; /* not re-read after every store to scratch */
    int64_t firsts[16], ends[16], wholes[16]; /* each row x head's keys; from `wholes` on, groups of 16 all valid */
    for (int64_t r = 0; r < u.rows; r++) {
        const int64_t row = u.first + r;
        memcpy(q + r * group * dim, c->q + row * c->q_stride + kv_head * group * dim, sizeof(bf16) * group * dim);
        for (int64_t g = 0; g < group; g++) {
            const int64_t i = r * group + g;
            firsts[i] = row_first(c, u, row), ends[i] = row_end(c, u, row), wholes[i] = (firsts[i] + 15) / 16 * 16;
        }
    }
    int64_t inner_from = wholes[0], inner_to = ends[0]; /* the groups of 16 keys that every row sees whole */
    for (int64_t i = 1; i < m; i++) {
        inner_from = wholes[i] > inner_from ? wholes[i] : inner_from;
        inner_to = ends[i] < inner_to ? ends[i] : inner_to;
    }
    const int64_t pair_stride = 2 * c->block_size;

    for (int64_t i = 0; i < m; i++) _mm512_storeu_ps(high_lanes + 16 * i, _mm512_set1_ps(-INFINITY));
    /* the tile ops of the next 16 keys (in tile 0 or 3 by turns) go before this group's vector work */
#define SCORE(T, t)                                                                                          \
    do {                                                                                                     \
        const bf16 *k = key_block(c, kv_head, table, t);                                                     \
        _tile_zero(T);                                                                                       \
        for (int64_t d = 0; d < dim; d += 32) {                                                              \
            _tile_loadd(1, q + d, dim * sizeof(bf16));                                                       \
            _tile_loadd(2, k + (d / 2) * pair_stride, pair_stride * sizeof(bf16));                           \
            _tile_dpbf16ps(T, 1, 2);                                                                         \
        }                                                                                                    \
    } while (0)
    tile_config(m, 1);
    SCORE(0, lowest);
    for (int64_t t = lowest; t < longest; t += 16) {
        if ((t - lowest) % 32 == 0) {
            _tile_stored(0, tile, 64);
            if (t + 16 < longest) SCORE(3, t + 16);
        } else {
            _tile_stored(3, tile, 64);
            if (t + 16 < longest) SCORE(0, t + 16);
        }
        if (t >= inner_from && t + 16 <= inner_to) /* every lane valid for every row */
            for (int64_t i = 0; i < m; i++) {
                const __m512 s = finish(_mm512_loadu_ps(tile + 16 * i), scale, softcap);
                _mm512_storeu_ps(scratch + i * stride + t, s);
                _mm512_storeu_ps(high_lanes + 16 * i, _mm512_max_ps(_mm512_loadu_ps(high_lanes + 16 * i), s));
            }
        else
            for (int64_t i = 0; i < m; i++) {
                const __m512 s = finish(_mm512_loadu_ps(tile + 16 * i), scale, softcap);
                _mm512_storeu_ps(scratch + i * stride + t, s);
                const __mmask16 valid = valid_lanes(firsts[i], ends[i], wholes[i], t);
                if (valid) {
                    const __m512 high = _mm512_loadu_ps(high_lanes + 16 * i);
                    _mm512_storeu_ps(high_lanes + 16 * i, _mm512_mask_max_ps(high, valid, high, s));
                }
            }
    }
    for (int64_t i = 0; i < m; i++) {
        highs[i / group][i % group] = _mm512_reduce_max_ps(_mm512_loadu_ps(high_lanes + 16 * i));
        _mm512_storeu_ps(sum_lanes + 16 * i, _mm512_setzero_ps());
    }

#undef SCORE

    /* the numerators a group of 16 keys ahead of their tile ops */
    __m512 top[16];
    for (int64_t i = 0; i < m; i++) top[i] = _mm512_set1_ps(highs[i / group][i % group]);
    tile_config(m, 0);
    for (int64_t d0 = 0; d0 < dim; d0 += 64) {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
#define NUMERATORS(t) \
    numerators(scratch, stride, m, t, (t) >= inner_from && (t) + 16 <= inner_to, firsts, ends, wholes, top, sum_lanes)
        if (d0 == 0) NUMERATORS(lowest);
        for (int64_t t = lowest; t < longest; t += 16) {
            if (d0 == 0 && t + 16 < longest) NUMERATORS(t + 16);
            const bf16 *v = value_pair(c, kv_head, table, t);
            if (t + 16 > longest) { /* the last block's slots past the keys: read as zeros, stale inf or NaN too */
                memset(last_values, 0, sizeof(bf16) * 16 * dim);
                for (int64_t i = 0; i < longest - t; i++)
                    for (int64_t d = 0; d < dim; d++) last_values[(i / 2) * 2 * dim + 2 * d + i % 2] = v[(i / 2) * 2 * dim + 2 * d + i % 2];
                v = last_values;
            }
            _tile_loadd(4, (const bf16 *)scratch + t, stride * sizeof(float));
            const int64_t row_bytes = 2 * dim * sizeof(bf16);
            _tile_loadd(5, v + 2 * d0, row_bytes);
            _tile_dpbf16ps(0, 4, 5);
            if (d0 + 16 < dim) {
                _tile_loadd(5, v + 2 * (d0 + 16), row_bytes);
                _tile_dpbf16ps(1, 4, 5);
            }
            if (d0 + 32 < dim) {
                _tile_loadd(5, v + 2 * (d0 + 32), row_bytes);
                _tile_dpbf16ps(2, 4, 5);
            }
            if (d0 + 48 < dim) {
                _tile_loadd(5, v + 2 * (d0 + 48), row_bytes);
                _tile_dpbf16ps(3, 4, 5);
            }
        }
        /* sums [M][dim] at acc, 16 dims a tile */
        _tile_stored(0, acc + d0, dim * sizeof(float));
        if (d0 + 16 < dim) _tile_stored(1, acc + d0 + 16, dim * sizeof(float));
        if (d0 + 32 < dim) _tile_stored(2, acc + d0 + 32, dim * sizeof(float));
        if (d0 + 48 < dim) _tile_stored(3, acc + d0 + 48, dim * sizeof(float));
    }
    _tile_release();
#undef NUMERATORS
    for (int64_t i = 0; i < m; i++) sums[i / group][i % group] = _mm512_reduce_add_ps(_mm512_loadu_ps(sum_lanes + 16 * i));
    write_out(c, u, kv_head, acc, sums, highs);
}

/* A split unit's rows' outputs from their parts: each part's weighted values and sum rescaled by
 * e^(its largest score - the largest of all parts), added in part order in float32, divided by the
 * sum and rounded to bf16 once. */
TARGET static void combine(const Call *c, Split s, int64_t kv_head) {
    const int64_t group = c->heads / c->kv_heads, dim = c->head_dim, floats = PART_FLOATS(c);
    const float *first = c->parts + (s.part * c->kv_heads + kv_head) * floats;
    const int64_t highs = UNIT_ROWS * group * dim, sums = highs + UNIT_ROWS * group, step = c->kv_heads * floats;
    for (int64_t r = 0; r < s.rows; r++)
        for (int64_t g = 0; g < group; g++) {
            const int64_t at = r * group + g;
            float top = -INFINITY, sum = 0.0f;
            for (int64_t k = 0; k < s.parts; k++) top = first[k * step + highs + at] > top ? first[k * step + highs + at] : top;
            __m512 acc[MAX_HEAD_DIM / 16];
            for (int64_t d = 0; d < dim / 16; d++) acc[d] = _mm512_setzero_ps();
            for (int64_t k = 0; k < s.parts; k++) {
                const float *part = first + k * step, high = part[highs + at];
                const float scale = high > -INFINITY ? expf(high - top) : 0.0f;
                sum += part[sums + at] * scale;
                const __m512 sv = _mm512_set1_ps(scale);
                for (int64_t d = 0; d < dim / 16; d++)
                    acc[d] = _mm512_add_ps(acc[d], _mm512_mul_ps(_mm512_loadu_ps(part + at * dim + 16 * d), sv));
            }
            bf16 *out = c->out + (s.first + r) * c->out_stride + (kv_head * group + g) * dim;
            const __m512 norm = _mm512_set1_ps(1.0f / sum);
            for (int64_t d = 0; d < dim / 16; d++) store_bf16(out + 16 * d, _mm512_mul_ps(acc[d], norm));
        }
}

#else
static void combine(const Call *c, Split s, int64_t kv_head) { (void)c, (void)s, (void)kv_head; }
static void rotate_rows(const Call *c, bf16 *x, int64_t stride, int64_t heads) { (void)c, (void)x, (void)stride, (void)heads; }
static void attend_unit(const Call *c, Unit u, int64_t kv_head, float *scratch, int64_t stride) {
    (void)c, (void)u, (void)kv_head, (void)scratch, (void)stride;
}
static void attend_unit_amx(const Call *c, Unit u, int64_t kv_head, float *scratch, int64_t stride) {
    (void)c, (void)u, (void)kv_head, (void)scratch, (void)stride;
}
#endif

/* Units by their first key, then their first row: a thread's next unit most often reads the keys
 * and values the last one read (see attend_rows). */
static int by_keys(const void *a, const void *b) {
    const Unit *x = a, *y = b;
    return x->lo != y->lo ? (x->lo < y->lo ? -1 : 1) : (x->first > y->first) - (x->first < y->first);
}

/* Every row's attention, on `threads`: where c.cos is set, q and the new keys are rotated first, in
 * place; then the rows' new keys and values are written, and each row attends. NULL, or what went
 * wrong (see cpu.h's entry points). */
static const char *attend_rows(Call c, int threads) {
    const int64_t group = c.heads / c.kv_heads;
    if (c.head_dim % 32 || c.head_dim > MAX_HEAD_DIM || group > MAX_GROUP || group * c.kv_heads != c.heads ||
        c.block_size % 16 || (c.amx && (group > 16 || !amx_supported())) || c.window < 0 || !(c.softcap >= 0) ||
        (c.cos && (c.sin == NULL || c.positions == NULL || c.rope_half < 1 || 2 * c.rope_half > c.head_dim))) {
        return "unsupported head layout";
    }
    /* what the kernel reads and writes stays inside the caches, whatever the caller passes */
    for (int64_t r = 0; r < c.rows; r++) {
        if (c.seq[r] < 0 || c.seq[r] >= c.sequences || c.keys[r] < 1 || c.keys[r] > c.table_stride * c.block_size || c.slots[r] < 0 ||
            c.slots[r] >= c.num_blocks * c.block_size || (c.cos && (c.positions[r] < 0 || c.positions[r] >= c.rope_positions))) {
            return "attend: a row's keys, table, slot or position is out of range";
        }
    }
    for (int64_t i = 0; i < c.sequences * c.table_stride; i++)
        if (c.tables[i] < 0 || c.tables[i] >= c.num_blocks) {
            return "attend: a block table names a block outside the cache";
        }
    /* units of up to `cap` consecutive rows of one sequence, either all split into parts or none */
    int64_t longest = 1, count = 0, splits = 0, parts = 0;
    const int64_t cap = c.amx && 16 / group < UNIT_ROWS ? 16 / group : UNIT_ROWS; /* AMX: rows x group <= 16 */
    Split *rows_of = malloc(sizeof(Split) * (size_t)(c.rows + 1));
    if (rows_of == NULL) return KERNEL_NO_MEMORY;
    for (int64_t r = 0; r < c.rows; r++) {
        longest = c.keys[r] > longest ? c.keys[r] : longest;
        const int split = c.keys[r] - first_key(&c, r) > PART_KEYS;
        Split *last = count ? &rows_of[count - 1] : NULL;
        if (last && last->rows < cap && c.seq[last->first] == c.seq[r] && (last->parts > 0) == split) {
            last->rows++;
        } else {
            rows_of[count++] = (Split){r, 1, 0, split};
        }
    }
    int64_t units_count = 0;
    for (int64_t i = 0; i < count; i++) {
        Split *g = &rows_of[i];
        if (g->parts) { /* the parts from its first row's first key to its last row's last */
            const int64_t from = first_key(&c, g->first) / PART_KEYS, to = (c.keys[g->first + g->rows - 1] - 1) / PART_KEYS;
            g->part = parts, g->parts = to - from + 1, parts += g->parts, splits++;
        }
        units_count += g->parts ? g->parts : 1;
    }
    Unit *units = malloc(sizeof(Unit) * (size_t)(units_count + 1)); /* + 1: never malloc(0), whose NULL may be no error */
    Split *split_rows = malloc(sizeof(Split) * (size_t)(splits + 1));
    float *partials = parts ? malloc(sizeof(float) * (size_t)(parts * c.kv_heads * PART_FLOATS(&c))) : NULL;
    if (units == NULL || split_rows == NULL || (parts && partials == NULL)) {
        free(rows_of), free(units), free(split_rows), free(partials);
        return KERNEL_NO_MEMORY;
    }
    c.parts = partials;
    for (int64_t i = 0, u = 0, sp = 0; i < count; i++) {
        const Split g = rows_of[i];
        if (!g.parts) {
            units[u++] = (Unit){g.first, g.rows, 0, INT64_MAX, -1};
            continue;
        }
        split_rows[sp++] = g;
        const int64_t from = first_key(&c, g.first) / PART_KEYS;
        for (int64_t k = 0; k < g.parts; k++)
            units[u++] = (Unit){g.first, g.rows, (from + k) * PART_KEYS, (from + k + 1) * PART_KEYS, g.part + k};
    }
    free(rows_of);
    qsort(units, (size_t)units_count, sizeof(Unit), by_keys);
    const int64_t stride = (longest + 15) / 16 * 16, work = units_count * c.kv_heads;
    const int64_t per_thread = UNIT_ROWS * group * (stride + c.head_dim) + (c.amx ? 16 * c.head_dim + 768 : 0);
    const int team = threads < 1 ? 1 : (work < threads ? (int)work : threads);
    float *scratch = malloc(sizeof(float) * (size_t)(team * per_thread));
    if (scratch == NULL) {
        free(units), free(split_rows), free(partials);
        return KERNEL_NO_MEMORY;
    }
    if (c.cos) {
        rotate_rows(&c, (bf16 *)c.q, c.q_stride, c.heads);
        rotate_rows(&c, (bf16 *)c.k_new, c.k_stride, c.kv_heads);
    }
    write_cache(&c);
#pragma omp parallel num_threads(team) if (team > 1)
    {
        float *mine = scratch;
#ifdef _OPENMP
        mine += (int64_t)omp_get_thread_num() * per_thread;
#endif
        /* KV head outermost, then the units by their first key (by_keys): a thread's next unit is
           most often another unit of the same KV head and part of a prompt chunk, whose keys and
           values its L2 still holds (SmolLM2 at 4,000 tokens: 1 MB a head, 3 MB for all three, more
           than the 2 MB L2 of the Xeon of these notes). With heads innermost, a 512-row chunk at
           4,000 tokens took 23 ms on one thread on AMX, this way 14.6 ms (K/V came from L3 for every
           unit of 4 rows); at 8,000 tokens (2 MB a head), going part by part: 45 -> 22 ms on one
           thread, 21 -> 12 ms on two (with attend_unit_amx's own changes). */
#pragma omp for schedule(dynamic, 1)
        for (int64_t w = 0; w < work; w++)
            (c.amx ? attend_unit_amx : attend_unit)(&c, units[w % units_count], w / units_count, mine, stride);
#pragma omp for schedule(dynamic, 1)
        for (int64_t w = 0; w < splits * c.kv_heads; w++) combine(&c, split_rows[w / c.kv_heads], w % c.kv_heads);
    }
    free(units), free(split_rows), free(partials);
    free(scratch);
    return NULL;
}

/* attend(threads, rows, heads, kv_heads, head_dim, q, q_stride, out, out_stride, k_cache, v_cache,
 *        num_blocks, block_size, tables, sequences, table_stride, seq, keys, scale,
 *        k_new, k_stride, v_new, v_stride, slots, amx, window, softcap, cos, sin, rope_positions, rope_half,
 *        positions): pointers as ints, strides in elements; where cos is not 0, q and the new keys are
 * rotated first, in place; then the `rows` new tokens' keys and values are written. The caller
 * checks shapes (parley/kernels/attention.py); attend_rows does the work. */
static PyObject *attend(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 32) {
        PyErr_SetString(PyExc_TypeError, "attend takes 32 arguments");
        return NULL;
    }
    const int threads = (int)PyLong_AsLong(args[0]);
    Call c = {.rows = PyLong_AsLongLong(args[1]), .heads = PyLong_AsLongLong(args[2]),
              .kv_heads = PyLong_AsLongLong(args[3]), .head_dim = PyLong_AsLongLong(args[4]),
              .q = PyLong_AsVoidPtr(args[5]), .q_stride = PyLong_AsLongLong(args[6]),
              .out = PyLong_AsVoidPtr(args[7]), .out_stride = PyLong_AsLongLong(args[8]),
              .k_cache = PyLong_AsVoidPtr(args[9]), .v_cache = PyLong_AsVoidPtr(args[10]),
              .num_blocks = PyLong_AsLongLong(args[11]), .block_size = PyLong_AsLongLong(args[12]),
              .tables = PyLong_AsVoidPtr(args[13]), .sequences = PyLong_AsLongLong(args[14]),
              .table_stride = PyLong_AsLongLong(args[15]), .seq = PyLong_AsVoidPtr(args[16]),
              .keys = PyLong_AsVoidPtr(args[17]), .scale = (float)PyFloat_AsDouble(args[18]),
              .k_new = PyLong_AsVoidPtr(args[19]), .k_stride = PyLong_AsLongLong(args[20]),
              .v_new = PyLong_AsVoidPtr(args[21]), .v_stride = PyLong_AsLongLong(args[22]),
              .slots = PyLong_AsVoidPtr(args[23]), .amx = PyObject_IsTrue(args[24]),
              .window = PyLong_AsLongLong(args[25]), .softcap = (float)PyFloat_AsDouble(args[26]),
              .cos = PyLong_AsVoidPtr(args[27]), .sin = PyLong_AsVoidPtr(args[28]),
              .rope_positions = PyLong_AsLongLong(args[29]), .rope_half = PyLong_AsLongLong(args[30]),
              .positions = PyLong_AsVoidPtr(args[31])};
    if (PyErr_Occurred()) return NULL;
    const char *error;
    Py_BEGIN_ALLOW_THREADS
    error = attend_rows(c, threads);
    Py_END_ALLOW_THREADS
    return kernel_result(error);
}

static PyMethodDef methods[] = {
    {"amx", amx, METH_NOARGS, "Whether this CPU and process can run the kernel on AMX tiles."},
    {"attend", (PyCFunction)(void (*)(void))attend, METH_FASTCALL, "Paged attention for every row, into out."},
    {"supported", supported, METH_NOARGS, "Whether this CPU runs the kernel (AVX512-BF16)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_attention", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__attention(void) {
    Attend entry = attend_rows; /* the type checks the signature */
    return export_entry(PyModule_Create(&module), "c_attend", "parley.kernels._attention.c_attend", (void *)entry);
}
