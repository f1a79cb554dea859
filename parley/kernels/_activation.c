/* A gated MLP's activation, silu(gate) * up, in one call for a flat batch of bf16 rows on CPUs with
 * AVX512-BF16, from the fused gate_up projection's output [rows][2 * inter] (gate, then up).
 *
 * Why a kernel: in torch it is three ops a layer (chunk, silu, mul) and a temporary, ~5 us at one
 * row, 30 layers a step of the default model. As torch rounds them: silu rounded to bf16, then
 * the product rounded to bf16. silu(g) = g * sigmoid(g), the sigmoid from e^-|g| (exp_nonpositive,
 * ~1 ulp): its float32 value can differ from torch's (Sleef's exp) in the last bits, so a result
 * can differ by one bf16 rounding; each row's elements are their own work, so a row's bits never
 * depend on the rows beside it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#include "cpu.h"

#if PARLEY_SIMD
/* silu(g) * u for `inter` elements of one row. */
TARGET static void silu_mul_row(const bf16 *gate, const bf16 *up, bf16 *out, int64_t inter) {
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int64_t i = 0; i < inter; i += 16) {
        const __mmask16 m = inter - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (inter - i)) - 1);
        const __m512 g = load_bf16_masked(gate + i, m);
        const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(g))); /* e^-|g| */
        /* sigmoid(g): 1 / (1 + e) for g >= 0, e / (1 + e) below */
        const __mmask16 negative = _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_LT_OQ);
        const __m512 sigmoid = _mm512_div_ps(_mm512_mask_mov_ps(one, negative, e), _mm512_add_ps(one, e));
        const __m512 silu = round_bf16(_mm512_mul_ps(g, sigmoid));
        store_bf16_masked(out + i, m, _mm512_mul_ps(silu, load_bf16_masked(up + i, m)));
    }
}
#endif

/* gate_up rows of `stride` elements (gate at 0, up at inter), out contiguous [rows][inter]. NULL, or
 * what went wrong (see cpu.h's entry points). */
static const char *silu_mul_rows(int threads, int64_t rows, int64_t inter, const bf16 *gate_up, int64_t stride,
                                 bf16 *out) {
    if (!cpu_supported() || stride < 2 * inter) return "silu_mul: unsupported CPU or layout";
#if PARLEY_SIMD
    /* one thread below ~64k elements: a fork and join costs more than the work */
    const int team = rows * inter >= 65536 && threads > 1 ? threads : 1;
#pragma omp parallel for num_threads(team) if (team > 1)
    for (int64_t r = 0; r < rows; r++) silu_mul_row(gate_up + r * stride, gate_up + r * stride + inter, out + r * inter, inter);
#else
    (void)threads, (void)rows, (void)gate_up, (void)out;
#endif
    return NULL;
}

/* silu_mul(threads, rows, inter, gate_up, stride, out): silu_mul_rows's arguments, pointers as ints.
 * The caller checks shapes (parley/kernels/activation.py). */
static PyObject *silu_mul(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "silu_mul takes 6 arguments");
        return NULL;
    }
    const int threads = (int)PyLong_AsLong(args[0]);
    const int64_t rows = PyLong_AsLongLong(args[1]), inter = PyLong_AsLongLong(args[2]);
    const bf16 *gate_up = PyLong_AsVoidPtr(args[3]);
    const int64_t stride = PyLong_AsLongLong(args[4]);
    bf16 *out = PyLong_AsVoidPtr(args[5]);
    if (PyErr_Occurred()) return NULL;
    const char *error;
    Py_BEGIN_ALLOW_THREADS
    error = silu_mul_rows(threads, rows, inter, gate_up, stride, out);
    Py_END_ALLOW_THREADS
    return kernel_result(error);
}

static PyMethodDef methods[] = {
    {"silu_mul", (PyCFunction)(void (*)(void))silu_mul, METH_FASTCALL, "silu(gate) * up of every row."},
    {"supported", supported, METH_NOARGS, "Whether this CPU runs the kernel (AVX512-BF16)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_activation", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__activation(void) {
    SiluMul entry = silu_mul_rows; /* the type checks the signature */
    return export_entry(PyModule_Create(&module), "c_silu_mul", "parley.kernels._activation.c_silu_mul", (void *)entry);
}
