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
 * Scores and the softmax are float32, as in the torch backend. bfloat16 caches on CPUs with BF16 dot
 * products (AVX-512 BF16, AMX) go through tiles instead (paged_tiles.c), with rows of a prompt chunk
 * sharing each read of their context.
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
#define PREFETCH_ROWS 32 /* 4 KB of keys and as much of values (a head_dim of 64 in bfloat16) */
#define MAX_GROUP 16

/* Walks a sequence's context without a division per position (an integer division per cached row was a
 * large part of the kernel's time): cursor_slot is the cache slot of the current position, cursor_run how
 * many slots from it on are consecutive in the cache (the rest of its block). */
typedef struct {
    const int64_t *table;
    int64_t block_size, block, offset;
} Cursor;

static inline Cursor cursor_at(const int64_t *table, int64_t block_size, int64_t at) {
    Cursor c = {table, block_size, at / block_size, at % block_size};
    return c;
}
static inline int64_t cursor_slot(const Cursor *c) { return c->table[c->block] * c->block_size + c->offset; }
static inline int64_t cursor_run(const Cursor *c) { return c->block_size - c->offset; }
static inline void cursor_advance(Cursor *c, int64_t n) {
    c->offset += n;
    c->block += c->offset / c->block_size;
    c->offset %= c->block_size;
}
static inline void cursor_next(Cursor *c) {
    if (++c->offset == c->block_size) {
        c->offset = 0;
        c->block++;
    }
}
/* Asks for the cache lines of the `n` rows from the cursor's slot (one block's run at most), so the next
 * run's rows arrive while this one is computed: the blocks of a sequence lie anywhere in the cache, where
 * the hardware prefetcher does not follow. */
static inline void prefetch_rows(const Cursor *c, const void *base, int64_t n, int64_t row_bytes) {
    const char *from = (const char *)base + cursor_slot(c) * row_bytes;
    for (int64_t byte = 0; byte < n * row_bytes; byte += 64) __builtin_prefetch(from + byte);
}

/* 1 if step row i is the token after row i - 1 of the same sequence (one position on, the same blocks). */
static int continues_run(const int64_t *block_tables, const int64_t *context_lens, int64_t i,
                         int64_t max_blocks, int64_t block_size) {
    const int64_t before = context_lens[i - 1];
    return context_lens[i] == before + 1
           && !memcmp(block_tables + i * max_blocks, block_tables + (i - 1) * max_blocks,
                      sizeof(int64_t) * (size_t)((before + block_size - 1) / block_size));
}

/* ---- AVX-512: the two loops that read the cache, 16 floats at a time -------------------------------------
 * The portable loops below take a K row per position and reduce each head's 16-lane dot product to a
 * scalar on the spot; on a step of 64 sequences that ran at ~4 GB/s of cache read, far from memory speed.
 * Here scores come 16 positions at a time: each position's dot products stay in a vector until 16 of them
 * are summed across lanes together (sum16), and the value pass keeps each head's running sums in registers,
 * one 16-float slice of the head dimension at a time. Both sum in a fixed order. */
#if defined(__AVX512F__)
#include <immintrin.h>
#define LANES 16

static inline __m512 load16_f32(const float *p) { return _mm512_loadu_ps(p); }
static inline __m512 load16_bf16(const uint16_t *p) {
    __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

/* Lane j of the result = the sum of v[j]'s 16 lanes. */
static inline __m512 sum16(const __m512 v[LANES]) {
    __m512 pairs[8], quads[4];
    for (int i = 0; i < 8; i++)  /* per 128-bit lane: halves of v[2i] and v[2i+1], interleaved */
        pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                                 _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) {  /* per 128-bit lane: one partial sum of each of v[4i..4i+3] */
        __m512d a = _mm512_castps_pd(pairs[2 * i]), b = _mm512_castps_pd(pairs[2 * i + 1]);
        quads[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                                 _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    /* quads[i]'s four 128-bit lanes hold four partial sums of v[4i..4i+3]: add them across lanes. */
    __m512 low = _mm512_add_ps(_mm512_shuffle_f32x4(quads[0], quads[1], 0x44),
                               _mm512_shuffle_f32x4(quads[0], quads[1], 0xEE));
    __m512 high = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2], quads[3], 0x44),
                                _mm512_shuffle_f32x4(quads[2], quads[3], 0xEE));
    return _mm512_add_ps(_mm512_shuffle_f32x4(low, high, 0x88), _mm512_shuffle_f32x4(low, high, 0xDD));
}

