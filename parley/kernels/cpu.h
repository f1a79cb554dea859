/* What the C kernels (_attention.c, _quant.c, _norm.c, _activation.c, _lora.c, _sample.c, _stack.c) share: the
 * bf16 type, the target attributes of their AVX512-BF16 and AMX paths, AMX's tile configuration, bf16
 * loads and stores, a vector exp, whether this CPU and process run them, and the entry points C
 * callers use.
 * Off x86-64 (or built with -DPARLEY_NO_SIMD) PARLEY_SIMD is 0 and they say unsupported. */
#ifndef PARLEY_CPU_H
#define PARLEY_CPU_H

#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

typedef uint16_t bf16;

#if defined(__x86_64__) && defined(__GNUC__) && !defined(PARLEY_NO_SIMD)
#define PARLEY_SIMD 1
#include <immintrin.h>

#define TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#define AMX __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,amx-tile,amx-bf16")))

/* 16 bf16 as float32 (exact); float32 stored as bf16, rounded to nearest even as torch rounds. */
TARGET static inline __m512 load_bf16(const bf16 *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

TARGET static inline __m512 load_bf16_masked(const bf16 *p, __mmask16 m) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

TARGET static inline void store_bf16(bf16 *p, __m512 v) { _mm256_storeu_si256((__m256i *)p, (__m256i)_mm512_cvtneps_pbh(v)); }

TARGET static inline void store_bf16_masked(bf16 *p, __mmask16 m, __m512 v) {
    _mm256_mask_storeu_epi16(p, m, (__m256i)_mm512_cvtneps_pbh(v));
}

/* v rounded to bf16 and back: what a torch op in bf16 leaves of its float32 result. */
TARGET static inline __m512 round_bf16(__m512 v) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
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

/* AMX's tile configuration (palette 1): rows and bytes per row of each of the 8 tiles. */
typedef struct __attribute__((packed)) {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} TileConfig;

/* Whether this process may use AMX tiles: the CPU has them and Linux grants their state. */
static inline int amx_supported(void) {
    static int known = -1; /* asked once a process: the permission is the process's */
    if (known < 0) {
        __builtin_cpu_init();
        known = __builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-bf16") &&
                syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
    }
    return known;
}

static inline int cpu_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bf16");
}
#else
#define PARLEY_SIMD 0
static inline int cpu_supported(void) { return 0; }
static inline int amx_supported(void) { return 0; }
#endif

#ifdef Py_PYTHON_H
/* The module functions every kernel has: supported() and amx(). */
static PyObject *supported(PyObject *self, PyObject *unused) {
    (void)self, (void)unused;
    return PyBool_FromLong(cpu_supported());
}

__attribute__((unused)) static PyObject *amx(PyObject *self, PyObject *unused) {
    (void)self, (void)unused;
    return PyBool_FromLong(amx_supported());
}

/* Entry points for C callers (_stack.c runs a stack of decoder layers in one call): a kernel's
 * Python function parses its arguments and calls a plain C function, which touches no Python
 * object (it runs without the GIL) and returns NULL, or what went wrong: KERNEL_NO_MEMORY or the
 * text of a ValueError. Each module exports it as a capsule (export_entry); the types below are
 * their signatures. */
#define KERNEL_NO_MEMORY "out of memory"

/* _attention.c: paged attention of a flat batch (the fields: there), on `threads`. */
typedef struct {
    int64_t rows, heads, kv_heads, head_dim, num_blocks, block_size, sequences, table_stride;
    const bf16 *q;
    int64_t q_stride; /* elements between rows; a row's heads are contiguous */
    bf16 *out;
    int64_t out_stride;
    bf16 *k_cache, *v_cache;
    const int64_t *tables;
    const int32_t *seq, *keys;
    float scale;
    const bf16 *k_new, *v_new; /* each row's own key and value, written into the cache first */
    int64_t k_stride, v_stride; /* elements between rows; a row's heads are contiguous */
    const int64_t *slots;       /* each new token's slot: block * block_size + offset */
    int amx;                    /* units run on AMX tiles (attend_unit_amx) */
    int64_t window;             /* > 0: a row sees only its last `window` keys (itself included) */
    float softcap;              /* > 0: scores -> softcap * tanh(scores / softcap) (Gemma 2) */
    const bf16 *cos, *sin;      /* RoPE tables [rope_positions][rope_half], or NULL: no rotation */
    const int64_t *positions;   /* each row's position, the table row it is rotated by */
    int64_t rope_half, rope_positions;
    float *parts;               /* the kernel's own: the split units' partial results (see Unit) */
} AttendCall;
typedef const char *(*Attend)(AttendCall, int);
/* _quant.c: y = x W^T (+ bias) for 4- or 8-bit W (threads, rows, out, in, x, x_stride, w, bias, y, y_stride, amx, bits). */
typedef const char *(*QuantLinear)(int, int64_t, int64_t, int64_t, const bf16 *, int64_t, const uint8_t *, const bf16 *,
                                   bf16 *, int64_t, int, int);
/* _norm.c: residual add and RMSNorm (rows, width, delta, hidden or NULL, total, out, weight, eps). */
typedef const char *(*RmsNorm)(int64_t, int64_t, const bf16 *, const bf16 *, bf16 *, bf16 *, const bf16 *, float);
/* _activation.c: silu(gate) * up (threads, rows, inter, gate_up, stride, out). */
typedef const char *(*SiluMul)(int, int64_t, int64_t, const bf16 *, int64_t, bf16 *);

/* Python's None, or the exception `error` names. */
__attribute__((unused)) static PyObject *kernel_result(const char *error) {
    if (error == NULL) Py_RETURN_NONE;
    if (strcmp(error, KERNEL_NO_MEMORY) == 0) return PyErr_NoMemory();
    PyErr_SetString(PyExc_ValueError, error);
    return NULL;
}

/* `module` with the capsule `name` (its full name `capsule`, as PyCapsule_Import finds it) holding `entry`. */
__attribute__((unused)) static PyObject *export_entry(PyObject *module, const char *name, const char *capsule, void *entry) {
    if (module == NULL) return NULL;
    PyObject *object = PyCapsule_New(entry, capsule, NULL);
    if (object == NULL || PyModule_AddObject(module, name, object) < 0) {
        Py_XDECREF(object);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
#endif

#endif
