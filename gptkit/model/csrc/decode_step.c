/* One decode step of the whole model for one sequence (batch 1), in one call
 * (see gptkit/model/fused_decode.py).
 *
 * At batch 1 a step must stream every weight from memory once; everything else (norms, attention
 * over the cache, activations) is tiny. Run op by op from Python, that tiny work costs more than
 * its arithmetic: about 15 PyTorch ops per layer, each paying dispatch and an OpenMP fork, and
 * running cache-cold after the previous matrix has pushed ~50 MB through the caches. Here the
 * whole step is one OpenMP parallel region: the threads split every matrix-vector product by
 * output rows, do the small work in between, and meet at a barrier after each stage.
 *
 * Supported: GPT-2 (learned positions, LayerNorm, GELU) and the modern options (RoPE, RMSNorm,
 * SwiGLU, grouped-/multi-query attention, no biases, untied head); not QK-norm. The weights are
 * the model's own row-major (out, in) nn.Linear weights, read in place.
 */
#include <float.h>

#include "common.h"

/* Per layer, the caller passes these pointers in this order (NULL for an absent bias). */
enum {
    ATTN_NORM_W, ATTN_NORM_B, QKV_W, QKV_B, OUT_W, OUT_B,
    MLP_NORM_W, MLP_NORM_B, UP_W, UP_B, DOWN_W, DOWN_B,
    KEYS, VALUES, /* this layer's cache for the row: (n_kv_head, max_len, head_dim) each */
    LAYER_POINTERS
};

/* Model-wide pointers, in this order. */
enum { TOKEN_EMB, POS_EMB, FINAL_NORM_W, FINAL_NORM_B, HEAD_W, ROPE_COS, ROPE_SIN, MODEL_POINTERS };

/* Sizes and switches, in this order. */
enum {
    N_LAYER, N_HEAD, N_KV_HEAD, HEAD_DIM, D_MODEL, HIDDEN, VOCAB, MAX_LEN,
    RMSNORM, SWIGLU, ROPE, DIMS
};

typedef struct {
    int64_t n_layer, n_head, n_kv_head, head_dim, d_model, hidden, vocab, max_len;
    int rmsnorm, swiglu, rope;
    float norm_eps;
} Shape;

enum { EPILOGUE_NONE, EPILOGUE_GELU };

/* y[o] = (residual ? residual[o] : 0) + W[o] . x + bias[o], then the epilogue, for o in [0, out).
 * Called by every thread of the parallel region: the rows are split among them (static schedule,
 * so each thread streams one contiguous part of W), with a barrier at the end. */
static void gemv(const float *x, const float *w, const float *bias, float *y, const float *residual,
                 int64_t in, int64_t out, int epilogue) {
    #pragma omp for schedule(static)
    for (int64_t o = 0; o < out; o++) {
        float v = dot_row(x, w + o * in, in);
        if (bias) v += bias[o];
        if (residual) v += residual[o];
        if (epilogue == EPILOGUE_GELU) v = v * sigmoid_of_gelu_arg(v);
        y[o] = v;
    }
}

/* out = norm(x) * w (+ b): LayerNorm, or RMSNorm (no centring, no bias). One thread; n is d_model. */
static void norm(const float *x, const float *w, const float *b, float *out, int64_t n, int rms, float eps) {
    double mean = 0.0, var = 0.0;
    if (!rms) {
        for (int64_t i = 0; i < n; i++) mean += x[i];
        mean /= (double)n;
    }
    for (int64_t i = 0; i < n; i++) {
        double d = x[i] - mean;
        var += d * d;
    }
    float inv = (float)(1.0 / sqrt(var / (double)n + eps));
    for (int64_t i = 0; i < n; i++) {
        float v = (float)(x[i] - mean) * inv * w[i];
        out[i] = b ? v + b[i] : v;
    }
}

/* Rotate one head's vector v (D) in place by the angles of one position ("rotate half" layout:
 * pairs are (i, i + D/2)); cos and sin are that position's table rows (D). */
