/* Fused causal self-attention for CPU training at small sequence lengths (see
 * gptkit/model/attention_kernel.py).
 *
 * The input is the qkv Linear's output as it is, (B, T, (H + 2 Hkv) D) row-major: in each token's
 * row the H query heads come first, then the Hkv key heads, then the Hkv value heads, D floats
 * each. The output y is (B, T, H D), the layout the out Linear takes; the backward writes dqkv in
 * the layout of qkv. So no transposes or copies are needed around the kernel, where SDPA needs
 * (B, H, T, D) tensors and their gradients copied back.
 *
 * Per (batch row, head) the kernel computes, with s = 1/sqrt(D) and j <= i (causal):
 *     S_ij = s q_i . k_j,  P_ij = exp(S_ij - L_i),  L_i = log sum_j exp(S_ij),  y_i = sum_j P_ij v_j
 * and saves L (B, H, T), the row's log-sum-exp. The backward recomputes P from q, k and L, or,
 * when the caller gives room for it (probs, B H T x Tp floats: for short sequences, where that is
 * little memory), reads the P the forward saved there, which saves a fifth of the backward's
 * products and its exponentials. Then, with delta_i = dy_i . y_i:
 *     dP_ij = dy_i . v_j,  dS_ij = P_ij (dP_ij - delta_i),
 *     dq_i = s sum_j dS_ij k_j,  dk_j = s sum_i dS_ij q_i,  dv_j = sum_i P_ij dy_i.
 * For small T a head's T x T scores fit in the L1/L2 cache, so each (batch row, head) is one task
 * done whole, with no tiling over keys (no online softmax). The tasks are split statically in
 * order, so that each thread handles the batch rows whose activations its own core computed in
 * the fused trunk's other kernels (see gemm.c: that matters when the two vCPUs of the test machine
 * sit on different core complexes; a dynamic split, better when another process takes a core for
 * a while, measured the same or slower in a training step here). Each task writes its own
 * outputs, so the results do not depend on the split.
 *
 * All five products are one small matrix-multiply routine, gemm_small, whose inner blocks keep a
 * 4 x 16 tile of the result in registers: each step loads two 8-float vectors of B and four
 * scalars of A (broadcast) for eight multiply-adds, with no horizontal sums. Reading A through
 * two strides lets the same routine take A transposed (dS^T and P^T for dk and dv) without
 * copying it. Products against K^T and V^T read copies of K and V transposed once per head.
 *
 * Grouped-query attention (Hkv < H): a task is a (batch row, key/value head) pair and runs the
 * H / Hkv query heads that share it one after the other, so that dk and dv accumulate without
 * races.
 */
#include <stdlib.h>

#include "common.h"

#define RB 4 /* rows of the result per block of gemm_small (and per block of queries) */

static inline int64_t round_up8(int64_t n) { return (n + 7) & ~(int64_t)7; }

typedef int32_t v8i __attribute__((vector_size(32)));

static inline v8f splat8(float x) { return (v8f){x, x, x, x, x, x, x, x}; }

/* where mask (all-ones lanes) then a, else b */
static inline v8f select8(v8i mask, v8f a, v8f b) { return (v8f)(((v8i)a & mask) | ((v8i)b & ~mask)); }

/* Lanes j0 + l <= i, for l = 0..7: the causally visible keys of row i in the chunk at column j0. */
static inline v8i visible8(int64_t j0, int64_t i) {
    const v8i lane = {0, 1, 2, 3, 4, 5, 6, 7};
    return lane <= (v8i){0} + (int32_t)(i - j0);
}

/* exp_approx (common.h) on eight lanes: the same steps, so that the softmax of a row is one
 * pass of vector instructions. Exact powers of two via the exponent bits, as there. */
static inline v8f exp8(v8f v) {
    v = select8(v < -87.0f, splat8(-87.0f), v);
    v = select8(v > 88.0f, splat8(88.0f), v);
    v8f k = (v * LOG2_E + ROUND_TO_INTEGER) - ROUND_TO_INTEGER;
    v8f r = v - k * LN2_HIGH;
    r = r - k * LN2_LOW;
    v8f p = EXP_TAYLOR6(r);
    v8i bits = (__builtin_convertvector(k, v8i) + 127) << 23;
    return p * (v8f)bits;
}

