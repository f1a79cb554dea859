/* Paged attention for a flat batch on x86 CPUs with AVX512-BF16: every query row (a decode token or
 * a token of a prompt chunk) attends to the first `keys` tokens of its sequence, read from the KV
 * cache's blocks where they lie.
 *
 * Why a kernel: done with torch ops, a layer's attention gathers every sequence's blocks into one
 * tensor (a copy of the whole context per layer and step), builds float32 scores and masks for the
 * padded width, and runs a dozen ops of ~10 us each before any work; at 32 decode rows it was a third
 * of the step, and a prompt chunk's cost grew with the whole padded context.
 *
 * Batch invariance by construction: one unit of work is one row and one KV head (its query heads
 * together, sharing each key and value load), computed by one thread start to end, in key order,
 * from nothing but that row's query and its sequence's first `keys` keys and values. So a row gets
 * the same bits alone, beside other rows, as a decode token or inside a prompt chunk of any size,
 * on any number of threads.
 *
 * Numerics: q.k is summed in fp32 over exact bf16 products (dpbf16), scaled in fp32; the softmax is
 * float32 (a vector exp, ~1 ulp); probabilities stay float32 and the weighted values are summed in
 * fp32 and rounded to bf16 once. That is at least as precise as eager attention in bf16, which
 * rounds the scores and the probabilities to bf16.
 *
 * The cache of one layer: bf16 [kv_heads, num_blocks, block_size, head_dim]; tables int64
 * [sequences, table_stride] of block ids; per row int32 seq (its table's row) and keys.
 *
 * Off x86-64 (or built with -DPARLEY_NO_SIMD) the module loads, says it is unsupported, and
 * parley/models/attention.py keeps its torch path.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

typedef uint16_t bf16;

#define MAX_HEAD_DIM 256
#define MAX_GROUP 32 /* query heads per KV head */

typedef struct {
    int64_t rows, heads, kv_heads, head_dim, num_blocks, block_size, table_stride;
    const bf16 *q;
    int64_t q_stride; /* elements between rows; a row's heads are contiguous */
    bf16 *out;
    int64_t out_stride;
    const bf16 *k_cache, *v_cache;
    const int64_t *tables;
    const int32_t *seq, *keys;
    float scale;
} Call;

#if defined(__x86_64__) && defined(__GNUC__) && !defined(PARLEY_NO_SIMD)
#include <immintrin.h>

#define TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

TARGET static inline __m512 widen(__m256i v) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

/* e^x for x <= 0, as Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, e^r by a degree-6 polynomial,
 * scaled by 2^n (scalef flushes what underflows to zero). */
TARGET static inline __m512 exp_nonpositive(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

static inline const bf16 *token_at(const Call *c, const bf16 *cache, int64_t kv_head, const int64_t *table,
                                   int64_t t) {
    const int64_t block = table[t / c->block_size];
    return cache + ((kv_head * c->num_blocks + block) * c->block_size + t % c->block_size) * c->head_dim;
}

/* One row, one KV head: its `group` query heads over the row's keys. `scores`: [group][keys]. */
TARGET static void attend_unit(const Call *c, int64_t row, int64_t kv_head, float *scores, int64_t stride) {
    const int64_t group = c->heads / c->kv_heads, dim = c->head_dim, vecs = dim / 16, keys = c->keys[row];
    const int64_t *table = c->tables + (int64_t)c->seq[row] * c->table_stride;
    const bf16 *q = c->q + row * c->q_stride + kv_head * group * dim;

    /* scores[g][t] = scale * q_g . k_t */
    __m512bh qv[MAX_GROUP][MAX_HEAD_DIM / 32];
    for (int64_t g = 0; g < group; g++)
        for (int64_t d = 0; d < dim / 32; d++) qv[g][d] = (__m512bh)_mm512_loadu_si512(q + g * dim + 32 * d);
    for (int64_t t = 0; t < keys; t++) {
        const bf16 *k = token_at(c, c->k_cache, kv_head, table, t);
        __m512bh kv[MAX_HEAD_DIM / 32];
        for (int64_t d = 0; d < dim / 32; d++) kv[d] = (__m512bh)_mm512_loadu_si512(k + 32 * d);
        for (int64_t g = 0; g < group; g++) {
            __m512 acc = _mm512_setzero_ps();
            for (int64_t d = 0; d < dim / 32; d++) acc = _mm512_dpbf16_ps(acc, qv[g][d], kv[d]);
            scores[g * stride + t] = _mm512_reduce_add_ps(acc) * c->scale;
        }
    }

    /* softmax numerators in place, and 1 / their sum; lanes of 16 keys, then in lane order */
    float inverse[MAX_GROUP];
    const int64_t full = keys / 16 * 16;
    const __mmask16 tail = (__mmask16)((1u << (keys - full)) - 1);
    for (int64_t g = 0; g < group; g++) {
        float *s = scores + g * stride;
        __m512 high = _mm512_set1_ps(-INFINITY);
        for (int64_t t = 0; t < full; t += 16) high = _mm512_max_ps(high, _mm512_loadu_ps(s + t));
        high = _mm512_mask_max_ps(high, tail, high, _mm512_maskz_loadu_ps(tail, s + full));
        const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(high));
        __m512 sum = _mm512_setzero_ps();
        for (int64_t t = 0; t < full; t += 16) {
            const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(s + t), top));
            _mm512_storeu_ps(s + t, e);
            sum = _mm512_add_ps(sum, e);
        }
        if (tail) {
            const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, s + full), top));
            _mm512_mask_storeu_ps(s + full, tail, e);
            sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(tail, e));
        }
        inverse[g] = 1.0f / _mm512_reduce_add_ps(sum);
    }

    /* out_g = sum_t p_g[t] v_t / sum_t p_g[t], heads taken up to 4 at a time to share each v load */
    bf16 *out = c->out + row * c->out_stride + kv_head * group * dim;
    for (int64_t g0 = 0; g0 < group; g0 += 4) {
        const int64_t gn = group - g0 < 4 ? group - g0 : 4;
        __m512 acc[4][MAX_HEAD_DIM / 16];
        for (int64_t g = 0; g < gn; g++)
            for (int64_t d = 0; d < vecs; d++) acc[g][d] = _mm512_setzero_ps();
        for (int64_t t = 0; t < keys; t++) {
            const bf16 *v = token_at(c, c->v_cache, kv_head, table, t);
            __m512 vv[MAX_HEAD_DIM / 16];
            for (int64_t d = 0; d < vecs; d++) vv[d] = widen(_mm256_loadu_si256((const __m256i *)(v + 16 * d)));
            for (int64_t g = 0; g < gn; g++) {
                const __m512 p = _mm512_set1_ps(scores[(g0 + g) * stride + t]);
                for (int64_t d = 0; d < vecs; d++) acc[g][d] = _mm512_fmadd_ps(p, vv[d], acc[g][d]);
            }
        }
        for (int64_t g = 0; g < gn; g++) {
            const __m512 norm = _mm512_set1_ps(inverse[g0 + g]);
            for (int64_t d = 0; d < vecs; d++)
                _mm256_storeu_si256((__m256i *)(out + (g0 + g) * dim + 16 * d),
                                    (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[g][d], norm)));
        }
    }
}

