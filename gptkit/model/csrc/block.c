/* The row-wise steps of a GPT-2 block's forward and backward for CPU training, each fused into one
 * pass over the activations (see gptkit/model/fused_trunk.py, which calls them between the
 * matmuls).
 *
 * Unfused, a sublayer's output projection adds its bias (a copy into the matmul's output), then
 * the residual (another pass), then LayerNorm reads the sum again; the backward sums the bias
 * gradient, the LayerNorm gradient and the residual gradient in three more passes. Here:
 *
 *   add_layer_norm         xn = x + p + bias, then a = LayerNorm(xn), its mean and 1/std per row
 *   layer_norm_backward    dx = dres + LayerNorm'(da), the LayerNorm's weight and bias gradients,
 *                          and the column sums of dx (the gradient of the bias added before it)
 *   bias_gelu_forward      g = gelu(h + bias), and h replaced by gelu'(h + bias) for the backward
 *   gelu_backward_colsum   dh = gelu' dg, and the column sums of dh (the bias gradient)
 *
 * Matrices are row-major (N rows of C floats). Column sums are accumulated per share of the rows,
 * one contiguous share per thread asked for (FOR_EACH_SHARE), and added up in share order, so the
 * result depends only on the number of threads asked for (like ATen's reductions), not on the team
 * OpenMP gives. Functions that need scratch memory return 1 when it
 * cannot be allocated (nothing is then written to the sums), else 0.
 */
#include <stdlib.h>

#include "common.h"

#ifdef _OPENMP
#include <omp.h>
#else
static inline int omp_get_thread_num(void) { return 0; }
static inline int omp_get_num_threads(void) { return 1; }
#endif

/* sum of v[0..n-1] */
static inline float row_sum(const float *v, int64_t n) {
    v8f acc = {0};
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) acc += load8(v + j);
    float s = sum8(acc);
    for (; j < n; j++) s += v[j];
    return s;
}

/* The shares of the rows, one per thread asked for: share `part` of `parts` is rows
 * [N part / parts, N (part + 1) / parts). Thread t of the team OpenMP gives takes shares t, t + team,
 * ...: with the full team, its own contiguous share (the rows the gemm and attention kernels give it
 * too); with a smaller one (OMP_DYNAMIC, OMP_THREAD_LIMIT, nesting), several, so that the split and
 * every sum over it stay the same bits. Runs the statement after it once per share, with part,
 * first and last set. */
#define FOR_EACH_SHARE(N, parts, part, first, last)                                                    \
    for (int part = omp_get_thread_num(); part < (parts); part += omp_get_num_threads())                \
        for (int64_t first = (N) * part / (parts), last = (N) * (part + 1) / (parts), once_ = 1; once_;  \
             once_ = 0)

/* The per-thread partial sums (threads x count floats) added in thread order into out[0..count-1]. */
static void reduce_partials(const float *partial, int threads, int64_t count, float *out) {
    for (int64_t j = 0; j < count; j++) out[j] = partial[j];
    for (int t = 1; t < threads; t++) {
        const float *p = partial + t * count;
        for (int64_t j = 0; j < count; j++) out[j] += p[j];
    }
}

/* 1/sqrt(v), or NaN when v or mu is not finite (the row's sum or sum of squares overflowed): the
 * row's output is then NaN, as ATen's LayerNorm gives, not 1/sqrt(inf) = 0, which would turn an
 * overflowing residual stream into finite zeros and hide the divergence. Tested on the bits:
 * -ffinite-math-only lets the compiler fold isfinite(). */
static inline float rstd_or_nan(float v, float mu) {
    uint32_t bv, bm;
    memcpy(&bv, &v, sizeof bv);
    memcpy(&bm, &mu, sizeof bm);
    if ((bv & 0x7f800000u) == 0x7f800000u || (bm & 0x7f800000u) == 0x7f800000u) {
        const uint32_t quiet_nan = 0x7fc00000u;
        float n;
        memcpy(&n, &quiet_nan, sizeof n);
        return n;
    }
    return 1.0f / sqrtf(v);
}