/* p[0..7] = v, or p[0..7] += v */
static inline void store8(float *p, v8f v, int accumulate) {
    if (accumulate) v += load8(p);
    memcpy(p, &v, sizeof v);
}

static inline v8f max8(v8f a, v8f b) { return select8(a > b, a, b); }

static inline float hmax8(v8f v) {
    float m = v[0];
    for (int l = 1; l < 8; l++) m = fmaxf(m, v[l]);
    return m;
}

/* An empty asm that claims to modify its vectors in registers: the compiler must then load each
 * once into a register. Without it, GCC folds the loads of B into the multiply-adds as memory
 * operands, loading each vector four times per step (twelve loads per eight multiply-adds), and
 * the loop is bound by the loads instead of the multiply-adds: with it the forward is 1.28x and
 * the backward 1.38x as fast at B=12 T=64 H=4 D=32 on Zen 3 (the 8-column loop: another 3%). No
 * instruction is emitted. x86 with AVX only (an 8-float vector is two registers elsewhere). */
#if defined(__AVX__) && (defined(__GNUC__) || defined(__clang__))
#define IN_REGISTERS(b0, b1) __asm__("" : "+x"(b0), "+x"(b1))
#define IN_REGISTER(b0) __asm__("" : "+x"(b0))
#else
#define IN_REGISTER(b0) ((void)0)
#define IN_REGISTERS(b0, b1) ((void)0)
#endif

/* C[r][c] (+)= sum_k A[r * ars + k * aks] * B[k * ldb + c], for r < m, c < n, k < kn.
 * A is read through a row stride and a k stride, so a transposed A costs nothing. Every result
 * element is written (accumulate = 0) or added to (accumulate = 1). */
static void gemm_small(int64_t m, int64_t n, int64_t kn, const float *restrict A, int64_t ars, int64_t aks,
                       const float *restrict B, int64_t ldb, float *restrict C, int64_t ldc, int accumulate) {
    for (int64_t r0 = 0; r0 < m; r0 += RB) {
        const float *a = A + r0 * ars;
        float *c = C + r0 * ldc;
        int64_t c0 = 0;
        if (m - r0 >= RB) {
            for (; c0 + 16 <= n; c0 += 16) {
                v8f t00 = {0}, t01 = {0}, t10 = {0}, t11 = {0}, t20 = {0}, t21 = {0}, t30 = {0}, t31 = {0};
                for (int64_t k = 0; k < kn; k++) {
                    const float *b = B + k * ldb + c0;
                    v8f b0 = load8(b), b1 = load8(b + 8);
                    IN_REGISTERS(b0, b1);
                    const float *ak = a + k * aks;
                    float a0 = ak[0], a1 = ak[ars], a2 = ak[2 * ars], a3 = ak[3 * ars];
                    t00 += a0 * b0; t01 += a0 * b1;
                    t10 += a1 * b0; t11 += a1 * b1;
                    t20 += a2 * b0; t21 += a2 * b1;
                    t30 += a3 * b0; t31 += a3 * b1;
                }
                float *cr = c + c0;
                store8(cr, t00, accumulate); store8(cr + 8, t01, accumulate); cr += ldc;
                store8(cr, t10, accumulate); store8(cr + 8, t11, accumulate); cr += ldc;
                store8(cr, t20, accumulate); store8(cr + 8, t21, accumulate); cr += ldc;
                store8(cr, t30, accumulate); store8(cr + 8, t31, accumulate);
            }
            for (; c0 + 8 <= n; c0 += 8) {
                v8f t0 = {0}, t1 = {0}, t2 = {0}, t3 = {0};
                for (int64_t k = 0; k < kn; k++) {
                    v8f b0 = load8(B + k * ldb + c0);
                    IN_REGISTER(b0);
                    const float *ak = a + k * aks;
                    t0 += ak[0] * b0; t1 += ak[ars] * b0; t2 += ak[2 * ars] * b0; t3 += ak[3 * ars] * b0;
                }
                float *cr = c + c0;
                store8(cr, t0, accumulate); store8(cr + ldc, t1, accumulate);
                store8(cr + 2 * ldc, t2, accumulate); store8(cr + 3 * ldc, t3, accumulate);
            }
        } else {  /* the last 1..3 rows */
            for (; c0 + 8 <= n; c0 += 8) {
                for (int64_t r = 0; r < m - r0; r++) {
                    v8f t = {0};
                    for (int64_t k = 0; k < kn; k++) t += a[r * ars + k * aks] * load8(B + k * ldb + c0);
                    store8(c + r * ldc + c0, t, accumulate);
                }
            }
        }
        /* The last n % 8 columns (only when a head dimension is not a multiple of 8). */
        int64_t rows = m - r0 < RB ? m - r0 : RB;
        for (; c0 < n; c0++) {
            for (int64_t r = 0; r < rows; r++) {
                float t = 0.0f;
                for (int64_t k = 0; k < kn; k++) t += a[r * ars + k * aks] * B[k * ldb + c0];
                float *cr = c + r * ldc + c0;
                *cr = accumulate ? *cr + t : t;
            }
        }
    }
}