#define DEFINE_VECTOR_PASSES(SUFFIX, T, LOAD16)                                                          \
    /* scores[g * len + pos] = query[g] . K[first + pos]; returns each head's maximum in max_score. */  \
    static void score_pass_##SUFFIX(const float query[][MAX_HEAD_DIM], int64_t group, const T *keys,    \
                                    const int64_t *table, int64_t block_size, int64_t first, int64_t len, \
                                    int64_t head_dim, float *scores, float *max_score) {                \
        float tile[LANES][MAX_HEAD_DIM] __attribute__((aligned(64)));                                    \
        __m512 best[MAX_GROUP];                                                                          \
        for (int64_t g = 0; g < group; g++) best[g] = _mm512_set1_ps(-INFINITY);                        \
        Cursor at = cursor_at(table, block_size, first), ahead = at;                                     \
        cursor_advance(&ahead, LANES < len ? LANES : len);                                               \
        for (int64_t pos = 0; pos < len; pos += LANES) {                                                 \
            const int64_t n = len - pos < LANES ? len - pos : LANES;                                     \
            for (int64_t j = 0; j < LANES; j++) {                                                        \
                if (j < n) {                                                                             \
                    const T *key = keys + cursor_slot(&at) * head_dim;                                   \
                    for (int64_t d = 0; d < head_dim; d += LANES)                                        \
                        _mm512_store_ps(tile[j] + d, LOAD16(key + d));                                   \
                    cursor_next(&at);                                                                    \
                    if (pos + LANES + j < len) { /* the next tile's row j */                             \
                        prefetch_rows(&ahead, keys, 1, head_dim * (int64_t)sizeof(T));                   \
                        cursor_next(&ahead);                                                             \
                    }                                                                                    \
                } else {                                                                                 \
                    memset(tile[j], 0, sizeof(float) * (size_t)head_dim);                                \
                }                                                                                        \
            }                                                                                            \
            const __mmask16 valid = (__mmask16)((1u << n) - 1);                                          \
            for (int64_t g = 0; g < group; g++) {                                                        \
                __m512 acc[LANES];                                                                       \
                for (int j = 0; j < LANES; j++) acc[j] = _mm512_setzero_ps();                            \
                for (int64_t d = 0; d < head_dim; d += LANES) {                                          \
                    const __m512 qv = _mm512_loadu_ps(query[g] + d);                                     \
                    for (int j = 0; j < LANES; j++)                                                      \
                        acc[j] = _mm512_fmadd_ps(qv, _mm512_load_ps(tile[j] + d), acc[j]);               \
                }                                                                                        \
                const __m512 dots = sum16(acc);                                                          \
                _mm512_mask_storeu_ps(scores + g * len + pos, valid, dots);                              \
                best[g] = _mm512_mask_max_ps(best[g], valid, best[g], dots);                             \
            }                                                                                            \
        }                                                                                                \
        for (int64_t g = 0; g < group; g++) max_score[g] = _mm512_reduce_max_ps(best[g]);               \
    }                                                                                                    \
    /* acc[g] = sum over pos of weights[g * len + pos] * V[first + pos], 16 floats of the head at a time, \
     * for a group of G heads (a constant after inlining: the sums stay in registers). */                \
    static inline __attribute__((always_inline)) void value_pass_##SUFFIX##_g(                           \
        const float *weights, const T *values, const int64_t *table, int64_t block_size, int64_t first,  \
        int64_t len, int64_t head_dim, float acc[][MAX_HEAD_DIM], const int G, int prefetch) {           \
        /* A block's rows are consecutive in the cache: each is read whole while it is in L1. Unless the \
         * score pass asked for them (`prefetch` 0), the next block's are asked for meanwhile. */         \
        Cursor at = cursor_at(table, block_size, first);                                                 \
        for (int64_t pos = 0; pos < len;) {                                                              \
            const int64_t run = cursor_run(&at) < len - pos ? cursor_run(&at) : len - pos;               \
            const T *rows = values + cursor_slot(&at) * head_dim;                                        \
            if (prefetch && pos + run < len) {                                                           \
                Cursor next = at;                                                                        \
                cursor_advance(&next, run);                                                              \
                const int64_t rest = len - pos - run;                                                    \
                prefetch_rows(&next, values, cursor_run(&next) < rest ? cursor_run(&next) : rest,        \
                              head_dim * (int64_t)sizeof(T));                                            \
            }                                                                                            \
            for (int64_t d = 0; d < head_dim; d += LANES) {                                              \
                __m512 sums[MAX_GROUP];                                                                  \
                for (int g = 0; g < G; g++) sums[g] = _mm512_loadu_ps(acc[g] + d);                       \
                for (int64_t r = 0; r < run; r++) {                                                      \
                    const __m512 v = LOAD16(rows + r * head_dim + d);                                    \
                    for (int g = 0; g < G; g++)                                                          \
                        sums[g] = _mm512_fmadd_ps(_mm512_set1_ps(weights[g * len + pos + r]), v, sums[g]); \
                }                                                                                        \
                for (int g = 0; g < G; g++) _mm512_storeu_ps(acc[g] + d, sums[g]);                       \
            }                                                                                            \
            pos += run;                                                                                  \
            cursor_advance(&at, run);                                                                    \
        }                                                                                                \
    }                                                                                                    \
    static void value_pass_##SUFFIX(const float *weights, int64_t group, const T *values,               \
                                    const int64_t *table, int64_t block_size, int64_t first, int64_t len, \
                                    int64_t head_dim, float acc[][MAX_HEAD_DIM], int prefetch) {        \
        switch (group) { /* the group sizes models use; more heads a pass would spill the sums */       \
            case 1: value_pass_##SUFFIX##_g(weights, values, table, block_size, first, len, head_dim, acc, 1, prefetch); break; \
            case 2: value_pass_##SUFFIX##_g(weights, values, table, block_size, first, len, head_dim, acc, 2, prefetch); break; \
            case 3: value_pass_##SUFFIX##_g(weights, values, table, block_size, first, len, head_dim, acc, 3, prefetch); break; \
            case 4: value_pass_##SUFFIX##_g(weights, values, table, block_size, first, len, head_dim, acc, 4, prefetch); break; \
            case 5: value_pass_##SUFFIX##_g(weights, values, table, block_size, first, len, head_dim, acc, 5, prefetch); break; \
            case 6: value_pass_##SUFFIX##_g(weights, values, table, block_size, first, len, head_dim, acc, 6, prefetch); break; \
            case 7: value_pass_##SUFFIX##_g(weights, values, table, block_size, first, len, head_dim, acc, 7, prefetch); break; \
            default:                                                                                     \
                for (int64_t g = 0; g < group; g += 8) {                                                 \
                    const int64_t rest = group - g < 8 ? group - g : 8;                                  \
                    if (rest == 8)                                                                       \
                        value_pass_##SUFFIX##_g(weights + g * len, values, table, block_size, first, len, \
                                                head_dim, acc + g, 8, prefetch);                         \
                    else                                                                                 \
                        value_pass_##SUFFIX(weights + g * len, rest, values, table, block_size, first,   \
                                            len, head_dim, acc + g, prefetch);                           \
                }                                                                                        \
        }                                                                                                \
    }