static int cpu_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bf16");
}
#else
static void attend_unit(const Call *c, int64_t row, int64_t kv_head, float *scores, int64_t stride) {
    (void)c, (void)row, (void)kv_head, (void)scores, (void)stride;
}
static int cpu_supported(void) { return 0; }
#endif

/* attend(threads, rows, heads, kv_heads, head_dim, q, q_stride, out, out_stride, k_cache, v_cache,
 *        num_blocks, block_size, tables, table_stride, seq, keys, scale): pointers as ints, strides
 * in elements. The caller checks shapes (parley/kernels/attention.py). */
static PyObject *attend(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 18) {
        PyErr_SetString(PyExc_TypeError, "attend takes 18 arguments");
        return NULL;
    }
    const int threads = (int)PyLong_AsLong(args[0]);
    Call c = {.rows = PyLong_AsLongLong(args[1]), .heads = PyLong_AsLongLong(args[2]),
              .kv_heads = PyLong_AsLongLong(args[3]), .head_dim = PyLong_AsLongLong(args[4]),
              .q = PyLong_AsVoidPtr(args[5]), .q_stride = PyLong_AsLongLong(args[6]),
              .out = PyLong_AsVoidPtr(args[7]), .out_stride = PyLong_AsLongLong(args[8]),
              .k_cache = PyLong_AsVoidPtr(args[9]), .v_cache = PyLong_AsVoidPtr(args[10]),
              .num_blocks = PyLong_AsLongLong(args[11]), .block_size = PyLong_AsLongLong(args[12]),
              .tables = PyLong_AsVoidPtr(args[13]), .table_stride = PyLong_AsLongLong(args[14]),
              .seq = PyLong_AsVoidPtr(args[15]), .keys = PyLong_AsVoidPtr(args[16]),
              .scale = (float)PyFloat_AsDouble(args[17])};
    if (PyErr_Occurred()) return NULL;
    const int64_t group = c.heads / c.kv_heads;
    if (c.head_dim % 32 || c.head_dim > MAX_HEAD_DIM || group > MAX_GROUP || group * c.kv_heads != c.heads) {
        PyErr_SetString(PyExc_ValueError, "unsupported head layout");
        return NULL;
    }
    int64_t longest = 1;
    for (int64_t r = 0; r < c.rows; r++) longest = c.keys[r] > longest ? c.keys[r] : longest;
    const int64_t stride = (longest + 15) / 16 * 16, units = c.rows * c.kv_heads;
    const int team = threads < 1 ? 1 : (units < threads ? (int)units : threads);
    float *scratch = malloc(sizeof(float) * (size_t)(team * group * stride));
    if (scratch == NULL) return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel num_threads(team) if (team > 1)
    {
        float *scores = scratch;
#ifdef _OPENMP
        scores += (int64_t)omp_get_thread_num() * group * stride;
#endif
#pragma omp for schedule(dynamic, 1)
        for (int64_t u = 0; u < units; u++) attend_unit(&c, u / c.kv_heads, u % c.kv_heads, scores, stride);
    }
    Py_END_ALLOW_THREADS
    free(scratch);
    Py_RETURN_NONE;
}

static PyObject *supported(PyObject *self, PyObject *unused) {
    (void)self, (void)unused;
    return PyBool_FromLong(cpu_supported());
}

static PyMethodDef methods[] = {
    {"attend", (PyCFunction)(void (*)(void))attend, METH_FASTCALL, "Paged attention for every row, into out."},
    {"supported", supported, METH_NOARGS, "Whether this CPU runs the kernel (AVX512-BF16)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_attention", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__attention(void) { return PyModule_Create(&module); }