#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector) && __has_builtin(__builtin_convertvector)
#define HAVE_VECTOR_BUILTINS 1
#endif
#endif

#ifdef HAVE_VECTOR_BUILTINS
#define SHUFFLE __builtin_shufflevector

/* dst rows c = 0..7 (stride ldd) = column c of the 8 x 8 block at src (row stride ld): the usual
 * three rounds of shuffles (pairs of rows, pairs of pairs, halves), 24 shuffles for 64 floats. */
static inline void transpose8x8(const float *restrict src, int64_t ld, float *restrict dst, int64_t ldd) {
    v8f r0 = load8(src), r1 = load8(src + ld), r2 = load8(src + 2 * ld), r3 = load8(src + 3 * ld);
    v8f r4 = load8(src + 4 * ld), r5 = load8(src + 5 * ld), r6 = load8(src + 6 * ld), r7 = load8(src + 7 * ld);
    v8f t0 = SHUFFLE(r0, r1, 0, 8, 1, 9, 4, 12, 5, 13), t1 = SHUFFLE(r0, r1, 2, 10, 3, 11, 6, 14, 7, 15);
    v8f t2 = SHUFFLE(r2, r3, 0, 8, 1, 9, 4, 12, 5, 13), t3 = SHUFFLE(r2, r3, 2, 10, 3, 11, 6, 14, 7, 15);
    v8f t4 = SHUFFLE(r4, r5, 0, 8, 1, 9, 4, 12, 5, 13), t5 = SHUFFLE(r4, r5, 2, 10, 3, 11, 6, 14, 7, 15);
    v8f t6 = SHUFFLE(r6, r7, 0, 8, 1, 9, 4, 12, 5, 13), t7 = SHUFFLE(r6, r7, 2, 10, 3, 11, 6, 14, 7, 15);
    /* u0 = rows 0-3 of columns 0 and 4, u1 of columns 1 and 5, ...; u4..u7 the same for rows 4-7 */
    v8f u0 = SHUFFLE(t0, t2, 0, 1, 8, 9, 4, 5, 12, 13), u1 = SHUFFLE(t0, t2, 2, 3, 10, 11, 6, 7, 14, 15);
    v8f u2 = SHUFFLE(t1, t3, 0, 1, 8, 9, 4, 5, 12, 13), u3 = SHUFFLE(t1, t3, 2, 3, 10, 11, 6, 7, 14, 15);
    v8f u4 = SHUFFLE(t4, t6, 0, 1, 8, 9, 4, 5, 12, 13), u5 = SHUFFLE(t4, t6, 2, 3, 10, 11, 6, 7, 14, 15);
    v8f u6 = SHUFFLE(t5, t7, 0, 1, 8, 9, 4, 5, 12, 13), u7 = SHUFFLE(t5, t7, 2, 3, 10, 11, 6, 7, 14, 15);
    v8f c[8] = {
        SHUFFLE(u0, u4, 0, 1, 2, 3, 8, 9, 10, 11), SHUFFLE(u1, u5, 0, 1, 2, 3, 8, 9, 10, 11),
        SHUFFLE(u2, u6, 0, 1, 2, 3, 8, 9, 10, 11), SHUFFLE(u3, u7, 0, 1, 2, 3, 8, 9, 10, 11),
        SHUFFLE(u0, u4, 4, 5, 6, 7, 12, 13, 14, 15), SHUFFLE(u1, u5, 4, 5, 6, 7, 12, 13, 14, 15),
        SHUFFLE(u2, u6, 4, 5, 6, 7, 12, 13, 14, 15), SHUFFLE(u3, u7, 4, 5, 6, 7, 12, 13, 14, 15),
    };
    for (int k = 0; k < 8; k++) memcpy(dst + k * ldd, &c[k], sizeof(v8f));
}
#endif

