/* A stack of pre-norm decoder layers (Llama's: h + attention(norm(h)), then + mlp(norm(.))), with 4- or
 * 8-bit projections, in one call a step for a flat batch of bf16 rows: the kernels of _norm.c,
 * _quant.c, _attention.c and _activation.c, called through their C entry points (cpu.h), in the
 * order and on the buffers parley/models/layers/decoder.py calls them from Python, so the same bits.
 *
 * Why: from Python a layer is ~25 calls (the kernels' wrappers, their checks, views, allocations).
 * Measured on a Xeon with AMX, one decode step of the default model replayed 100 times (2 threads):
 * one row 8.7-9.1 -> 4.1-4.2 ms, 32 rows 19.8-20.1 -> 15.1-15.4 ms. More than the Python itself
 * (~2 ms a step with the kernels stubbed out): the kernels run faster back to back. Called one by
 * one from Python the projections alone took 4.3 ms of the one-row step (cProfile), against 4.1 ms
 * for all the layers here; bench/quant.py's one-row shapes took 4.2 ms back to back and 4.9 ms with
 * 30 us between calls (BENCHMARKS.md, ninth session: the VM's shared L3 keeps less of the weights
 * the longer a step takes); OMP_WAIT_POLICY (active or passive) did not close the gap. Here a step
 * is one call, without the GIL (the server's event loop runs meanwhile), its buffers allocated once.
 *
 * layers: int64 [num_layers][LAYER_FIELDS] (pointers as ints; parley/kernels/stack.py builds it).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>

#include "cpu.h"

enum { INPUT_NORM, POST_NORM, QKV, QKV_BITS, QKV_BIAS, O, O_BITS, O_BIAS, GATE_UP, GATE_UP_BITS, DOWN, DOWN_BITS,
       K_CACHE, V_CACHE, WINDOW, LAYER_FIELDS };

static Attend attend;
static QuantLinear linear;
static RmsNorm rms_norm;
static SiluMul silu_mul;

typedef struct {
    int threads, quant_amx;
    int64_t rows, hidden, inter, qkv_width, attn_width; /* attn_width: heads x head_dim */
    float eps;
    bf16 *x, *total, *delta, *qkv, *attn, *gate_up, *act; /* the step's buffers, [rows][width] each */
    const bf16 *residual; /* the running sum of the layers' outputs: the embeddings, then total */
} Stack;

/* x = norm(residual + delta) * weight, the new sum kept in total (in place: rms_norm reads each 16
 * before writing them); the first norm has no residual yet: its delta is the sum. */
static const char *add_norm(Stack *s, const bf16 *delta, const bf16 *weight, bf16 *out) {
    const char *error = rms_norm(s->rows, s->hidden, delta, s->residual, s->total, out, weight, s->eps);
    s->residual = s->residual ? s->total : delta;
    return error;
}

static const char *project(const Stack *s, const bf16 *x, int64_t in, int64_t out, const int64_t *layer, int field,
                           int bits_field, int bias_field, bf16 *y) {
    return linear(s->threads, s->rows, out, in, x, in, (const uint8_t *)(intptr_t)layer[field],
                  bias_field < 0 ? NULL : (const bf16 *)(intptr_t)layer[bias_field], y, out, s->quant_amx,
                  (int)layer[bits_field]);
}

/* One layer: delta, the residual and the caches in, the layer's output in s->delta. */
static const char *run_layer(Stack *s, AttendCall a, const int64_t *layer, const bf16 *delta) {
    const char *error;
    if ((error = add_norm(s, delta, (const bf16 *)(intptr_t)layer[INPUT_NORM], s->x)) ||
        (error = project(s, s->x, s->hidden, s->qkv_width, layer, QKV, QKV_BITS, QKV_BIAS, s->qkv)))
        return error;
    a.k_cache = (bf16 *)(intptr_t)layer[K_CACHE], a.v_cache = (bf16 *)(intptr_t)layer[V_CACHE];
    a.window = layer[WINDOW];
    if ((error = attend(a, s->threads)) ||
        (error = project(s, s->attn, s->attn_width, s->hidden, layer, O, O_BITS, O_BIAS, s->delta)) ||
        (error = add_norm(s, s->delta, (const bf16 *)(intptr_t)layer[POST_NORM], s->x)) ||
        (error = project(s, s->x, s->hidden, 2 * s->inter, layer, GATE_UP, GATE_UP_BITS, -1, s->gate_up)) ||
        (error = silu_mul(s->threads, s->rows, s->inter, s->gate_up, 2 * s->inter, s->act)))
        return error;
    return project(s, s->act, s->inter, s->hidden, layer, DOWN, DOWN_BITS, -1, s->delta);
}

/* forward(threads, rows, hidden, inter, heads, kv_heads, head_dim, eps, scale, softcap, quant_amx, attn_amx,
 *         layers, num_layers, num_blocks, block_size, embeddings, final_norm, out, tables, sequences,
 *         table_stride, seq, keys, slots, cos, sin, rope_positions, rope_half, positions):
 * out [rows][hidden] = the final norm of the stack's output for the embeddings [rows][hidden]; the
 * attention's arguments as _attention.c's attend takes them, the caches' and the window per layer.
 * Pointers as ints; the caller checks shapes (parley/kernels/stack.py). */