/* p[0..7] = v (an unaligned store) */
static inline void put8(float *p, v8f v) { memcpy(p, &v, sizeof v); }

/* xn = x + p + bias (p and bias may be NULL; xn may be x or p), then, when w is given,
 * a = (xn - mean) * rstd * w + beta (beta may be NULL), mean (N,), rstd (N,) = 1/sqrt(var + eps).
 * With center = 0 this is RMSNorm: mean is taken as 0, so var is the mean square.
 * a, mean and rstd must not overlap the inputs. */
void add_layer_norm(const float *x, const float *p, const float *bias, float *xn, const float *w, const float *beta,
                    float *restrict a, float *restrict mean, float *restrict rstd, int64_t N, int64_t C, float eps,
                    int center, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && N > 1)
    for (int64_t i = 0; i < N; i++) {
        const float *xr = x + i * C, *pr = p ? p + i * C : NULL;
        float *xnr = xn + i * C;
        /* Each 8-float chunk is loaded before it is stored: correct when xn is x or p. */
        if (pr || bias || xn != x) {
            int64_t j = 0;
            for (; j + 8 <= C; j += 8) {
                v8f v = load8(xr + j);
                if (pr) v += load8(pr + j);
                if (bias) v += load8(bias + j);
                put8(xnr + j, v);
            }
            for (; j < C; j++) xnr[j] = xr[j] + (pr ? pr[j] : 0.0f) + (bias ? bias[j] : 0.0f);
        }
        if (!w) continue;
        const float mu = center ? row_sum(xnr, C) / (float)C : 0.0f;  /* RMSNorm: no centring */
        v8f acc = {0};
        int64_t j = 0;
        for (; j + 8 <= C; j += 8) {
            v8f d = load8(xnr + j) - mu;
            acc += d * d;
        }
        float var = sum8(acc);
        for (; j < C; j++) var += (xnr[j] - mu) * (xnr[j] - mu);
        const float r = rstd_or_nan(var / (float)C + eps, mu);
        float *ar = a + i * C;
        for (j = 0; j + 8 <= C; j += 8) {
            v8f v = (load8(xnr + j) - mu) * r * load8(w + j);
            if (beta) v += load8(beta + j);
            put8(ar + j, v);
        }
        for (; j < C; j++) ar[j] = (xnr[j] - mu) * r * w[j] + (beta ? beta[j] : 0.0f);
        mean[i] = mu;
        rstd[i] = r;
    }
}

/* The backward of add_layer_norm's LayerNorm, plus the residual and bias around it:
 *     xhat = (xn - mean) rstd,  g = da w,
 *     dx = dres + rstd (g - mean_j(g) - xhat mean_j(g xhat))     (dres may be NULL)
 *     dw = sum_i da xhat,  dbeta = sum_i da,  dcol = sum_i dx     (dbeta and dcol may be NULL)
 * With center = 0 (RMSNorm): mean is taken as 0 and the mean_j(g) term drops out.
 * dx must not overlap any input. */