/* dst (D, Tp) = src (T, D; row stride ld) transposed, columns T..Tp-1 zero. */
static void transpose_into(const float *restrict src, int64_t ld, int64_t T, int64_t D, int64_t Tp,
                           float *restrict dst) {
    int64_t j0 = 0, d0 = 0;
#ifdef HAVE_VECTOR_BUILTINS
    for (; j0 + 8 <= T; j0 += 8) {
        for (d0 = 0; d0 + 8 <= D; d0 += 8) transpose8x8(src + j0 * ld + d0, ld, dst + d0 * Tp + j0, Tp);
    }
    /* Left: rows j0..T-1 of every column, and columns d0..D-1 of rows 0..j0-1. */
    for (int64_t d = d0; d < D; d++) {
        for (int64_t j = 0; j < j0; j++) dst[d * Tp + j] = src[j * ld + d];
    }
#endif
    for (int64_t d = 0; d < D; d++) {
        float *row = dst + d * Tp;
        for (int64_t j = j0; j < T; j++) row[j] = src[j * ld + d];
        for (int64_t j = T; j < Tp; j++) row[j] = 0.0f;
    }
}

/* The pointers of one (batch row b, query head h) pair. */
typedef struct {
    const float *q, *k, *v; /* (T, D) each, row stride R = (H + 2 Hkv) D */
    int64_t R, HD;          /* row strides of qkv and of y */
} head_ptrs;

static head_ptrs head_pointers(const float *qkv, int64_t b, int64_t h, int64_t T, int64_t H, int64_t Hkv,
                               int64_t D) {
    int64_t group = H / Hkv, R = (H + 2 * Hkv) * D;
    const float *row = qkv + b * T * R;
    head_ptrs p = {row + h * D, row + (H + h / group) * D, row + (H + Hkv + h / group) * D, R, H * D};
    return p;
}

/* qkv: (B, T, (H + 2 Hkv) D) -> y: (B, T, H D), lse: (B, H, T) (saved for the backward; may be
 * NULL in inference), and probs (B, H, T, Tp) with Tp = T rounded up to 8, or NULL: the softmax
 * probabilities, row i holding P_i0..P_ii then zeros. H must be a multiple of Hkv. Returns 0, or 1
 * when a thread could not allocate its scratch memory (the outputs are then incomplete). */
