/* Fused CPU kernels for gptkit's model, compiled on first use (see gptkit/model/cpu_kernels.py).
 *
 * GPT-2's activation is the tanh approximation of GELU:
 *     gelu(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
 * Because 0.5 (1 + tanh(a)) = sigmoid(2a), this is x * sigmoid(z) with
 *     z = K0 x + K1 x^3,   K0 = 2 sqrt(2/pi),   K1 = 0.044715 K0,
 * which needs a single exponential. ATen evaluates tanh per element through a slow vector path on
 * some CPUs (about 10x the cost of a multiply); here the exponential is a short polynomial that the
 * compiler vectorises, so one pass over the data does the whole forward (or backward) and the
 * kernel runs at memory speed.
 *
 * Each function takes contiguous float32 arrays of n elements and the number of threads to use.
 */
#include "common.h"

/* The elementwise loops work on blocks: each thread takes whole blocks, and the plain loop over
 * one block is what the compiler vectorises. */
#define BLOCK 4096

static void gelu_forward_block(const float *restrict x, float *restrict y, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        y[i] = x[i] * sigmoid_of_gelu_arg(x[i]);
    }
}

/* d/dx [x s(z)] = s + x s (1 - s) dz/dx,  dz/dx = K0 + 3 K1 x^2 */
static void gelu_backward_block(const float *restrict grad, const float *restrict x, float *restrict out,
                                int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        float v = x[i];
        float s = sigmoid_of_gelu_arg(v);
        out[i] = grad[i] * (s + v * s * (1.0f - s) * (K0 + 3.0f * K1 * v * v));
    }
}

void gelu_tanh_forward(const float *x, float *y, int64_t n, int threads) {
    int64_t blocks = (n + BLOCK - 1) / BLOCK;
    #pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && blocks > 1)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t start = b * BLOCK, len = n - start < BLOCK ? n - start : BLOCK;
        gelu_forward_block(x + start, y + start, len);
    }
}

void gelu_tanh_backward(const float *grad, const float *x, float *out, int64_t n, int threads) {
    int64_t blocks = (n + BLOCK - 1) / BLOCK;
    #pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && blocks > 1)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t start = b * BLOCK, len = n - start < BLOCK ? n - start : BLOCK;
        gelu_backward_block(grad + start, x + start, out + start, len);
    }
}

/* ------------------------------------------------------------------------------------------------
 * y = W x + b for one input row: the whole of a decode step's work at batch 1.
 *
 * W is nn.Linear's (out, in) row-major weight, so each output is the dot product of one weight
 * row with x (dot_row, common.h). The step is bound by reading W from memory once; each thread
 * streams a contiguous part of it in row order.
 */
/* x: (in,), w: (out, in), bias: (out,) or NULL, y: (out,) */
void linear_one_row(const float *x, const float *w, const float *bias, float *y, int64_t in, int64_t out,
                    int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && out > 1)
    for (int64_t o = 0; o < out; o++) {
        y[o] = dot_row(x, w + o * in, in) + (bias ? bias[o] : 0.0f);
    }
}

/* ------------------------------------------------------------------------------------------------
 * Y = X W^T + b for 2..8 input rows (a decode step at a small batch), on a blocked copy of W.
 *
 * The blocked layout is (ceil(out / BLOCK), in, BLOCK): block b holds output columns BLOCK b ..
 * BLOCK b + BLOCK - 1, one vector per input feature, contiguous (the caller builds it once,
 * zero-padding the last block, with the width linear_blocked_width() returns). For each block the
 * kernel walks i = 0..in once, loads that vector, and multiply-adds it into one accumulator per
 * input row with x[r][i] broadcast: 8 accumulators, one load of W per 8 multiply-adds, no
 * horizontal sums, and W is read from memory exactly once for all rows. Rows past m alias the last
 * real row (their results are computed and dropped).
 *
 * BLOCK is 16 floats (one AVX-512 register) where the CPU has AVX-512, else 8: per input feature
 * the 8-wide form issues 9 loads for 8 multiply-adds of 8 floats, and was bound by them (a batch-8
 * GPT-2 124M decode step spent ~25 ms here, ~80 GFLOP/s, on the 2-core test machine); the 16-wide
 * form does twice the work per load.
 */
#define MAX_ROWS 8
#if defined(__AVX512F__) && (defined(__GNUC__) || defined(__clang__))
#define BLOCK 16
typedef float vblock __attribute__((vector_size(64)));
#else
#define BLOCK 8
typedef v8f vblock;
#endif

int linear_blocked_width(void) { return BLOCK; }

static inline vblock load_block(const float *p) {
    vblock v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* x: (m, in) with 1 <= m <= 8, w_blocked: (ceil(out / BLOCK), in, BLOCK), bias: (out,) or NULL, y: (m, out) */
void linear_blocked(const float *x, const float *w_blocked, const float *bias, float *y, int64_t m, int64_t in,
                    int64_t out, int threads) {
    int64_t blocks = (out + BLOCK - 1) / BLOCK;
    const float *xr[MAX_ROWS];
    for (int r = 0; r < MAX_ROWS; r++) xr[r] = x + (r < m ? r : m - 1) * in;
    #pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && blocks > 1)
    for (int64_t b = 0; b < blocks; b++) {
        const float *wb = w_blocked + b * in * BLOCK;
        const float *x0 = xr[0], *x1 = xr[1], *x2 = xr[2], *x3 = xr[3];
        const float *x4 = xr[4], *x5 = xr[5], *x6 = xr[6], *x7 = xr[7];
        vblock a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, a4 = {0}, a5 = {0}, a6 = {0}, a7 = {0};
        for (int64_t i = 0; i < in; i++) {
            vblock wv = load_block(wb + i * BLOCK);
            a0 += x0[i] * wv; a1 += x1[i] * wv; a2 += x2[i] * wv; a3 += x3[i] * wv;
            a4 += x4[i] * wv; a5 += x5[i] * wv; a6 += x6[i] * wv; a7 += x7[i] * wv;
        }
        vblock acc[MAX_ROWS] = {a0, a1, a2, a3, a4, a5, a6, a7};
        int64_t j0 = BLOCK * b;
        int cols = out - j0 < BLOCK ? (int)(out - j0) : BLOCK;
        for (int64_t r = 0; r < m; r++) {
            for (int c = 0; c < cols; c++) y[r * out + j0 + c] = acc[r][c] + (bias ? bias[j0 + c] : 0.0f);
        }
    }
}
