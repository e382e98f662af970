/* Helpers shared by gptkit's C kernels (see gptkit/model/cpu_kernels.py). */
#ifndef GPTKIT_COMMON_H
#define GPTKIT_COMMON_H

#include <stdint.h>
#include <string.h>
#include <math.h>

/* exp(v) for v in [-87, 88], relative error about 1e-7 (1-2 ulp):
 * exp(v) = 2^k * exp(r), k = round(v / ln 2), |r| <= ln(2) / 2, exp(r) by its degree-6 Taylor
 * polynomial (the first omitted term is below 2e-7 there). ln 2 is split in two (Cody-Waite) so
 * that r keeps its precision. */
/* The steps shared with attention.c's eight-lane exp8; each takes a float or a v8f. */
#define LOG2_E 1.4426950408889634f
#define LN2_HIGH 0.693145751953125f        /* high part of ln 2 (exact in float) */
#define LN2_LOW 1.4286068203094172e-06f    /* low part */
#define ROUND_TO_INTEGER 12582912.0f       /* 1.5 * 2^23: adding it pushes a float's fraction out */
/* exp(r) for |r| <= ln(2) / 2 (r a variable: it is read six times) */
#define EXP_TAYLOR6(r) \
    (1.0f + (r) * (1.0f + (r) * (0.5f + (r) * (1.0f / 6.0f + (r) * (1.0f / 24.0f + (r) * (1.0f / 120.0f + (r) * (1.0f / 720.0f)))))))

static inline float exp_approx(float v) {
    v = fmaxf(v, -87.0f);
    v = fminf(v, 88.0f);
    float k = (v * LOG2_E + ROUND_TO_INTEGER) - ROUND_TO_INTEGER;  /* v / ln 2, rounded */
    float r = v - k * LN2_HIGH;
    r = r - k * LN2_LOW;
    float p = EXP_TAYLOR6(r);
    int32_t bits = ((int32_t)k + 127) << 23;  /* 2^k as a float's bit pattern */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* NaN test on the bits: -ffinite-math-only lets the compiler fold x != x to false. */
static inline int is_nan(float v) {
    uint32_t bits;
    memcpy(&bits, &v, sizeof bits);
    return (bits & 0x7fffffffu) > 0x7f800000u;
}

/* 8-float vectors as GCC/Clang vector extensions: AVX on x86, pairs of NEON registers on ARM. */
typedef float v8f __attribute__((vector_size(32)));

static inline v8f load8(const float *p) {
    v8f v;
    memcpy(&v, p, sizeof v);  /* an unaligned load */
    return v;
}

static inline float sum8(v8f v) {
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

/* GPT-2's tanh-GELU is x * sigmoid(z) with z = K0 x + K1 x^3 (see cpu_kernels.c). */
#define K0 1.5957691216057308f   /* 2 * sqrt(2 / pi) */
#define K1 0.0713548162726009f   /* 0.044715 * K0 */

static inline float sigmoid_of_gelu_arg(float x) {
    float z = x * (K0 + K1 * x * x);
    /* Below -87, exp(-z) would be clamped; sigmoid(z) < 2e-38 there, so return 0 (x s(z) must
     * stay 0 even for |x| near the float limit). */
    float s = 1.0f / (1.0f + exp_approx(-z));
    return z < -87.0f ? 0.0f : s;
}

/* g = gelu(u) and h = gelu'(u) for u = h (+ bias) over one row of C floats (block.c) or of a tile
 * (gemm.c), with gr and hr that row of g and h: a macro rather than a function so that each loop
 * is the plain loop GCC vectorises best. With s = sigmoid(z), z = K0 u + K1 u^3:
 *     gelu(u) = u s,   gelu'(u) = s + u s (1 - s) (K0 + 3 K1 u^2). */
#define GELU_AND_DERIVATIVE(u_expr)                                      \
    for (int64_t j = 0; j < C; j++) {                                    \
        float u = (u_expr), s = sigmoid_of_gelu_arg(u);                  \
        gr[j] = u * s;                                                   \
        hr[j] = s + u * s * (1.0f - s) * (K0 + 3.0f * K1 * u * u);       \
    }

/* x[0..n-1] . y[0..n-1] for short vectors (one head's width) */
static inline float dot_of(const float *x, const float *y, int64_t n) {
    v8f acc = {0};
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) acc += load8(x + j) * load8(y + j);
    float s = sum8(acc);
    for (; j < n; j++) s += x[j] * y[j];
    return s;
}

/* The dot product of one weight row with x: eight accumulators over 64 floats at a time keep many
 * loads in flight, and each thread reads W as one sequential stream (what the hardware
 * prefetchers follow best; measured a few % faster than four rows in flight). */
static inline float dot_row(const float *restrict x, const float *restrict w, int64_t n) {
    v8f a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, a4 = {0}, a5 = {0}, a6 = {0}, a7 = {0};
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) {
        a0 += load8(w + i) * load8(x + i);
        a1 += load8(w + i + 8) * load8(x + i + 8);
        a2 += load8(w + i + 16) * load8(x + i + 16);
        a3 += load8(w + i + 24) * load8(x + i + 24);
        a4 += load8(w + i + 32) * load8(x + i + 32);
        a5 += load8(w + i + 40) * load8(x + i + 40);
        a6 += load8(w + i + 48) * load8(x + i + 48);
        a7 += load8(w + i + 56) * load8(x + i + 56);
    }
    for (; i + 8 <= n; i += 8) a0 += load8(w + i) * load8(x + i);
    float s = sum8(((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7)));
    for (; i < n; i++) s += w[i] * x[i];
    return s;
}

#endif