static PyObject *forward(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 30) {
        PyErr_SetString(PyExc_TypeError, "forward takes 30 arguments");
        return NULL;
    }
    Stack s = {.threads = (int)PyLong_AsLong(args[0]), .rows = PyLong_AsLongLong(args[1]),
               .hidden = PyLong_AsLongLong(args[2]), .inter = PyLong_AsLongLong(args[3]),
               .eps = (float)PyFloat_AsDouble(args[7]), .quant_amx = PyObject_IsTrue(args[10])};
    AttendCall a = {.rows = s.rows, .heads = PyLong_AsLongLong(args[4]), .kv_heads = PyLong_AsLongLong(args[5]),
                    .head_dim = PyLong_AsLongLong(args[6]), .scale = (float)PyFloat_AsDouble(args[8]),
                    .softcap = (float)PyFloat_AsDouble(args[9]), .amx = PyObject_IsTrue(args[11]),
                    .num_blocks = PyLong_AsLongLong(args[14]), .block_size = PyLong_AsLongLong(args[15]),
                    .tables = PyLong_AsVoidPtr(args[19]), .sequences = PyLong_AsLongLong(args[20]),
                    .table_stride = PyLong_AsLongLong(args[21]), .seq = PyLong_AsVoidPtr(args[22]),
                    .keys = PyLong_AsVoidPtr(args[23]), .slots = PyLong_AsVoidPtr(args[24]),
                    .cos = PyLong_AsVoidPtr(args[25]), .sin = PyLong_AsVoidPtr(args[26]),
                    .rope_positions = PyLong_AsLongLong(args[27]), .rope_half = PyLong_AsLongLong(args[28]),
                    .positions = PyLong_AsVoidPtr(args[29])};
    const int64_t *layers = PyLong_AsVoidPtr(args[12]), num_layers = PyLong_AsLongLong(args[13]);
    const bf16 *embeddings = PyLong_AsVoidPtr(args[16]), *final_norm = PyLong_AsVoidPtr(args[17]);
    bf16 *out = PyLong_AsVoidPtr(args[18]);
    if (PyErr_Occurred()) return NULL;
    if (s.rows < 1 || a.heads < 1 || a.kv_heads < 1 || a.head_dim < 1) {
        PyErr_SetString(PyExc_ValueError, "forward: no rows or heads");
        return NULL;
    }
    s.attn_width = a.heads * a.head_dim;
    s.qkv_width = (a.heads + 2 * a.kv_heads) * a.head_dim;
    const int64_t widths[] = {s.hidden, s.hidden, s.hidden, s.qkv_width, s.attn_width, 2 * s.inter, s.inter};
    bf16 **buffers[] = {&s.x, &s.total, &s.delta, &s.qkv, &s.attn, &s.gate_up, &s.act};
    int64_t size = 0;
    for (int i = 0; i < 7; i++) size += (s.rows * widths[i] + 31) / 32 * 32; /* each on a 64-byte line */
    bf16 *space = aligned_alloc(64, sizeof(bf16) * (size_t)size);
    if (space == NULL) return PyErr_NoMemory();
    for (int i = 0, at = 0; i < 7; at += (s.rows * widths[i] + 31) / 32 * 32, i++) *buffers[i] = space + at;
    a.q = s.qkv, a.q_stride = s.qkv_width, a.out = s.attn, a.out_stride = s.attn_width;
    a.k_new = s.qkv + s.attn_width, a.v_new = s.qkv + s.attn_width + a.kv_heads * a.head_dim;
    a.k_stride = a.v_stride = s.qkv_width;
    const char *error = NULL;
    Py_BEGIN_ALLOW_THREADS
    const bf16 *delta = embeddings;
    for (int64_t l = 0; l < num_layers && error == NULL; l++) {
        error = run_layer(&s, a, layers + l * LAYER_FIELDS, delta);
        delta = s.delta;
    }
    if (error == NULL) error = add_norm(&s, delta, final_norm, out);
    Py_END_ALLOW_THREADS
    free(space);
    return kernel_result(error);
}

static PyMethodDef methods[] = {
    {"forward", (PyCFunction)(void (*)(void))forward, METH_FASTCALL, "The decoder layers and the final norm."},
    {"supported", supported, METH_NOARGS, "Whether this CPU runs the kernel (AVX512-BF16)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_stack", NULL, -1, methods, NULL, NULL, NULL, NULL};

/* An entry point, from its module's capsule: importing this module imports those. */
static void *entry(const char *module, const char *capsule) {
    PyObject *imported = PyImport_ImportModule(module); /* PyCapsule_Import finds submodules only once imported */
    if (imported == NULL) return NULL;
    Py_DECREF(imported);
    return PyCapsule_Import(capsule, 0);
}

PyMODINIT_FUNC PyInit__stack(void) {
    if ((attend = (Attend)entry("parley.kernels._attention", "parley.kernels._attention.c_attend")) == NULL ||
        (linear = (QuantLinear)entry("parley.kernels._quant", "parley.kernels._quant.c_linear")) == NULL ||
        (rms_norm = (RmsNorm)entry("parley.kernels._norm", "parley.kernels._norm.c_rms_norm")) == NULL ||
        (silu_mul = (SiluMul)entry("parley.kernels._activation", "parley.kernels._activation.c_silu_mul")) == NULL)
        return NULL;
    return PyModule_Create(&module);
}