DEFINE_VECTOR_PASSES(f32, float, load16_f32)
DEFINE_VECTOR_PASSES(bf16, uint16_t, load16_bf16)

#if defined(__AVX512BF16__)
/* bfloat16 keys dotted with the bfloat16 query as they are, two dimensions per BF16 dot product: no key is
 * widened to float32 and stored first, so a cached row costs a third of the instructions, which is what
 * bounds the pass when the keys are in cache (prompt tokens, each a query over the rows before it). The
 * products are exact and sum in float32; the scale multiplies the sum (the float32 pass scales the query). */
static void score_pass_bf16_dot(const uint16_t *query, int64_t group, const uint16_t *keys, const uint16_t *values,
                                int cold, const int64_t *table, int64_t block_size, int64_t first, int64_t len,
                                int64_t head_dim, float scale, float *scores, float *max_score) {
    static const uint16_t zeros[MAX_HEAD_DIM] __attribute__((aligned(64)));
    const __m512 scale16 = _mm512_set1_ps(scale);
    const int64_t row_bytes = head_dim * (int64_t)sizeof(uint16_t);
    __m512 best[MAX_GROUP];
    for (int64_t g = 0; g < group; g++) best[g] = _mm512_set1_ps(-INFINITY);
    /* A context read from memory (cold) is asked for PREFETCH_ROWS rows ahead, its values with its keys,
     * so the value pass finds them in cache; one that the row before just read is in cache already, and
     * asking again would only take load slots. */
    Cursor at = cursor_at(table, block_size, first), ahead = at;
    for (int64_t i = 0; cold && i < (PREFETCH_ROWS < len ? PREFETCH_ROWS : len); i++, cursor_next(&ahead)) {
        prefetch_rows(&ahead, keys, 1, row_bytes);
        prefetch_rows(&ahead, values, 1, row_bytes);
    }
    for (int64_t pos = 0; pos < len; pos += LANES) {
        const int64_t n = len - pos < LANES ? len - pos : LANES;
        const uint16_t *rows[LANES];
        for (int64_t j = 0; j < LANES; j++) {
            if (j < n) {
                rows[j] = keys + cursor_slot(&at) * head_dim;
                cursor_next(&at);
                if (cold && pos + PREFETCH_ROWS + j < len) {
                    prefetch_rows(&ahead, keys, 1, row_bytes);
                    prefetch_rows(&ahead, values, 1, row_bytes);
                    cursor_next(&ahead);
                }
            } else {
                rows[j] = zeros; /* past the context: a zero row, so every tile is a full one */
            }
        }
        const __mmask16 valid = (__mmask16)((1u << n) - 1);
        for (int64_t g = 0; g < group; g++) {
            __m512 acc[LANES];
            for (int j = 0; j < LANES; j++) acc[j] = _mm512_setzero_ps();
            for (int64_t d = 0; d < head_dim; d += 32) {
                const __m512bh qv = (__m512bh)_mm512_loadu_si512((const void *)(query + g * head_dim + d));
                for (int j = 0; j < LANES; j++)
                    acc[j] = _mm512_dpbf16_ps(acc[j], qv, (__m512bh)_mm512_loadu_si512((const void *)(rows[j] + d)));
            }
            const __m512 dots = _mm512_mul_ps(sum16(acc), scale16);
            _mm512_mask_storeu_ps(scores + g * len + pos, valid, dots);
            best[g] = _mm512_mask_max_ps(best[g], valid, best[g], dots);
        }
    }
    for (int64_t g = 0; g < group; g++) max_score[g] = _mm512_reduce_max_ps(best[g]);
}
#define DOT_SCORES_bf16(...) (head_dim % 32 == 0 ? (score_pass_bf16_dot(__VA_ARGS__), 1) : 0)
#endif
#define VECTOR_SCORES(SUFFIX, ...) (head_dim % LANES == 0 ? (score_pass_##SUFFIX(__VA_ARGS__), 1) : 0)
#define VECTOR_VALUES(SUFFIX, ...) (head_dim % LANES == 0 ? (value_pass_##SUFFIX(__VA_ARGS__), 1) : 0)
#else
#define VECTOR_SCORES(SUFFIX, ...) 0
#define VECTOR_VALUES(SUFFIX, ...) 0
#endif
/* No BF16 dot products: the vector or portable pass computes the scores (and `cold` goes unused). */
#define NO_DOT_SCORES(QUERY, GROUP, KEYS, VALUES, COLD, ...) ((void)(COLD), 0)
#if !defined(DOT_SCORES_bf16)
#define DOT_SCORES_bf16 NO_DOT_SCORES
#endif
#define DOT_SCORES_f32 NO_DOT_SCORES

