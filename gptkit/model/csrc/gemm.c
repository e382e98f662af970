/* Float32 matrix products for the fused training trunk (see gptkit/model/gemm_kernel.py).
 *
 * At the widths gptkit trains on CPU (d_model 128-768, a few hundred to a few thousand rows)
 * a training step is mostly these products, and a general BLAS spends part of each call on work
 * that is not multiply-adds: it copies ("packs") both inputs into its own layout and clears the
 * output before accumulating into it. Here the three forms a Linear layer needs are one routine
 * that reads the activations where they are and writes each result element once:
 *
 *     gemm_nt:  C = A W^T (+ bias)   the forward        (A: M x K rows, W: N x K, the weight)
 *     gemm_nn:  C = A B              the input gradient (B: K x N, the weight as stored)
 *     gemm_tn:  C = A^T B            the weight gradient (A: K x M, B: K x N, K the rows)
 *
 * The result is computed in tiles of MR rows x NR columns held in registers (24 of the 32 AVX-512
 * registers) over the whole of K: per k, NV vectors of B and MR scalars of A broadcast, for
 * MR x NV multiply-adds; then the tile is stored once. A is read in place through a row stride
 * and a k stride (so A^T costs nothing: its MR scalars at one k are adjacent); B must have its NR
 * columns of one k adjacent, which the weight gradient's B and the input gradient's weight have
 * as stored. Only the forward's W^T does not: gemm_nt first copies W into column panels
 * (K x NR each), a small copy next to the product (W has N x K elements, the product M x N x K
 * multiply-adds).
 *
 * The work items (a run of ROW_TILES row tiles and a column panel) are split between the threads
 * statically, in row order: thread t computes the same contiguous share of the rows in every
 * product, the share that block.c's row kernels and the attention kernel give it, so a thread
 * reads activations its own core wrote. On the 2-core test machine the two vCPUs are sometimes
 * placed on different core complexes (no shared L3; a char-shape step then takes ~37 ms instead
 * of ~28 with a dynamic split), where this split saved ~10% of the step (33 ms), and it was no
 * slower otherwise. Each item writes its own part of C, so the results do not depend on the split,
 * and each element's sum runs over k in order (deterministic).
 *
 * Measured on the 2-core test machine (AVX-512, Zen 4) at the char benchmark's shapes (M = 768
 * rows, K and N from 128 to 512), caches flushed before each call as in a training step: 1.2x to
 * 1.5x the speed of MKL's sgemm through torch.mm. Without AVX-512 (gemm_available() returns 0)
 * the caller uses torch.mm.
 */
#include <stdint.h>
#include <stdlib.h>

#ifdef _OPENMP
#include <omp.h>
#else
static inline int omp_get_thread_num(void) { return 0; }
static inline int omp_get_num_threads(void) { return 1; }
#endif

#include "common.h"

int gemm_available(void);

#if defined(__AVX512F__)
#include <immintrin.h>

#define MR 6             /* rows of a tile */
#define NV 4             /* 16-float vectors per tile row */
#define NR (16 * NV)     /* columns of a tile: one panel */
#define ROW_TILES 8      /* row tiles per work item (48 rows) */

int gemm_available(void) { return 1; }

/* One tile: C[r][n] = bias[n] + sum_k A(r, k) B(k, n), r < ROWS, n < 16 (VECS - 1) + popcount(last);
 * A(r, k) at A[r * lda + k], or at A[r + k * lda] when A_T (A stored transposed), B(k, n) at
 * B[k * bks + n], bias may be NULL (then `zeros`). `last` masks the columns of the last vector
 * (MASKED only; the other tiles read and write all 16 VECS columns). The loops over r and v have
 * constant bounds and A's layout is fixed per function, so the compiler unrolls them into one loop
 * over k that keeps the tile in registers. */
static const float zeros[NR];