static void rotate(float *v, const float *cos, const float *sin, int64_t d) {
    int64_t half = d / 2;
    for (int64_t i = 0; i < half; i++) {
        float a = v[i], b = v[i + half];
        v[i] = a * cos[i] - b * sin[i];
        v[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

/* out += p * v over n floats */
static void axpy(float p, const float *restrict v, float *restrict out, int64_t n) {
    for (int64_t i = 0; i < n; i++) out[i] += p * v[i];
}

/* Attention of one query head over positions 0..len-1 of its key/value head.
 * q (D), keys/values (max_len, D) rows of the cache, scores (len) scratch, out (D). */
static void attend(const float *q, const float *keys, const float *values, int64_t len, int64_t d,
                   float *scores, float *out) {
    float scale = 1.0f / sqrtf((float)d);
    float max = -FLT_MAX;
    for (int64_t j = 0; j < len; j++) {
        scores[j] = dot_of(q, keys + j * d, d) * scale;
        max = scores[j] > max ? scores[j] : max;
    }
    float total = 0.0f;
    int nan_seen = 0;
    for (int64_t j = 0; j < len; j++) {
        nan_seen |= is_nan(scores[j]);
        scores[j] = exp_approx(scores[j] - max);
        total += scores[j];
    }
    /* A NaN score makes the whole row NaN, as in SDPA (exp_approx would clamp it to a weight of 0). */
    float inv = nan_seen ? NAN : 1.0f / total;
    for (int64_t i = 0; i < d; i++) out[i] = 0.0f;
    for (int64_t j = 0; j < len; j++) axpy(scores[j] * inv, values + j * d, out, d);
}

/* Logits (vocab) of the token at position `pos`, whose keys and values are written into the cache
 * at `pos` (positions 0..pos-1 must hold the sequence so far).
 * workspace: at least 2 d_model + n_head head_dim + (n_head + 2 n_kv_head) head_dim + up_width + n_head max_len
 * floats, up_width being the up projection's rows (2 hidden for SwiGLU). */
void gpt_decode_step(const int64_t *dims, float norm_eps, const int64_t *model_ptrs, const int64_t *layer_ptrs,
                     int64_t token, int64_t pos, float *workspace, float *logits, int threads) {
    Shape s = {
        dims[N_LAYER], dims[N_HEAD], dims[N_KV_HEAD], dims[HEAD_DIM], dims[D_MODEL], dims[HIDDEN],
        dims[VOCAB], dims[MAX_LEN], (int)dims[RMSNORM], (int)dims[SWIGLU], (int)dims[ROPE], norm_eps,
    };
    const int64_t C = s.d_model, D = s.head_dim, H = s.n_head, G = s.n_kv_head;
    const int64_t group = H / G;  /* query heads per key/value head */
    const int64_t qkv_width = (H + 2 * G) * D;
    const int64_t up_width = s.swiglu ? 2 * s.hidden : s.hidden;
    float *x = workspace;             /* the residual stream (C) */
    float *xn = x + C;                /* its normalised copy (C) */
    float *att = xn + C;              /* attention output, heads side by side (H D) */
    float *qkv = att + H * D;         /* (H + 2 G) D */
    float *hidden = qkv + qkv_width;  /* MLP hidden (up_width) */
    float *scores = hidden + up_width;  /* (H, max_len) */
    const float *const *mp = (const float *const *)model_ptrs;
    const float *cos = s.rope ? mp[ROPE_COS] + pos * D : NULL;
    const float *sin = s.rope ? mp[ROPE_SIN] + pos * D : NULL;

    #pragma omp parallel num_threads(threads)
    {
        #pragma omp single
        {
            const float *emb = mp[TOKEN_EMB] + token * C;
            const float *pemb = mp[POS_EMB] ? mp[POS_EMB] + pos * C : NULL;
            for (int64_t i = 0; i < C; i++) x[i] = pemb ? emb[i] + pemb[i] : emb[i];
            norm(x, (const float *)layer_ptrs[ATTN_NORM_W], (const float *)layer_ptrs[ATTN_NORM_B], xn, C,
                 s.rmsnorm, s.norm_eps);
        }
        for (int64_t l = 0; l < s.n_layer; l++) {
            const float *const *p = (const float *const *)(layer_ptrs + l * LAYER_POINTERS);
            float *keys = (float *)p[KEYS], *values = (float *)p[VALUES];

            gemv(xn, p[QKV_W], p[QKV_B], qkv, NULL, C, qkv_width, EPILOGUE_NONE);

            /* The new key (rotated) and value of each key/value head go into the cache at pos. */
            #pragma omp for schedule(static)
            for (int64_t g = 0; g < G; g++) {
                float *k = qkv + (H + g) * D, *v = qkv + (H + G + g) * D;
                if (s.rope) rotate(k, cos, sin, D);
                memcpy(keys + (g * s.max_len + pos) * D, k, D * sizeof(float));
                memcpy(values + (g * s.max_len + pos) * D, v, D * sizeof(float));
            }
            #pragma omp for schedule(static)
            for (int64_t h = 0; h < H; h++) {
                float *q = qkv + h * D;
                if (s.rope) rotate(q, cos, sin, D);
                int64_t g = h / group;
                attend(q, keys + g * s.max_len * D, values + g * s.max_len * D, pos + 1, D,
                       scores + h * s.max_len, att + h * D);
            }

            gemv(att, p[OUT_W], p[OUT_B], x, x, H * D, C, EPILOGUE_NONE);  /* x += out(att) */
            #pragma omp single
            norm(x, p[MLP_NORM_W], p[MLP_NORM_B], xn, C, s.rmsnorm, s.norm_eps);

            if (s.swiglu) {
                gemv(xn, p[UP_W], p[UP_B], hidden, NULL, C, up_width, EPILOGUE_NONE);
                /* hidden[:n] = silu(gate) * up, gate = hidden[:n], up = hidden[n:] */
                #pragma omp for schedule(static)
                for (int64_t i = 0; i < s.hidden; i++) {
                    float gate = hidden[i];
                    hidden[i] = gate / (1.0f + exp_approx(-gate)) * hidden[s.hidden + i];
                }
            } else {
                gemv(xn, p[UP_W], p[UP_B], hidden, NULL, C, s.hidden, EPILOGUE_GELU);
            }
            gemv(hidden, p[DOWN_W], p[DOWN_B], x, x, s.hidden, C, EPILOGUE_NONE);  /* x += down(h) */

            #pragma omp single
            {
                if (l + 1 < s.n_layer) {
                    const float *const *next = (const float *const *)(layer_ptrs + (l + 1) * LAYER_POINTERS);
                    norm(x, next[ATTN_NORM_W], next[ATTN_NORM_B], xn, C, s.rmsnorm, s.norm_eps);
                } else {
                    norm(x, mp[FINAL_NORM_W], mp[FINAL_NORM_B], xn, C, s.rmsnorm, s.norm_eps);
                }
            }
        }
        gemv(xn, mp[HEAD_W], NULL, logits, NULL, C, s.vocab, EPILOGUE_NONE);
    }
}