/* One (sequence, KV head) pair: its `group` query heads share every K/V row read. */
#define DEFINE_KERNEL(NAME, SUFFIX, T, LOAD, STORE)                                                      \
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
            float query[MAX_GROUP][MAX_HEAD_DIM] __attribute__((aligned(64)));                           \
            float acc[MAX_GROUP][MAX_HEAD_DIM] __attribute__((aligned(64)));                             \
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
            /* A prompt token's row follows its predecessor's (one position on, the same table): their   \
             * context is in cache. */                                                                   \
            const int cold = !(seq > 0 && continues_run(block_tables, context_lens, seq, max_blocks, block_size)); \
            /* The BF16 pass asks for a cold context's values with its keys (a warm one is in cache). */ \
            const int dotted = DOT_SCORES_##SUFFIX(q + (seq * num_heads + kvh * group) * head_dim, group, keys, \
                                                   values, cold, table, block_size, first, len, head_dim, \
                                                   scale, scores, max_score);                            \
            if (!dotted && !VECTOR_SCORES(SUFFIX, query, group, keys, table, block_size, first, len, head_dim,   \
                                  scores, max_score)) {                                                  \
                Cursor at = cursor_at(table, block_size, first);                                         \
                for (int64_t pos = 0; pos < len; pos++, cursor_next(&at)) {                              \
                    const T *key = keys + cursor_slot(&at) * head_dim;                                   \
                    float row[MAX_HEAD_DIM];                                                             \
                    for (int64_t d = 0; d < head_dim; d++) row[d] = LOAD(key[d]);                       \
                    for (int64_t g = 0; g < group; g++) {                                                \
                        const float dot = dot_product(query[g], row, head_dim);                          \
                        scores[g * len + pos] = dot;                                                     \
                        if (dot > max_score[g]) max_score[g] = dot;                                      \
                    }                                                                                    \
                }                                                                                        \
            }                                                                                            \
            for (int64_t g = 0; g < group; g++) {                                                        \
                for (int64_t pos = 0; pos < len; pos++) {                                                \
                    float p = expf(scores[g * len + pos] - max_score[g]);                                \
                    scores[g * len + pos] = p;                                                           \
                    total[g] += p;                                                                       \
                }                                                                                        \
            }                                                                                            \
            if (!VECTOR_VALUES(SUFFIX, scores, group, values, table, block_size, first, len, head_dim,   \
                               acc, !dotted)) {                                                          \
                Cursor at = cursor_at(table, block_size, first);                                         \
                for (int64_t pos = 0; pos < len; pos++, cursor_next(&at)) {                              \
                    const T *value = values + cursor_slot(&at) * head_dim;                               \
                    float row[MAX_HEAD_DIM];                                                             \
                    for (int64_t d = 0; d < head_dim; d++) row[d] = LOAD(value[d]);                     \
                    for (int64_t g = 0; g < group; g++) {                                                \
                        const float p = scores[g * len + pos];                                           \
                        for (int64_t d = 0; d < head_dim; d++) acc[g][d] += p * row[d];                  \
                    }                                                                                    \
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
DEFINE_KERNEL(paged_decode_f32, f32, float, LOAD_F32, STORE_F32)
DEFINE_KERNEL(paged_vectors_bf16, bf16, uint16_t, bf16_to_float, float_to_bf16)

#include "paged_tiles.c"

/* bfloat16: by tiles where the CPU has BF16 dot products and they take the shape (paged_tiles.c), else by
 * the vector kernel above. */
int paged_decode_bf16(const uint16_t *q, const uint16_t *k_cache, const uint16_t *v_cache,
                      const int64_t *block_tables, const int64_t *context_lens, uint16_t *out, int64_t num_seqs,
                      int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t num_slots,
                      int64_t max_blocks, int64_t block_size, int64_t window, float scale) {
#if defined(PAGED_TILES)
    if (tiles_take(head_dim, num_heads / num_kv_heads, block_size))
        return paged_tiles_bf16(q, k_cache, v_cache, block_tables, context_lens, out, num_seqs, num_heads,
                                num_kv_heads, head_dim, num_slots, max_blocks, block_size, window, scale);
#endif
    return paged_vectors_bf16(q, k_cache, v_cache, block_tables, context_lens, out, num_seqs, num_heads,
                              num_kv_heads, head_dim, num_slots, max_blocks, block_size, window, scale);
}