#define DEFINE_TILE(NAME, ROWS, VECS, MASKED, A_T)                                                       \
    static void NAME(int64_t K, const float *A, int64_t lda, const float *B, int64_t bks, const float *bias, \
                     float *C, int64_t ldc, __mmask16 last) {                                             \
        const float *start = bias ? bias : zeros;                                                         \
        __m512 c[ROWS][VECS];                                                                             \
        for (int v = 0; v < VECS; v++) {                                                                  \
            __mmask16 m = (MASKED && v == VECS - 1) ? last : (__mmask16)0xFFFF;                           \
            __m512 init = _mm512_maskz_loadu_ps(m, start + 16 * v);                                       \
            for (int r = 0; r < ROWS; r++) c[r][v] = init;                                                \
        }                                                                                                 \
        for (int64_t k = 0; k < K; k++) {                                                                 \
            const float *bk = B + k * bks;                                                                \
            __m512 b[VECS];                                                                               \
            for (int v = 0; v < VECS; v++)                                                                \
                b[v] = (MASKED && v == VECS - 1) ? _mm512_maskz_loadu_ps(last, bk + 16 * v)              \
                                                 : _mm512_loadu_ps(bk + 16 * v);                          \
            for (int r = 0; r < ROWS; r++) {                                                              \
                __m512 ar = _mm512_set1_ps(A_T ? A[r + k * lda] : A[r * lda + k]);                        \
                for (int v = 0; v < VECS; v++) c[r][v] = _mm512_fmadd_ps(ar, b[v], c[r][v]);              \
            }                                                                                             \
        }                                                                                                 \
        for (int r = 0; r < ROWS; r++) {                                                                  \
            float *cr = C + r * ldc;                                                                      \
            for (int v = 0; v < VECS; v++) {                                                              \
                if (MASKED && v == VECS - 1) _mm512_mask_storeu_ps(cr + 16 * v, last, c[r][v]);           \
                else _mm512_storeu_ps(cr + 16 * v, c[r][v]);                                              \
            }                                                                                             \
        }                                                                                                 \
    }