int attention_forward(const float *qkv, float *y, float *lse, float *probs, int64_t B, int64_t T, int64_t H,
                      int64_t Hkv, int64_t D, int threads) {
    const int64_t Tp = round_up8(T);
    const float scale = 1.0f / sqrtf((float)D);
    int failed = 0;
    #pragma omp parallel num_threads(threads) if (threads > 1 && B * H > 1)
    {
        /* Per thread: K^T (D, Tp) and one block of RB rows of scores (RB, Tp). */
        float *kt = malloc(sizeof(float) * (size_t)(D * Tp + RB * Tp));
        float *s = kt + D * Tp;
        if (!kt) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(static)
        for (int64_t task = 0; task < B * H; task++) {
            if (!kt) continue;  /* every thread must still reach the loop's closing barrier */
            int64_t b = task / H, h = task % H;
            head_ptrs p = head_pointers(qkv, b, h, T, H, Hkv, D);
            float *yh = y + b * T * p.HD + h * D;
            transpose_into(p.k, p.R, T, D, Tp, kt);
            for (int64_t i0 = 0; i0 < T; i0 += RB) {
                int64_t rows = T - i0 < RB ? T - i0 : RB;
                int64_t keys = i0 + rows;  /* the block's last query sees keys 0..keys-1 */
                int64_t cols = round_up8(keys);
                /* Raw scores q_i . k_j for the block, columns 0..cols-1. */
                gemm_small(rows, cols, D, p.q + i0 * p.R, p.R, 1, kt, Tp, s, Tp, 0);
                for (int64_t r = 0; r < rows; r++) {
                    int64_t i = i0 + r;
                    float *sr = s + r * Tp;
                    /* Whole 8-column chunks up to the diagonal (cols is a multiple of 8); the lanes
                     * past it are masked: out of the maximum, zero weight in y. */
                    int64_t row_cols = round_up8(i + 1);
                    v8f mx = splat8(sr[0]);
                    for (int64_t j0 = 0; j0 < row_cols; j0 += 8)
                        mx = select8(visible8(j0, i), max8(mx, load8(sr + j0)), mx);
                    float m = hmax8(mx);
                    v8f acc = {0};
                    for (int64_t j0 = 0; j0 < row_cols; j0 += 8) {
                        v8f e = exp8((load8(sr + j0) - m) * scale);
                        e = select8(visible8(j0, i), e, splat8(0.0f));
                        acc += e;
                        memcpy(sr + j0, &e, sizeof e);
                    }
                    float sum = sum8(acc), inv = 1.0f / sum;
                    float *saved = probs ? probs + ((b * H + h) * T + i) * Tp : NULL;
                    for (int64_t j0 = 0; j0 < row_cols; j0 += 8) {
                        v8f e = load8(sr + j0) * inv;
                        memcpy(sr + j0, &e, sizeof e);
                        if (saved) memcpy(saved + j0, &e, sizeof e);
                    }
                    if (saved) memset(saved + row_cols, 0, sizeof(float) * (size_t)(Tp - row_cols));
                    /* The product with V below reads columns 0..keys-1: all written, as
                     * keys <= i0 + RB <= round_up8(i0 + 1) <= row_cols (i0 is a multiple of RB = 4). */
                    if (lse) lse[(b * H + h) * T + i] = m * scale + logf(sum);
                }
                gemm_small(rows, D, keys, s, Tp, 1, p.v, p.R, yh + i0 * p.HD, p.HD, 0);
            }
        }
        free(kt);
    }
    return failed;
}

/* The backward of attention_forward: qkv, y, lse and probs (or NULL: recompute P) as saved by it,
 * dy (B, T, H D) -> dqkv (B, T, (H + 2 Hkv) D), every element written. Returns 0, or 1 as
 * attention_forward does. */