int layer_norm_backward(const float *restrict da, const float *restrict xn, const float *restrict mean,
                        const float *restrict rstd, const float *restrict w, const float *restrict dres,
                        float *restrict dx, float *restrict dw, float *restrict dbeta, float *restrict dcol, int64_t N,
                        int64_t C, int center, int threads) {
    if (threads < 1 || N < 2) threads = 1;
    float *partial = calloc((size_t)threads * 3 * (size_t)C, sizeof(float));
    if (!partial) return 1;
    #pragma omp parallel num_threads(threads) if (threads > 1)
    {
        FOR_EACH_SHARE(N, threads, part, first, last) {
            float *restrict pw = partial + (int64_t)part * 3 * C;
            float *restrict pb = pw + C, *restrict pc = pb + C;
            for (int64_t i = first; i < last; i++) {
                const float *dar = da + i * C, *xr = xn + i * C;
                const float mu = center ? mean[i] : 0.0f, r = rstd[i];
                v8f sg = {0}, sgx = {0};
                int64_t j = 0;
                for (; j + 8 <= C; j += 8) {
                    v8f g = load8(dar + j) * load8(w + j), xh = (load8(xr + j) - mu) * r;
                    sg += g;
                    sgx += g * xh;
                }
                float sum_g = sum8(sg), sum_gx = sum8(sgx);
                for (; j < C; j++) {
                    float g = dar[j] * w[j];
                    sum_g += g;
                    sum_gx += g * (xr[j] - mu) * r;
                }
                const float mg = center ? sum_g / (float)C : 0.0f, mgx = sum_gx / (float)C;  /* RMSNorm: no mean(g) */
                const float *dresr = dres ? dres + i * C : NULL;
                float *dxr = dx + i * C;
                for (j = 0; j + 8 <= C; j += 8) {
                    v8f d8 = load8(dar + j), xh = (load8(xr + j) - mu) * r;
                    v8f d = r * (d8 * load8(w + j) - mg - xh * mgx);
                    if (dresr) d += load8(dresr + j);
                    put8(dxr + j, d);
                    put8(pw + j, load8(pw + j) + d8 * xh);
                    put8(pb + j, load8(pb + j) + d8);
                    put8(pc + j, load8(pc + j) + d);
                }
                for (; j < C; j++) {
                    float xh = (xr[j] - mu) * r;
                    float d = r * (dar[j] * w[j] - mg - xh * mgx) + (dresr ? dresr[j] : 0.0f);
                    dxr[j] = d;
                    pw[j] += dar[j] * xh;
                    pb[j] += dar[j];
                    pc[j] += d;
                }
            }
        }
    }
    /* partial holds (dw, dbeta, dcol) per thread, C each: reduce each of the three in thread order. */
    float *sums = malloc(sizeof(float) * 3 * (size_t)C);
    if (!sums) {
        free(partial);
        return 1;
    }
    reduce_partials(partial, threads, 3 * C, sums);
    memcpy(dw, sums, sizeof(float) * (size_t)C);
    if (dbeta) memcpy(dbeta, sums + C, sizeof(float) * (size_t)C);
    if (dcol) memcpy(dcol, sums + 2 * C, sizeof(float) * (size_t)C);
    free(sums);
    free(partial);
    return 0;
}

/* g = gelu(h + bias) (tanh approximation; bias per column, may be NULL), and h is overwritten with
 * gelu'(h + bias): all the backward needs, so that it is one multiply per element instead of another
 * exponential. With u = h + bias, s = sigmoid(z), z = K0 u + K1 u^3:
 *     gelu(u) = u s,   gelu'(u) = s + u s (1 - s) (K0 + 3 K1 u^2).
 * g must not overlap h. */
void bias_gelu_forward(float *restrict h, const float *restrict bias, float *restrict g, int64_t N, int64_t C,
                       int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && N > 1)
    for (int64_t i = 0; i < N; i++) {
        float *restrict hr = h + i * C;
        float *restrict gr = g + i * C;
        /* Two loops rather than (bias ? bias[j] : 0) inside one: GCC vectorised that with a masked
         * load when bias is given and fell back to scalar code without it (7x slower). */
        if (bias) {
            GELU_AND_DERIVATIVE(hr[j] + bias[j])
        } else {
            GELU_AND_DERIVATIVE(hr[j])
        }
    }
}

/* dh = dg * gelu' (as bias_gelu_forward left it), and dcol = the column sums of dh (dcol may be
 * NULL). dh must not overlap the inputs. */
