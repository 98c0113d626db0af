/* Decode attention straight from the paged KV cache, for CPUs.
 *
 * One query token per sequence attends to its whole context, or with a sliding window (window > 0) to its
 * last `window` tokens only. The torch backend must first gather each
 * context into a padded tensor (copying every cached K/V byte, then reading the copy again); this kernel
 * walks the block table and reads each cached K/V row exactly once, which is what bounds decode on CPU.
 *
 * Layouts (all contiguous):
 *   q, out        [num_seqs, num_heads, head_dim]
 *   k_cache, v    [num_kv_heads, num_slots, head_dim]        slot = block_id * block_size + offset
 *   block_tables  [num_seqs, max_blocks] int64
 *   context_lens  [num_seqs] int64
 * Query head h uses KV head h / (num_heads / num_kv_heads) (grouped-query attention).
 * Scores and the softmax are float32, as in the torch backend.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* glibc declares its vector expf (libmvec, within 4 ulp) only under -ffast-math, and this kernel is built
 * without it (see cpu_attention.py: it would change the floating-point state of the process loading it).
 * Declaring it here keeps the softmax loop vectorised, as it was with -ffast-math. */
#if defined(__x86_64__) && defined(__GLIBC__) && !defined(__clang__)
float expf(float) __attribute__((simd("notinbranch")));
#endif

static inline float bf16_to_float(uint16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t float_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    bits += 0x7FFF + ((bits >> 16) & 1); /* round to nearest even, as torch does */
    return (uint16_t)(bits >> 16);
}

/* A dot product in DOT_LANES running sums, added up pairwise at the end: a fixed order (the result does
 * not depend on the CPU), which the compiler turns into vector FMAs without -ffast-math. One running sum,
 * as in `dot += a[d] * b[d]`, must add in the written order: a chain of scalar FMAs, each waiting for the
 * last, which made attention the larger part of a step of 16 sequences. */
#define DOT_LANES 16
static inline float dot_product(const float *a, const float *b, int64_t n) {
    float lanes[DOT_LANES] = {0};
    int64_t d = 0;
    for (; d + DOT_LANES <= n; d += DOT_LANES)
        for (int j = 0; j < DOT_LANES; j++) lanes[j] += a[d + j] * b[d + j];
    for (int j = 0; d < n; d++, j++) lanes[j] += a[d] * b[d];
    for (int width = DOT_LANES / 2; width > 0; width /= 2)
        for (int j = 0; j < width; j++) lanes[j] += lanes[j + width];
    return lanes[0];
}

#define MAX_HEAD_DIM 256
#define MAX_GROUP 16

/* One (sequence, KV head) pair: its `group` query heads share every K/V row read. */
#define DEFINE_KERNEL(NAME, T, LOAD, STORE)                                                              \
    int NAME(const T *q, const T *k_cache, const T *v_cache, const int64_t *block_tables,               \
             const int64_t *context_lens, T *out, int64_t num_seqs, int64_t num_heads,                  \
             int64_t num_kv_heads, int64_t head_dim, int64_t num_slots, int64_t max_blocks,             \
             int64_t block_size, int64_t window, float scale) {                                          \
        const int64_t group = num_heads / num_kv_heads;                                                  \
        if (head_dim > MAX_HEAD_DIM || group > MAX_GROUP) return 1;                                     \
        int failed = 0;                                                                                  \
        _Pragma("omp parallel for schedule(dynamic, 1)")                                                 \
        for (int64_t job = 0; job < num_seqs * num_kv_heads; job++) {                                    \
            const int64_t seq = job / num_kv_heads, kvh = job % num_kv_heads;                            \
            const int64_t first = window > 0 && context_lens[seq] > window ? context_lens[seq] - window : 0; \
            const int64_t len = context_lens[seq] - first;                                               \
            const int64_t *table = block_tables + seq * max_blocks;                                      \
            float *scores = malloc(sizeof(float) * (size_t)(len * group));                               \
            if (scores == NULL) { failed = 1; continue; }                                                \
            float query[MAX_GROUP][MAX_HEAD_DIM], acc[MAX_GROUP][MAX_HEAD_DIM];                          \
            float max_score[MAX_GROUP], total[MAX_GROUP];                                                \
            for (int64_t g = 0; g < group; g++) {                                                        \
                const T *src = q + (seq * num_heads + kvh * group + g) * head_dim;                       \
                for (int64_t d = 0; d < head_dim; d++) query[g][d] = LOAD(src[d]) * scale;               \
                max_score[g] = -INFINITY;                                                                \
                total[g] = 0.0f;                                                                         \
                memset(acc[g], 0, sizeof(float) * (size_t)head_dim);                                     \
            }                                                                                            \
            const T *keys = k_cache + kvh * num_slots * head_dim;                                        \
            const T *values = v_cache + kvh * num_slots * head_dim;                                      \
            for (int64_t pos = 0; pos < len; pos++) {                                                    \
                const int64_t at = first + pos;                                                          \
                const T *key = keys + (table[at / block_size] * block_size + at % block_size) * head_dim; \
                float row[MAX_HEAD_DIM];                                                                 \
                for (int64_t d = 0; d < head_dim; d++) row[d] = LOAD(key[d]);                           \
                for (int64_t g = 0; g < group; g++) {                                                    \
                    const float dot = dot_product(query[g], row, head_dim);                              \
                    scores[g * len + pos] = dot;                                                         \
                    if (dot > max_score[g]) max_score[g] = dot;                                          \
                }                                                                                        \
            }                                                                                            \
            for (int64_t g = 0; g < group; g++) {                                                        \
                for (int64_t pos = 0; pos < len; pos++) {                                                \
                    float p = expf(scores[g * len + pos] - max_score[g]);                                \
                    scores[g * len + pos] = p;                                                           \
                    total[g] += p;                                                                       \
                }                                                                                        \
            }                                                                                            \
            for (int64_t pos = 0; pos < len; pos++) {                                                    \
                const int64_t at = first + pos;                                                          \
                const T *value = values + (table[at / block_size] * block_size + at % block_size) * head_dim; \
                float row[MAX_HEAD_DIM];                                                                 \
                for (int64_t d = 0; d < head_dim; d++) row[d] = LOAD(value[d]);                         \
                for (int64_t g = 0; g < group; g++) {                                                    \
                    const float p = scores[g * len + pos];                                               \
                    for (int64_t d = 0; d < head_dim; d++) acc[g][d] += p * row[d];                      \
                }                                                                                        \
            }                                                                                            \
            for (int64_t g = 0; g < group; g++) {                                                        \
                T *dst = out + (seq * num_heads + kvh * group + g) * head_dim;                           \
                const float inv = 1.0f / total[g];                                                       \
                for (int64_t d = 0; d < head_dim; d++) dst[d] = STORE(acc[g][d] * inv);                  \
            }                                                                                            \
            free(scores);                                                                                \
        }                                                                                                \
        return failed ? 2 : 0;                                                                           \
    }

#define LOAD_F32(x) (x)
#define STORE_F32(x) (x)
DEFINE_KERNEL(paged_decode_f32, float, LOAD_F32, STORE_F32)
DEFINE_KERNEL(paged_decode_bf16, uint16_t, bf16_to_float, float_to_bf16)
