/* RMSNorm with the residual add before it, one call for a flat batch of bf16 rows on CPUs with
 * AVX512-BF16: total = hidden + delta (rounded to bf16 as torch's add rounds it), out = total /
 * rms(total) * weight, in float32, rounded to bf16 once.
 *
 * Why a kernel: a decoder layer adds a residual and normalizes twice; in torch that is two ops
 * and a composite norm of several more, ~20 us each at one row: 61 norms and 60 adds a step of the
 * default model, ~10% of a batch-1 decode step. Each row is its own work, its squares summed in one
 * fixed order: a row's bits do not depend on the rows beside it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>

#include "cpu.h"

#if PARLEY_SIMD
/* One row of `width` (a multiple of 16): total (if `hidden`) and out. */
TARGET static void norm_row(const bf16 *delta, const bf16 *hidden, bf16 *total, bf16 *out, const bf16 *weight,
                            int64_t width, float eps) {
    __m512 squares = _mm512_setzero_ps();
    for (int64_t i = 0; i < width; i += 16) {
        __m512 v = load_bf16(delta + i);
        if (hidden) {
            store_bf16(total + i, _mm512_add_ps(v, load_bf16(hidden + i)));
            v = load_bf16(total + i); /* the sum as rounded to bf16 */
        }
        squares = _mm512_fmadd_ps(v, v, squares);
    }
    const __m512 inverse = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(squares) / (float)width + eps));
    const bf16 *source = hidden ? total : delta;
    for (int64_t i = 0; i < width; i += 16)
        store_bf16(out + i, _mm512_mul_ps(_mm512_mul_ps(load_bf16(source + i), inverse), load_bf16(weight + i)));
}
#endif

/* Every row's residual add and norm: contiguous rows; total may be hidden (each 16 are read before
 * written). NULL, or what went wrong (see cpu.h's entry points). */
static const char *rms_norm_rows(int64_t rows, int64_t width, const bf16 *delta, const bf16 *hidden, bf16 *total,
                                 bf16 *out, const bf16 *weight, float eps) {
    if (!cpu_supported() || width % 16) return "rms_norm: unsupported CPU or width";
#if PARLEY_SIMD
    for (int64_t r = 0; r < rows; r++)
        norm_row(delta + r * width, hidden ? hidden + r * width : NULL, total + r * width, out + r * width, weight,
                 width, eps);
#else
    (void)rows, (void)delta, (void)hidden, (void)total, (void)out, (void)weight, (void)eps;
#endif
    return NULL;
}

/* rms_norm(rows, width, delta, hidden or 0, total, out, weight, eps): rms_norm_rows's arguments,
 * pointers as ints; the caller checks shapes (parley/kernels/norm.py). */
static PyObject *rms_norm(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError, "rms_norm takes 8 arguments");
        return NULL;
    }
    const int64_t rows = PyLong_AsLongLong(args[0]), width = PyLong_AsLongLong(args[1]);
    const bf16 *delta = PyLong_AsVoidPtr(args[2]), *hidden = PyLong_AsVoidPtr(args[3]);
    bf16 *total = PyLong_AsVoidPtr(args[4]), *out = PyLong_AsVoidPtr(args[5]);
    const bf16 *weight = PyLong_AsVoidPtr(args[6]);
    const float eps = (float)PyFloat_AsDouble(args[7]);
    if (PyErr_Occurred()) return NULL;
    return kernel_result(rms_norm_rows(rows, width, delta, hidden, total, out, weight, eps));
}

static PyMethodDef methods[] = {
    {"rms_norm", (PyCFunction)(void (*)(void))rms_norm, METH_FASTCALL, "Residual add and RMSNorm of every row."},
    {"supported", supported, METH_NOARGS, "Whether this CPU runs the kernel (AVX512-BF16)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_norm", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__norm(void) {
    RmsNorm entry = rms_norm_rows; /* the type checks the signature */
    return export_entry(PyModule_Create(&module), "c_rms_norm", "parley.kernels._norm.c_rms_norm", (void *)entry);
}