int gelu_backward_colsum(const float *restrict dg, const float *restrict gelu_grad, float *restrict dh,
                         float *restrict dcol, int64_t N, int64_t C, int threads) {
    if (threads < 1 || N < 2) threads = 1;
    float *partial = dcol ? calloc((size_t)threads * (size_t)C, sizeof(float)) : NULL;
    if (dcol && !partial) return 1;
    #pragma omp parallel num_threads(threads) if (threads > 1)
    {
        FOR_EACH_SHARE(N, threads, part, first, last) {
            float *restrict pc = partial ? partial + (int64_t)part * C : NULL;
            for (int64_t i = first; i < last; i++) {
                const float *restrict dgr = dg + i * C, *restrict dr = gelu_grad + i * C;
                float *restrict dhr = dh + i * C;
                if (pc) {
                    for (int64_t j = 0; j < C; j++) {
                        float v = dgr[j] * dr[j];
                        dhr[j] = v;
                        pc[j] += v;
                    }
                } else {
                    for (int64_t j = 0; j < C; j++) dhr[j] = dgr[j] * dr[j];
                }
            }
        }
    }
    if (partial) {
        reduce_partials(partial, threads, C, dcol);
        free(partial);
    }
    return 0;
}

/* out[j] = sum_i x[i][j]: the gradient of a bias broadcast over N rows. Returns 1 without scratch. */
int column_sum(const float *restrict x, float *restrict out, int64_t N, int64_t C, int threads) {
    if (threads < 1 || N < 2) threads = 1;
    float *partial = calloc((size_t)threads * (size_t)C, sizeof(float));
    if (!partial) return 1;
    #pragma omp parallel num_threads(threads) if (threads > 1)
    {
        FOR_EACH_SHARE(N, threads, part, first, last) {
            float *restrict pc = partial + (int64_t)part * C;
            for (int64_t i = first; i < last; i++) {
                const float *restrict xr = x + i * C;
                for (int64_t j = 0; j < C; j++) pc[j] += xr[j];
            }
        }
    }
    reduce_partials(partial, threads, C, out);
    free(partial);
    return 0;
}

/* x[b, t] = E[tokens[b, t]] + P[t] (P may be NULL: RoPE models) for the N = B T tokens (rows of C floats). Returns 1, writing
 * nothing more, at the first token id outside [0, V). */
int embed_forward(const int64_t *restrict tokens, const float *restrict E, const float *restrict P,
                  float *restrict x, int64_t B, int64_t T, int64_t C, int64_t V, int threads) {
    for (int64_t i = 0; i < B * T; i++) {
        if (tokens[i] < 0 || tokens[i] >= V) return 1;
    }
    #pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && B * T > 1)
    for (int64_t i = 0; i < B * T; i++) {
        const float *e = E + tokens[i] * C;
        float *xr = x + i * C;
        if (P) {
            const float *p = P + (i % T) * C;
            for (int64_t j = 0; j < C; j++) xr[j] = e[j] + p[j];
        } else {
            memcpy(xr, e, sizeof(float) * (size_t)C);
        }
    }
    return 0;
}

/* The backward of embed_forward: dE[tokens[b, t]] += dx[b, t] and dP[t] += dx[b, t], over the
 * rows in order (one thread: a token may repeat, and the sums must not depend on scheduling). dE
 * and dP come zeroed or hold gradients to add to. */
void embed_backward(const int64_t *restrict tokens, const float *restrict dx, float *restrict dE,
                    float *restrict dP, int64_t B, int64_t T, int64_t C) {
    for (int64_t i = 0; i < B * T; i++) {
        const float *d = dx + i * C;
        float *e = dE + tokens[i] * C;
        for (int64_t j = 0; j < C; j++) e[j] += d[j];
        if (dP) {
            float *p = dP + (i % T) * C;
            for (int64_t j = 0; j < C; j++) p[j] += d[j];
        }
    }
}

/* SwiGLU: up = [gate | u] (N rows of 2F; bias per column added in place first, may be NULL),
 * g = silu(gate) * u, silu(x) = x sigmoid(x). up is kept for the backward. g must not overlap up. */
