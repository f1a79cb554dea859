/* What the C kernels (_attention.c, _q4.c, _norm.c, _lora.c) share: the bf16 type, the target attributes of their
 * AVX512-BF16 and AMX paths, AMX's tile configuration, and whether this CPU and process run them.
 * Off x86-64 (or built with -DPARLEY_NO_SIMD) PARLEY_SIMD is 0 and they say unsupported. */
#ifndef PARLEY_CPU_H
#define PARLEY_CPU_H

#include <stdint.h>
#include <sys/syscall.h>
#include <unistd.h>

typedef uint16_t bf16;

#if defined(__x86_64__) && defined(__GNUC__) && !defined(PARLEY_NO_SIMD)
#define PARLEY_SIMD 1
#include <immintrin.h>

#define TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#define AMX __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,amx-tile,amx-bf16")))

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
#endif

#endif
