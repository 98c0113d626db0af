// A whole decode step of a Llama-family model in one call: every layer's norms, projections, rotary, KV
// write, attention and SwiGLU, then the final norm. The operators are the ones the step runs one by one
// from Python (cpu_ops.c, paged_decode.c, included here so this is one library), called in the same order
// on the same values, so the result is bit for bit the per-operator path's; what goes is the ~300 calls
// from Python a step made, each costing more than the operator itself on a small model.
//
// Activations are float32 (is_bf16 = 0) or bfloat16; a weight matrix is in the activations' dtype or int8
// with a float32 scale per row, or bfloat16 packed for packed_gemm_bf16.

#include "paged_decode.c"
#include "cpu_ops.c"

#include <omp.h>

typedef struct {
    int64_t kind;  // MATRIX_DENSE, MATRIX_INT8 or MATRIX_PACKED
    const void *weight;
    const float *scales;        // int8: one per row
    const int32_t *block_sums;  // int8: see gemm_q8 (cpu_ops.c)
    const void *bias;           // in the activations' dtype, or NULL
    int64_t rows, cols;
} Matrix;

#define MATRIX_DENSE 0
#define MATRIX_INT8 1
#define MATRIX_PACKED 2  // bfloat16 in packed_gemm_bf16's layout (models/packed_linear.py)

typedef struct {
    const void *input_norm, *post_norm;
    Matrix qkv, o, gate_up, down;
    void *k_cache, *v_cache;  // [num_kv_heads, num_slots, head_dim]
    int64_t window;           // sliding window, 0 for none
} DecodeLayer;

typedef struct {
    int64_t num_layers, hidden, num_heads, num_kv_heads, head_dim, intermediate, num_slots, block_size;
    float eps, scale;
} DecodeModel;

// The decoding sequences of the step: one token each, rows sorted as the block tables are.
typedef struct {
    int64_t num_seqs, max_blocks;
    const int64_t *positions, *slots, *block_tables, *context_lens;
    const float *cos, *sin;  // the rotary tables, [max_positions, head_dim] float32
} DecodeBatch;

static int matmul(const Matrix *w, const void *x, void *y, int64_t M, int is_bf16, int threads) {
    if (w->kind == MATRIX_INT8)
        return gemm_q8(x, w->cols, w->weight, w->scales, w->block_sums, w->bias, y, w->rows, M, w->rows, w->cols,
                       threads, is_bf16);
    if (w->kind == MATRIX_PACKED)
        return packed_gemm_bf16(x, w->cols, w->weight, w->bias, y, w->rows, M, w->rows, w->cols, threads);
    if (is_bf16) return skinny_gemm_bf16(x, w->cols, w->weight, w->bias, y, w->rows, M, w->rows, w->cols, threads);
    return skinny_gemm_f32(x, w->cols, w->weight, w->bias, y, w->rows, M, w->rows, w->cols, threads);
}

// q out of the step's fused projection into its own rows (the attention reads them contiguous), and k and v
// into the cache slot of each row's token.
static void scatter_qkv(const DecodeModel *model, const DecodeLayer *layer, const char *qkv, char *q,
                        const int64_t *slots, int64_t M, size_t es) {
    const int64_t D = model->head_dim, q_size = model->num_heads * D, kv_size = model->num_kv_heads * D;
    const int64_t row = q_size + 2 * kv_size;
    for (int64_t m = 0; m < M; m++) {
        memcpy(q + m * q_size * es, qkv + m * row * es, q_size * es);
        for (int64_t h = 0; h < model->num_kv_heads; h++) {
            int64_t at = (h * model->num_slots + slots[m]) * D;
            memcpy((char *)layer->k_cache + at * es, qkv + (m * row + q_size + h * D) * es, D * es);
            memcpy((char *)layer->v_cache + at * es, qkv + (m * row + q_size + kv_size + h * D) * es, D * es);
        }
    }
}

// A small operator between the products, on decode_step's rows [0, M) split over its `threads` when there
// are many (rows are independent, so the result does not change; below PARALLEL_ROWS starting the threads
// costs more than the rows). CALL names its share FIRST and COUNT, and the dtype as a constant BF16, so
// the operator's code is specialised as in a direct call.
#define PARALLEL_ROWS 16
#define ON_ROWS_SHARE(CALL, SHARE, T)                                                                    \
    do {                                                                                                 \
        const int64_t FIRST = M * (T) / (SHARE), COUNT = M * ((T) + 1) / (SHARE) - FIRST;                \
        if (is_bf16) {                                                                                   \
            const int BF16 = 1;                                                                          \
            CALL;                                                                                        \
        } else {                                                                                         \
            const int BF16 = 0;                                                                          \
            CALL;                                                                                        \
        }                                                                                                \
    } while (0)