int attention_backward(const float *qkv, const float *y, const float *lse, const float *probs, const float *dy,
                       float *dqkv, int64_t B, int64_t T, int64_t H, int64_t Hkv, int64_t D, int threads) {
    const int64_t Tp = round_up8(T), group = H / Hkv;
    const float scale = 1.0f / sqrtf((float)D);
    int failed = 0;
    #pragma omp parallel num_threads(threads) if (threads > 1 && B * Hkv > 1)
    {
        /* Per thread: K^T and V^T (D, Tp), P and dS (Tp, Tp), delta (Tp). */
        float *kt = malloc(sizeof(float) * (size_t)(2 * D * Tp + 2 * Tp * Tp + Tp));
        float *vt = kt + D * Tp, *P = vt + D * Tp, *dS = P + Tp * Tp, *delta = dS + Tp * Tp;
        if (!kt) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(static)
        for (int64_t task = 0; task < B * Hkv; task++) {
            if (!kt) continue;
            int64_t b = task / Hkv, hk = task % Hkv;
            head_ptrs first = head_pointers(qkv, b, hk * group, T, H, Hkv, D);
            const int64_t R = first.R, HD = first.HD;
            if (!probs) transpose_into(first.k, R, T, D, Tp, kt);  /* K^T only to recompute P */
            transpose_into(first.v, R, T, D, Tp, vt);
            /* The key and value heads' gradients, in dqkv's layout. */
            float *dk = dqkv + (first.k - qkv), *dv = dqkv + (first.v - qkv);
            for (int64_t g = 0; g < group; g++) {
                int64_t h = hk * group + g;
                head_ptrs p = head_pointers(qkv, b, h, T, H, Hkv, D);
                const float *yh = y + b * T * HD + h * D, *dyh = dy + b * T * HD + h * D;
                const float *lh = lse + (b * H + h) * T;
                /* P: the saved probabilities of this head, or this thread's scratch for recomputed ones */
                float *Ph = probs ? (float *)probs + (b * H + h) * T * Tp : P;
                float *dq = dqkv + (p.q - qkv);
                for (int64_t i = 0; i < T; i++) delta[i] = dot_of(dyh + i * HD, yh + i * HD, D);
                for (int64_t i0 = 0; i0 < T; i0 += RB) {
                    int64_t rows = T - i0 < RB ? T - i0 : RB, keys = i0 + rows, cols = round_up8(keys);
                    float *Pb = Ph + i0 * Tp, *dSb = dS + i0 * Tp;
                    if (!probs) gemm_small(rows, cols, D, p.q + i0 * R, R, 1, kt, Tp, Pb, Tp, 0);  /* q . k */
                    gemm_small(rows, cols, D, dyh + i0 * HD, HD, 1, vt, Tp, dSb, Tp, 0);  /* dP = dy . v */
                    for (int64_t r = 0; r < rows; r++) {
                        int64_t i = i0 + r;
                        float *pr = Pb + r * Tp, *dsr = dSb + r * Tp;
                        float li = lh[i], di = delta[i];
                        if (probs) {  /* saved with zeros above the diagonal */
                            for (int64_t j0 = 0; j0 < cols; j0 += 8) {
                                v8f ds = scale * load8(pr + j0) * (load8(dsr + j0) - di);
                                memcpy(dsr + j0, &ds, sizeof ds);
                            }
                            continue;
                        }
                        /* Zero above the diagonal, up to the block's last column: the dk and dv
                         * products below read these columns of rows i >= j. */
                        for (int64_t j0 = 0; j0 < cols; j0 += 8) {
                            v8i visible = visible8(j0, i);
                            v8f p = select8(visible, exp8(load8(pr + j0) * scale - li), splat8(0.0f));
                            v8f ds = scale * p * (load8(dsr + j0) - di);  /* the softmax scale folded in */
                            memcpy(pr + j0, &p, sizeof p);
                            memcpy(dsr + j0, &ds, sizeof ds);
                        }
                    }
                    /* dq_i = sum_{j <= i} dS_ij k_j */
                    gemm_small(rows, D, keys, dSb, Tp, 1, p.k, R, dq + i0 * R, R, 0);
                }
                /* dk_j = sum_{i >= j} dS_ij q_i and dv_j = sum_{i >= j} P_ij dy_i: A = dS^T and P^T,
                 * read through swapped strides starting at the diagonal. The first query head of
                 * the group writes, the others add. */
                for (int64_t j0 = 0; j0 < T; j0 += RB) {
                    int64_t rows = T - j0 < RB ? T - j0 : RB;
                    gemm_small(rows, D, T - j0, dS + j0 * Tp + j0, 1, Tp, p.q + j0 * R, R, dk + j0 * R, R, g > 0);
                    gemm_small(rows, D, T - j0, Ph + j0 * Tp + j0, 1, Tp, dyh + j0 * HD, HD, dv + j0 * R, R, g > 0);
                }
            }
        }
        free(kt);
    }
    return failed;
}