void swiglu_forward(float *restrict up, const float *restrict bias, float *restrict g, int64_t N, int64_t F,
                    int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && N > 1)
    for (int64_t i = 0; i < N; i++) {
        float *restrict gate = up + i * 2 * F, *restrict u = gate + F, *restrict gr = g + i * F;
        if (bias) {
            for (int64_t j = 0; j < 2 * F; j++) gate[j] += bias[j];
        }
        for (int64_t j = 0; j < F; j++) {
            float x = gate[j], s = 1.0f / (1.0f + exp_approx(-x));
            gr[j] = x * s * u[j];
        }
    }
}

/* The backward of swiglu_forward: dup = [dgate | du] with
 *     dgate = dg u silu'(gate),  silu'(x) = s (1 + x (1 - s)),   du = dg silu(gate),
 * and dcol = the column sums of dup (2F, may be NULL). dup must not overlap the inputs. */
int swiglu_backward(const float *restrict dg, const float *restrict up, float *restrict dup, float *restrict dcol,
                    int64_t N, int64_t F, int threads) {
    if (threads < 1 || N < 2) threads = 1;
    float *partial = dcol ? calloc((size_t)threads * 2 * (size_t)F, sizeof(float)) : NULL;
    if (dcol && !partial) return 1;
    #pragma omp parallel num_threads(threads) if (threads > 1)
    {
        FOR_EACH_SHARE(N, threads, part, first, last) {
            float *restrict pc = partial ? partial + (int64_t)part * 2 * F : NULL;
            for (int64_t i = first; i < last; i++) {
                const float *restrict gate = up + i * 2 * F, *restrict u = gate + F, *restrict d = dg + i * F;
                float *restrict dgate = dup + i * 2 * F, *restrict du = dgate + F;
                for (int64_t j = 0; j < F; j++) {
                    float x = gate[j], s = 1.0f / (1.0f + exp_approx(-x));
                    dgate[j] = d[j] * u[j] * s * (1.0f + x * (1.0f - s));
                    du[j] = d[j] * x * s;
                }
                if (pc) {
                    for (int64_t j = 0; j < 2 * F; j++) pc[j] += dgate[j];
                }
            }
        }
    }
    if (partial) {
        reduce_partials(partial, threads, 2 * F, dcol);
        free(partial);
    }
    return 0;
}

/* Rotary position embedding in the "rotate half" layout, in place on the query and key heads of
 * qkv (B, T, (H + 2 Hkv) D): for each head vector x at position t, with h = D / 2,
 *     x'[j] = x[j] cos[t][j] - x[j+h] sin[t][j],   x'[j+h] = x[j+h] cos[t][j+h] + x[j] sin[t][j+h]
 * (cos, sin: (T, D) tables). sign = 1 rotates (forward); sign = -1 applies the transpose of that
 * 2 x 2 map, which takes the gradient of the rotated vectors back to the unrotated ones. The value
 * heads are left. */
void rope_rotate(float *qkv, const float *restrict cos_t, const float *restrict sin_t, int64_t B, int64_t T, int64_t H,
                 int64_t Hkv, int64_t D, float sign, int threads) {
    const int64_t R = (H + 2 * Hkv) * D, h = D / 2;
    #pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && B * T > 1)
    for (int64_t i = 0; i < B * T; i++) {
        const float *c = cos_t + (i % T) * D, *s = sin_t + (i % T) * D;
        for (int64_t head = 0; head < H + Hkv; head++) {
            float *x = qkv + i * R + head * D;
            if (sign > 0) {
                for (int64_t j = 0; j < h; j++) {
                    float a = x[j], b = x[j + h];
                    x[j] = a * c[j] - b * s[j];
                    x[j + h] = b * c[j + h] + a * s[j + h];
                }
            } else {  /* the transpose of the rotation above, entry by entry */
                for (int64_t j = 0; j < h; j++) {
                    float a = x[j], b = x[j + h];
                    x[j] = a * c[j] + b * s[j + h];
                    x[j + h] = b * c[j + h] - a * s[j];
                }
            }
        }
    }
}
