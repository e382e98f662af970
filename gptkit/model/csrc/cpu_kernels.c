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
#include <stdint.h>
#include <string.h>
#include <math.h>

#define K0 1.5957691216057308f   /* 2 * sqrt(2 / pi) */
#define K1 0.0713548162726009f   /* 0.044715 * K0 */

/* exp(v) for v in [-87, 88], relative error about 1e-7 (1-2 ulp):
 * exp(v) = 2^k * exp(r), k = round(v / ln 2), |r| <= ln(2) / 2, exp(r) by its degree-6 Taylor
 * polynomial (the first omitted term is below 2e-7 there). ln 2 is split in two (Cody-Waite) so
 * that r keeps its precision. */
static inline float exp_approx(float v) {
    v = fmaxf(v, -87.0f);
    v = fminf(v, 88.0f);
    /* k = v / ln 2 rounded to the nearest integer: adding 1.5 * 2^23 pushes the fraction out. */
    float k = (v * 1.4426950408889634f + 12582912.0f) - 12582912.0f;
    float r = v - k * 0.693145751953125f;      /* high part of ln 2 (exact in float) */
    r = r - k * 1.4286068203094172e-06f;       /* low part */
    float p = 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t bits = ((int32_t)k + 127) << 23;  /* 2^k as a float's bit pattern */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

static inline float sigmoid_of_gelu_arg(float x) {
    float z = x * (K0 + K1 * x * x);
    /* Below -87, exp(-z) would be clamped; sigmoid(z) < 2e-38 there, so return 0 (x s(z) must
     * stay 0 even for |x| near the float limit). */
    float s = 1.0f / (1.0f + exp_approx(-z));
    return z < -87.0f ? 0.0f : s;
}

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
 * row with x. The step is bound by reading W from memory once; the kernel streams it in row order
 * (each thread a contiguous half, etc.) and keeps four rows in flight, so that four independent
 * accumulators hide the multiply-add latency while x is loaded once for all four.
 * 8-float vectors are GCC/Clang vector extensions: AVX on x86, pairs of NEON registers on ARM.
 */
typedef float v8f __attribute__((vector_size(32)));

static inline v8f load8(const float *p) {
    v8f v;
    memcpy(&v, p, sizeof v);  /* an unaligned load */
    return v;
}

static inline float sum8(v8f v) {
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

#define ROWS 4

static void dot_rows(const float *restrict x, const float *restrict w, int64_t in, int64_t rows,
                     const float *restrict bias, float *restrict y) {
    if (rows == ROWS) {
        const float *w0 = w, *w1 = w + in, *w2 = w + 2 * in, *w3 = w + 3 * in;
        v8f a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
        int64_t i = 0;
        for (; i + 8 <= in; i += 8) {
            v8f xv = load8(x + i);
            a0 += load8(w0 + i) * xv;
            a1 += load8(w1 + i) * xv;
            a2 += load8(w2 + i) * xv;
            a3 += load8(w3 + i) * xv;
        }
        float s0 = sum8(a0), s1 = sum8(a1), s2 = sum8(a2), s3 = sum8(a3);
        for (; i < in; i++) {
            s0 += w0[i] * x[i];
            s1 += w1[i] * x[i];
            s2 += w2[i] * x[i];
            s3 += w3[i] * x[i];
        }
        y[0] = s0 + (bias ? bias[0] : 0.0f);
        y[1] = s1 + (bias ? bias[1] : 0.0f);
        y[2] = s2 + (bias ? bias[2] : 0.0f);
        y[3] = s3 + (bias ? bias[3] : 0.0f);
        return;
    }
    for (int64_t r = 0; r < rows; r++) {  /* the last few rows of a matrix */
        const float *wr = w + r * in;
        v8f a = {0};
        int64_t i = 0;
        for (; i + 8 <= in; i += 8) a += load8(wr + i) * load8(x + i);
        float s = sum8(a);
        for (; i < in; i++) s += wr[i] * x[i];
        y[r] = s + (bias ? bias[r] : 0.0f);
    }
}

/* x: (in,), w: (out, in), bias: (out,) or NULL, y: (out,) */
void linear_one_row(const float *x, const float *w, const float *bias, float *y, int64_t in, int64_t out,
                    int threads) {
    int64_t groups = (out + ROWS - 1) / ROWS;
    #pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && groups > 1)
    for (int64_t g = 0; g < groups; g++) {
        int64_t r0 = g * ROWS;
        int64_t rows = out - r0 < ROWS ? out - r0 : ROWS;
        dot_rows(x, w + r0 * in, in, rows, bias ? bias + r0 : NULL, y + r0);
    }
}

/* ------------------------------------------------------------------------------------------------
 * Y = X W^T + b for 2..8 input rows (a decode step at a small batch), on a blocked copy of W.
 *
 * The blocked layout is (ceil(out / 8), in, 8): block b holds output columns 8b..8b+7, one 8-float
 * vector per input feature, contiguous (the caller builds it once, zero-padding the last block).
 * For each block the kernel walks i = 0..in once, loads that vector, and multiply-adds it into one
 * accumulator per input row with x[r][i] broadcast: 8 accumulators, one load of W per 8
 * multiply-adds, no horizontal sums, and W is read from memory exactly once for all rows.
 * Rows past m alias the last real row (their results are computed and dropped).
 */
#define MAX_ROWS 8

/* x: (m, in) with 1 <= m <= 8, w_blocked: (ceil(out / 8), in, 8), bias: (out,) or NULL, y: (m, out) */
void linear_blocked8(const float *x, const float *w_blocked, const float *bias, float *y, int64_t m,
                     int64_t in, int64_t out, int threads) {
    int64_t blocks = (out + 7) / 8;
    const float *xr[MAX_ROWS];
    for (int r = 0; r < MAX_ROWS; r++) xr[r] = x + (r < m ? r : m - 1) * in;
    #pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && blocks > 1)
    for (int64_t b = 0; b < blocks; b++) {
        const float *wb = w_blocked + b * in * 8;
        const float *x0 = xr[0], *x1 = xr[1], *x2 = xr[2], *x3 = xr[3];
        const float *x4 = xr[4], *x5 = xr[5], *x6 = xr[6], *x7 = xr[7];
        v8f a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, a4 = {0}, a5 = {0}, a6 = {0}, a7 = {0};
        for (int64_t i = 0; i < in; i++) {
            v8f wv = load8(wb + i * 8);
            a0 += x0[i] * wv; a1 += x1[i] * wv; a2 += x2[i] * wv; a3 += x3[i] * wv;
            a4 += x4[i] * wv; a5 += x5[i] * wv; a6 += x6[i] * wv; a7 += x7[i] * wv;
        }
        v8f acc[MAX_ROWS] = {a0, a1, a2, a3, a4, a5, a6, a7};
        int64_t j0 = 8 * b;
        int cols = out - j0 < 8 ? (int)(out - j0) : 8;
        for (int64_t r = 0; r < m; r++) {
            for (int c = 0; c < cols; c++) y[r * out + j0 + c] = acc[r][c] + (bias ? bias[j0 + c] : 0.0f);
        }
    }
}