#define ON_ROWS(CALL)                                                                                    \
    do {                                                                                                 \
        if (M < PARALLEL_ROWS) {                                                                         \
            ON_ROWS_SHARE(CALL, 1, 0);                                                                   \
        } else {                                                                                         \
            _Pragma("omp parallel num_threads(threads)")                                                 \
            ON_ROWS_SHARE(CALL, omp_get_num_threads(), omp_get_thread_num());                            \
        }                                                                                                \
    } while (0)

// x: the step's embeddings [M, hidden]; out: the hidden states after the final norm. Returns 0; 3 out of
// memory; else the first failing operator's status.
static int decode_step(const DecodeModel *model, const DecodeLayer *layers, const void *final_norm,
                       const DecodeBatch *batch, const void *x, void *out, int threads, int is_bf16) {
    const int64_t M = batch->num_seqs, H = model->hidden, D = model->head_dim, I = model->intermediate;
    const int64_t q_size = model->num_heads * D, qkv_size = q_size + 2 * model->num_kv_heads * D;
    const size_t es = is_bf16 ? 2 : 4;
    char *scratch = malloc((size_t)M * (size_t)(3 * H + qkv_size + 2 * q_size + 3 * I) * es);
    if (!scratch) return 3;
    char *residual = scratch, *h = residual + M * H * es, *stream = h + M * H * es, *qkv = stream + M * H * es;
    char *q = qkv + M * qkv_size * es, *attn = q + M * q_size * es, *gate_up = attn + M * q_size * es;
    char *act = gate_up + M * 2 * I * es;
    memcpy(residual, x, M * H * es);
    int status = 0;
    for (int64_t l = 0; l < model->num_layers && !status; l++) {
        const DecodeLayer *layer = layers + l;
        const int first_layer = l == 0;
        ON_ROWS(
                add_rms_norm((first_layer ? residual : stream) + FIRST * H * es, H,
                             first_layer ? NULL : residual + FIRST * H * es, H, layer->input_norm,
                             h + FIRST * H * es, H, COUNT, H, model->eps, BF16));
        if ((status = matmul(&layer->qkv, h, qkv, M, is_bf16, threads))) break;
        ON_ROWS({
            rotary(qkv + FIRST * qkv_size * es, qkv_size, COUNT, model->num_heads + model->num_kv_heads, D,
                   batch->positions + FIRST, batch->cos, batch->sin, BF16);
            scatter_qkv(model, layer, qkv + FIRST * qkv_size * es, q + FIRST * q_size * es,
                        batch->slots + FIRST, COUNT, es);
        });
        status = is_bf16 ? paged_decode_bf16((const uint16_t *)q, layer->k_cache, layer->v_cache, batch->block_tables,
                                             batch->context_lens, (uint16_t *)attn, M, model->num_heads,
                                             model->num_kv_heads, D, model->num_slots, batch->max_blocks,
                                             model->block_size, layer->window, model->scale)
                         : paged_decode_f32((const float *)q, layer->k_cache, layer->v_cache, batch->block_tables,
                                            batch->context_lens, (float *)attn, M, model->num_heads,
                                            model->num_kv_heads, D, model->num_slots, batch->max_blocks,
                                            model->block_size, layer->window, model->scale);
        if (status || (status = matmul(&layer->o, attn, stream, M, is_bf16, threads))) break;
        ON_ROWS(
                add_rms_norm(stream + FIRST * H * es, H, residual + FIRST * H * es, H, layer->post_norm,
                             h + FIRST * H * es, H, COUNT, H, model->eps, BF16));
        if ((status = matmul(&layer->gate_up, h, gate_up, M, is_bf16, threads))) break;
        ON_ROWS(silu_mul(gate_up + FIRST * 2 * I * es, 2 * I, act + FIRST * I * es, I, COUNT, I, BF16));
        status = matmul(&layer->down, act, stream, M, is_bf16, threads);
    }
    if (!status)
        ON_ROWS(
                add_rms_norm(stream + FIRST * H * es, H, residual + FIRST * H * es, H, final_norm,
                             (char *)out + FIRST * H * es, H, COUNT, H, model->eps, BF16));
    free(scratch);
    return status;
}

int decode_step_f32(const DecodeModel *model, const DecodeLayer *layers, const void *final_norm,
                    const DecodeBatch *batch, const void *x, void *out, int threads) {
    return decode_step(model, layers, final_norm, batch, x, out, threads, 0);
}

int decode_step_bf16(const DecodeModel *model, const DecodeLayer *layers, const void *final_norm,
                     const DecodeBatch *batch, const void *x, void *out, int threads) {
    return decode_step(model, layers, final_norm, batch, x, out, threads, 1);
}