/* Per layout of A: the full tile, then MR rows of 1-4 vectors (the last masked), then one row. */
#define DEFINE_TILES(SUFFIX, A_T)                                     \
    DEFINE_TILE(full_##SUFFIX, MR, NV, 0, A_T)                        \
    DEFINE_TILE(row_##SUFFIX, 1, NV, 0, A_T)                          \
    DEFINE_TILE(mx1_##SUFFIX, MR, 1, 1, A_T)                          \
    DEFINE_TILE(mx2_##SUFFIX, MR, 2, 1, A_T)                          \
    DEFINE_TILE(mx3_##SUFFIX, MR, 3, 1, A_T)                          \
    DEFINE_TILE(mx4_##SUFFIX, MR, 4, 1, A_T)                          \
    DEFINE_TILE(x1_##SUFFIX, 1, 1, 1, A_T)                            \
    DEFINE_TILE(x2_##SUFFIX, 1, 2, 1, A_T)                            \
    DEFINE_TILE(x3_##SUFFIX, 1, 3, 1, A_T)                            \
    DEFINE_TILE(x4_##SUFFIX, 1, 4, 1, A_T)                            \
    static const struct tiles tiles_##SUFFIX = {full_##SUFFIX, row_##SUFFIX, {mx1_##SUFFIX, mx2_##SUFFIX, mx3_##SUFFIX, mx4_##SUFFIX}, \
                                                {x1_##SUFFIX, x2_##SUFFIX, x3_##SUFFIX, x4_##SUFFIX}};

typedef void (*tile_fn)(int64_t, const float *, int64_t, const float *, int64_t, const float *, float *, int64_t,
                        __mmask16);
struct tiles {
    tile_fn full, row;           /* MR rows and one row, NR columns */
    tile_fn rows_masked[NV];     /* MR rows, 1..NV vectors, the last masked */
    tile_fn row_masked[NV];      /* one row, 1..NV vectors, the last masked */
};

DEFINE_TILES(n, 0)  /* A as stored: the forward and the input gradient */
DEFINE_TILES(t, 1)  /* A transposed: the weight gradient */

/* rows (1..MR) x width (1..NR) of C at C, from A at A (row r of the tile at A + r * (A_T ? 1 : lda))
 * and the panel at B. */
static void tile(const struct tiles *f, int a_t, int64_t rows, int64_t width, int64_t K, const float *A, int64_t lda,
                 const float *B, int64_t bks, const float *bias, float *C, int64_t ldc) {
    const int64_t row_step = a_t ? 1 : lda;
    if (width == NR) {
        if (rows == MR) {
            f->full(K, A, lda, B, bks, bias, C, ldc, 0xFFFF);
            return;
        }
        for (int64_t r = 0; r < rows; r++) f->row(K, A + r * row_step, lda, B, bks, bias, C + r * ldc, ldc, 0xFFFF);
        return;
    }
    int64_t vecs = (width + 15) / 16, tail = width - 16 * (vecs - 1);
    __mmask16 last = (__mmask16)(tail == 16 ? 0xFFFF : (1u << tail) - 1u);
    if (rows == MR) {
        f->rows_masked[vecs - 1](K, A, lda, B, bks, bias, C, ldc, last);
        return;
    }
    for (int64_t r = 0; r < rows; r++)
        f->row_masked[vecs - 1](K, A + r * row_step, lda, B, bks, bias, C + r * ldc, ldc, last);
}

/* What is done to each tile of C right after it is computed, while it is in the L1 cache: the MLP's
 * GELU in the forward, and its derivative in the backward, which would otherwise each be a pass
 * over the whole matrix (written, then read back from L2 or L3). */
enum { EPILOGUE_NONE, EPILOGUE_GELU, EPILOGUE_GELU_BACKWARD };
struct epilogue {
    int kind;
    float *g;                /* GELU: g = gelu(c) (row stride ldg), and c is replaced by gelu'(c) */
    int64_t ldg;
    const float *gelu_grad;  /* GELU_BACKWARD: c *= gelu_grad (row stride ldd, as the forward left it) */
    int64_t ldd;
    float *partial;          /* GELU_BACKWARD: the column sums of c per run of ROW_TILES row tiles, (runs, N), or NULL */
    int64_t N;
};

/* The epilogue of the tile of rows x width at row m0, column n0 of C (at c), in run `run`. */
static void finish_tile(const struct epilogue *e, int64_t run, int64_t m0, int64_t n0, int64_t rows, int64_t width,
                        float *c, int64_t ldc) {
    const int64_t C = width;  /* the row length GELU_AND_DERIVATIVE runs over */
    if (e->kind == EPILOGUE_GELU) {
        for (int64_t r = 0; r < rows; r++) {
            float *restrict hr = c + r * ldc, *restrict gr = e->g + (m0 + r) * e->ldg + n0;
            GELU_AND_DERIVATIVE(hr[j])
        }
        return;
    }
    float *restrict sums = e->partial ? e->partial + run * e->N + n0 : NULL;
    for (int64_t r = 0; r < rows; r++) {
        float *restrict cr = c + r * ldc;
        const float *restrict dr = e->gelu_grad + (m0 + r) * e->ldd + n0;
        if (sums) {
            for (int64_t j = 0; j < C; j++) {
                float v = cr[j] * dr[j];
                cr[j] = v;
                sums[j] += v;
            }
        } else {
            for (int64_t j = 0; j < C; j++) cr[j] *= dr[j];
        }
    }
}

/* C (M, N; row stride ldc) = A B (+ bias), then the epilogue (NULL: none): A(m, k) at A[m * lda + k],
 * or A[m + k * lda] when a_t; column panel p of B (columns p NR .. p NR + NR - 1) has B(k, n) at
 * B[p * panel_stride + k * bks + n - p NR]. */
static void gemm_panels(int64_t M, int64_t N, int64_t K, const float *A, int64_t lda, int a_t, const float *B,
                        int64_t panel_stride, int64_t bks, const float *bias, float *C, int64_t ldc,
                        const struct epilogue *epilogue, int threads) {
    const struct tiles *f = a_t ? &tiles_t : &tiles_n;
    const int64_t row_step = a_t ? 1 : lda;
    const int64_t panels = (N + NR - 1) / NR, row_tiles = (M + MR - 1) / MR;
    const int64_t runs = (row_tiles + ROW_TILES - 1) / ROW_TILES, items = panels * runs;
    #pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && items > 1)
    for (int64_t item = 0; item < items; item++) {
        /* Row-major order: a thread's consecutive items read the same rows of A, which stay in its cache. */
        int64_t run = item / panels, p = item % panels, n0 = p * NR;
        int64_t width = N - n0 < NR ? N - n0 : NR;
        int64_t t_end = (run + 1) * ROW_TILES < row_tiles ? (run + 1) * ROW_TILES : row_tiles;
        for (int64_t t = run * ROW_TILES; t < t_end; t++) {
            int64_t m0 = t * MR, rows = M - m0 < MR ? M - m0 : MR;
            tile(f, a_t, rows, width, K, A + m0 * row_step, lda, B + p * panel_stride, bks, bias ? bias + n0 : NULL,
                 C + m0 * ldc + n0, ldc);
            if (epilogue) finish_tile(epilogue, run, m0, n0, rows, width, C + m0 * ldc + n0, ldc);
        }
    }
}

/* W (N, K; row stride ldw) laid out as gemm_panels reads B = W^T: panel p holds columns p NR ..,
 * pack[p K NR + k NR + j] = W[p NR + j][k], zero past N. */
static void pack_transposed(int64_t N, int64_t K, const float *W, int64_t ldw, float *pack, int threads) {
    const int64_t panels = (N + NR - 1) / NR;
    /* Panel p holds columns p NR ..: pack[p K NR + k NR + j] = W[p NR + j][k], zero past N. */
    #pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && panels > 1)
    for (int64_t p = 0; p < panels; p++) {
        float *panel = pack + p * K * NR;
        for (int64_t j = 0; j < NR; j++) {
            int64_t n = p * NR + j;
            if (n < N) {
                const float *row = W + n * ldw;
                for (int64_t k = 0; k < K; k++) panel[k * NR + j] = row[k];
            } else {
                for (int64_t k = 0; k < K; k++) panel[k * NR + j] = 0.0f;
            }
        }
    }
}

/* C (M, N) = A (M, K; row stride lda) W^T (+ bias (N), or NULL), W (N, K; row stride ldw).
 * pack: room for gemm_pack_floats(N, K) floats. Returns 0. */
int gemm_nt(int64_t M, int64_t N, int64_t K, const float *A, int64_t lda, const float *W, int64_t ldw,
            const float *bias, float *C, int64_t ldc, float *pack, int threads) {
    pack_transposed(N, K, W, ldw, pack, threads);
    gemm_panels(M, N, K, A, lda, 0, pack, K * NR, NR, bias, C, ldc, NULL, threads);
    return 0;
}

/* The MLP's up projection and GELU: H (M, N) = A W^T (+ bias), then G = gelu(H) (tanh form, as
 * block.c's bias_gelu_forward) and H replaced by gelu'(H), all the backward needs. Returns 0. */
int gemm_nt_gelu(int64_t M, int64_t N, int64_t K, const float *A, int64_t lda, const float *W, int64_t ldw,
                 const float *bias, float *H, float *G, float *pack, int threads) {
    pack_transposed(N, K, W, ldw, pack, threads);
    struct epilogue e = {EPILOGUE_GELU, G, N, NULL, 0, NULL, N};
    gemm_panels(M, N, K, A, lda, 0, pack, K * NR, NR, bias, H, N, &e, threads);
    return 0;
}

/* The GELU's backward through the down projection: DH (M, N) = (A B) * gelu_grad, A (M, K; row stride
 * lda) the gradient of the MLP's output, B (K, N; row stride ldb) the down projection's weight,
 * gelu_grad (M, N) what gemm_nt_gelu left in H; dcol = the column sums of DH (the up projection's
 * bias gradient; may be NULL), added over runs of rows in a fixed order whatever the threads.
 * Returns 0, or 1 when the sums' scratch memory could not be allocated (nothing written). */
int gemm_nn_gelu_backward(int64_t M, int64_t N, int64_t K, const float *A, int64_t lda, const float *B, int64_t ldb,
                          const float *gelu_grad, float *DH, float *dcol, int threads) {
    const int64_t runs = ((M + MR - 1) / MR + ROW_TILES - 1) / ROW_TILES;
    float *partial = NULL;
    if (dcol) {
        partial = calloc((size_t)(runs * N), sizeof(float));
        if (!partial) return 1;
    }
    struct epilogue e = {EPILOGUE_GELU_BACKWARD, NULL, 0, gelu_grad, N, partial, N};
    gemm_panels(M, N, K, A, lda, 0, B, NR, ldb, NULL, DH, N, &e, threads);
    if (dcol) {
        for (int64_t n = 0; n < N; n++) dcol[n] = partial[n];
        for (int64_t run = 1; run < runs; run++)
            for (int64_t n = 0; n < N; n++) dcol[n] += partial[run * N + n];
        free(partial);
    }
    return 0;
}

/* C (M, N) = A (M, K; row stride lda) B (K, N; row stride ldb). Returns 0. */
int gemm_nn(int64_t M, int64_t N, int64_t K, const float *A, int64_t lda, const float *B, int64_t ldb, float *C,
            int64_t ldc, int threads) {
    gemm_panels(M, N, K, A, lda, 0, B, NR, ldb, NULL, C, ldc, NULL, threads);
    return 0;
}

/* C (M, N) = A^T B, A (K, M; row stride lda), B (K, N; row stride ldb): the weight gradient, a
 * sum over K rows (tokens). With room for it in scratch ((threads - 1) M N floats), each thread
 * sums over its own share of the K rows (the rows its core wrote, as the other products split
 * them) into C or its part of scratch, and then the threads add the parts into C, each over its
 * share of C's rows, in thread order: a thread reads the other core's partial sums (M N floats)
 * instead of half of A and B (K (M + N) / 2). When the two vCPUs sit on different core complexes
 * this took a char-shape step from 32.5 to 30.4 ms, and 27.7 to 27.4 otherwise. The sums then
 * depend on the number of threads (as ATen's reductions do), not on timing. Without the room,
 * the threads split C by rows and columns as in the other products. Returns 0. */
int gemm_tn(int64_t M, int64_t N, int64_t K, const float *A, int64_t lda, const float *B, int64_t ldb, float *C,
            int64_t ldc, float *scratch, int64_t scratch_floats, int threads) {
    if (threads < 2 || K < 2 * (int64_t)threads || !scratch || scratch_floats < (threads - 1) * M * N) {
        gemm_panels(M, N, K, A, lda, 1, B, NR, ldb, NULL, C, ldc, NULL, threads);
        return 0;
    }
    /* The K rows are cut into `threads` parts whatever team OpenMP gives (fewer threads under
     * OMP_DYNAMIC, OMP_THREAD_LIMIT or nesting): a smaller team computes several parts each, so the
     * sums are the same bits as with the full team. */
    #pragma omp parallel num_threads(threads)
    {
        int t = omp_get_thread_num(), team = omp_get_num_threads();  /* team <= threads */
        for (int part = t; part < threads; part += team) {
            int64_t k0 = K * part / threads, k1 = K * (part + 1) / threads;
            float *dst = part == 0 ? C : scratch + (part - 1) * M * N;
            gemm_panels(M, N, k1 - k0, A + k0 * lda, lda, 1, B + k0 * ldb, NR, ldb, NULL, dst, part == 0 ? ldc : N,
                        NULL, 1);
        }
        #pragma omp barrier
        for (int64_t m = M * t / team; m < M * (t + 1) / team; m++) {
            float *restrict row = C + m * ldc;
            for (int u = 1; u < threads; u++) {
                const float *restrict other = scratch + (u - 1) * M * N + m * N;
                for (int64_t n = 0; n < N; n++) row[n] += other[n];
            }
        }
    }
    return 0;
}

int64_t gemm_pack_floats(int64_t N, int64_t K) { return (N + NR - 1) / NR * NR * K; }

#else /* no AVX-512: the caller uses torch.mm */

int gemm_available(void) { return 0; }

int gemm_nt(int64_t M, int64_t N, int64_t K, const float *A, int64_t lda, const float *W, int64_t ldw,
            const float *bias, float *C, int64_t ldc, float *pack, int threads) {
    (void)M, (void)N, (void)K, (void)A, (void)lda, (void)W, (void)ldw, (void)bias, (void)C, (void)ldc, (void)pack;
    (void)threads;
    return 1;
}
int gemm_nn(int64_t M, int64_t N, int64_t K, const float *A, int64_t lda, const float *B, int64_t ldb, float *C,
            int64_t ldc, int threads) {
    (void)M, (void)N, (void)K, (void)A, (void)lda, (void)B, (void)ldb, (void)C, (void)ldc, (void)threads;
    return 1;
}
int gemm_tn(int64_t M, int64_t N, int64_t K, const float *A, int64_t lda, const float *B, int64_t ldb, float *C,
            int64_t ldc, float *scratch, int64_t scratch_floats, int threads) {
    (void)M, (void)N, (void)K, (void)A, (void)lda, (void)B, (void)ldb, (void)C, (void)ldc, (void)scratch;
    (void)scratch_floats, (void)threads;
    return 1;
}
int gemm_nt_gelu(int64_t M, int64_t N, int64_t K, const float *A, int64_t lda, const float *W, int64_t ldw,
                 const float *bias, float *H, float *G, float *pack, int threads) {
    (void)M, (void)N, (void)K, (void)A, (void)lda, (void)W, (void)ldw, (void)bias, (void)H, (void)G, (void)pack;
    (void)threads;
    return 1;
}
int gemm_nn_gelu_backward(int64_t M, int64_t N, int64_t K, const float *A, int64_t lda, const float *B, int64_t ldb,
                          const float *gelu_grad, float *DH, float *dcol, int threads) {
    (void)M, (void)N, (void)K, (void)A, (void)lda, (void)B, (void)ldb, (void)gelu_grad, (void)DH, (void)dcol;
    (void)threads;
    return 1;
}
int64_t gemm_pack_floats(int64_t N, int64_t K) { return N * K; }

#endif
