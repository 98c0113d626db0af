// One token per row of logits, for the CPU (engine/sampler.py): additive adjustments (logit bias, presence
// and frequency penalties), then temperature, top-k, softmax, top-p and min-p in transformers' order, and a
// draw by inverse CDF in token order with the row's own uniform; or the largest logit, for greedy rows. The
// logits are read as the model's head wrote them (bfloat16 or float32), a row at a time, so no float32 copy
// of the whole step's logits is made.
// The sampler's torch path builds each truncated distribution as a [rows, vocabulary] tensor, masks it and
// sums it again to draw, ten or so passes over every row; here a row takes four or five, and the top-k and
// top-p cut-offs come from histograms of the values' bits rather than from sorting the row, taken over its
// largest values alone where those decide the cut-off (the same cut-off, found on a fraction of the row).

#include <math.h>
#include <stdint.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <stdlib.h>
#include <string.h>

// glibc declares its vector expf (libmvec) only under -ffast-math; declared here, the loops stay vectorised.
#if defined(__x86_64__) && defined(__GLIBC__) && !defined(__clang__)
float expf(float) __attribute__((simd("notinbranch")));
#endif

#define RADIX_BITS 11
#define BUCKETS (1 << RADIX_BITS)
#define DRAW_BLOCK 256  // tokens whose kept mass is summed together before the draw walks them one by one

// Order-preserving map of a float to an unsigned key: the larger float has the larger key.
static inline uint32_t key_of(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

static inline float value_of(uint32_t key) {
    uint32_t bits = (key & 0x80000000u) ? (key & 0x7fffffffu) : ~key;
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

// Radix selection of the k-th largest key of keys[0, count) (1 <= k <= count), RADIX_BITS at a time, each
// pass keeping only the candidates in the bucket that holds it; keys are overwritten.
static uint32_t kth_largest_key(uint32_t *keys, int64_t count, int64_t k) {
    for (int shift = 32; shift > 0;) {
        const int bits = shift < RADIX_BITS ? shift : RADIX_BITS;
        shift -= bits;
        const uint32_t mask = (1u << bits) - 1;
        int64_t histogram[BUCKETS] = {0};
        for (int64_t i = 0; i < count; i++) histogram[(keys[i] >> shift) & mask]++;
        uint32_t bucket = mask;
        while (histogram[bucket] < k) k -= histogram[bucket--];
        int64_t kept = 0;
        for (int64_t i = 0; i < count; i++)
            if (((keys[i] >> shift) & mask) == bucket) keys[kept++] = keys[i];
        count = kept;
    }
    return keys[0];
}

// The keys of values[0, n) at or above `probe`'s, in order, into keys; returns how many.
static int64_t keys_from(const float *values, int64_t n, uint32_t probe, uint32_t *keys) {
    int64_t count = 0, i = 0;
#if defined(__AVX512F__)  // key_of on 16 lanes: the sign bit set flips every bit, else only the sign bit
    for (; i + 16 <= n; i += 16) {
        const __m512i bits = _mm512_loadu_si512(values + i);
        const __m512i flip = _mm512_or_si512(_mm512_srai_epi32(bits, 31), _mm512_set1_epi32((int32_t)0x80000000u));
        const __m512i key = _mm512_xor_si512(bits, flip);
        const __mmask16 kept = _mm512_cmpge_epu32_mask(key, _mm512_set1_epi32((int32_t)probe));
        _mm512_storeu_si512(keys + count, _mm512_maskz_compress_epi32(kept, key));
        count += __builtin_popcount(kept);
    }
#endif
    for (; i < n; i++) {  // branchless: keys[count] is overwritten until a key is kept
        keys[count] = key_of(values[i]);
        count += keys[count] >= probe;
    }
    return count;
}

// The k-th largest of values[0, n) (1 <= k <= n), whose largest is `top`. keys: n scratch slots. A row's
// k largest (top-k asks for tens of a vocabulary) usually lie within a few of its largest: the keys from
// top - span up are selected from, for the first span in PROBE_SPANS with k of them (the same k-th
// largest, from hundreds of keys where the next span would often give thousands); else all are.
static const float PROBE_SPANS[] = {5.0f, 10.0f, INFINITY};
static float kth_largest(const float *values, int64_t n, int64_t k, float top, uint32_t *keys) {
    int64_t count = 0;
    for (size_t p = 0; p < sizeof PROBE_SPANS / sizeof *PROBE_SPANS && count < k; p++)
        count = keys_from(values, n, isinf(PROBE_SPANS[p]) ? 0 : key_of(top - PROBE_SPANS[p]), keys);
    return value_of(kth_largest_key(keys, count, k));
}

static int descending(const void *a, const void *b) {
    const float x = *(const float *)a, y = *(const float *)b;
    return (x < y) - (x > y);
}

// The least weight top-p keeps among weights[0, n), of which `pool` are the candidates (all of them, or
// all those in the top buckets): weights sorted largest first, a weight is kept while the mass before it is
// below `target` (at least the largest is). Buckets of the weights' keys, each with its count and mass, are
// walked from the top; only the bucket where the mass crosses the target is sorted, in scratch. Returns
// -1 when the candidates' mass does not reach the target.
static float nucleus_among(const float *pool, int64_t n, double target, float *scratch) {
    int64_t counts[BUCKETS] = {0};  // on the stack: thread-local arrays in a shared library cost a
    double masses[BUCKETS] = {0};    // __tls_get_addr call per access (15% of a top-p row, measured)
    const int shift = 32 - RADIX_BITS;
    for (int64_t i = 0; i < n; i++) {
        const uint32_t bucket = key_of(pool[i]) >> shift;
        counts[bucket]++;
        masses[bucket] += pool[i];
    }
    double before = 0.0;
    for (int bucket = BUCKETS - 1; bucket >= 0; bucket--) {
        if (!counts[bucket]) continue;
        if (before + masses[bucket] < target) {  // every weight of the bucket is kept: on to the next
            before += masses[bucket];
            continue;
        }
        int64_t m = 0;
        for (int64_t i = 0; i < n; i++)
            if (key_of(pool[i]) >> shift == (uint32_t)bucket) scratch[m++] = pool[i];
        qsort(scratch, (size_t)m, sizeof *scratch, descending);
        float least = scratch[0];
        for (int64_t j = 0; j < m && before < target; j++) {
            least = scratch[j];
            before += scratch[j];
        }
        return least;
    }
    return -1.0f;
}

// The least weight top-p keeps (the largest weight is 1). Most of a row's mass is usually in its weights
// of the first of NUCLEUS_PROBES and up, else of the second (powers of two, so bucket boundaries): the
// buckets above a probe are counted alone first, in the same order, so they hold the same counts and
// masses as over the whole row, and the walk crosses the target in the same bucket, giving the same floor.
// scratch: n floats.
static const float NUCLEUS_PROBES[] = {0x1p-10f, 0x1p-16f};
static float nucleus_floor(const float *weights, int64_t n, double target, float *scratch) {
    for (size_t p = 0; p < sizeof NUCLEUS_PROBES / sizeof *NUCLEUS_PROBES; p++) {
        const float probe = NUCLEUS_PROBES[p];
        int64_t count = 0, i = 0;
#if defined(__AVX512F__)  // 16 at a time, packed into the front of a vector
        for (; i + 16 <= n && count <= n / 2; i += 16) {
            const __m512 w = _mm512_loadu_ps(weights + i);
            const __mmask16 kept = _mm512_cmp_ps_mask(w, _mm512_set1_ps(probe), _CMP_GE_OQ);
            _mm512_storeu_ps(scratch + count, _mm512_maskz_compress_ps(kept, w));
            count += __builtin_popcount(kept);
        }
#endif
        for (; i < n && count <= n / 2; i++) {
            scratch[count] = weights[i];
            count += weights[i] >= probe;
        }
        if (count > n / 2) break;  // no room after the candidates for nucleus_among's scratch
        const float least = nucleus_among(scratch, count, target, scratch + count);
        if (least >= 0.0f) return least;
    }
    const float least = nucleus_among(weights, n, target, scratch);
    return least >= 0.0f ? least : 0.0f;  // the whole mass below the target (rounding): every weight stays
}

// One row: x [n] logits, returns the token. work: n floats and n uint32 of scratch.
static int64_t sample_row(const float *x, int64_t n, float temperature, int64_t top_k, float top_p, float min_p,
                          float uniform, float *weights, uint32_t *keys) {
    const float inverse = 1.0f / temperature;
    float top = -INFINITY;  // the largest scaled logit, NaNs ignored
    int64_t i = 0;
#if defined(__AVX512F__)  // GCC leaves this loop scalar: a chain of dependent maxima, one per token
    __m512 tops = _mm512_set1_ps(-INFINITY);
    for (; i + 16 <= n; i += 16) {
        const __m512 w = _mm512_mul_ps(_mm512_loadu_ps(x + i), _mm512_set1_ps(inverse));
        _mm512_storeu_ps(weights + i, w);
        tops = _mm512_max_ps(w, tops);  // a NaN in w gives the second operand
    }
    top = _mm512_reduce_max_ps(tops);
#endif
    for (; i < n; i++) {
        weights[i] = x[i] * inverse;
        top = weights[i] > top ? weights[i] : top;
    }
    float cut = -INFINITY;  // logits below it are dropped (top-k); ties with the k-th largest stay
    if (top_k > 0 && top_k < n) cut = kth_largest(weights, n, top_k, top, keys);
    double total = 0.0;
    for (int64_t i = 0; i < n; i++) {
        const float w = weights[i] >= cut ? expf(weights[i] - top) : 0.0f;
        weights[i] = w;
        total += w;
    }
    if (!(total > 0.0) || !isfinite(top)) {  // NaN or all -inf: the first token of the highest logit
        int64_t best = 0;
        for (int64_t i = 1; i < n; i++)
            if (x[i] > x[best]) best = i;
        return best;
    }
    float least = 0.0f;  // weights below it are dropped (top-p, min-p)
    if (top_p < 1.0f) least = nucleus_floor(weights, n, (double)top_p * total, (float *)keys);
    // min-p: relative to the most likely token, whose weight is exp(0) = 1.
    if (min_p > least) least = min_p;
    // Kept: a positive weight, not below the floor. Zeroing the rest keeps the draw's loops simple.
    for (int64_t i = 0; i < n; i++) weights[i] = weights[i] >= least ? weights[i] : 0.0f;
    // Inverse CDF in token order: block sums first, then one block walked token by token.
    float sums[(n + DRAW_BLOCK - 1) / DRAW_BLOCK];
    double kept = 0.0;
    for (int64_t b = 0; b * DRAW_BLOCK < n; b++) {
        const int64_t end = (b + 1) * DRAW_BLOCK < n ? (b + 1) * DRAW_BLOCK : n;
        float sum = 0.0f;
        for (int64_t i = b * DRAW_BLOCK; i < end; i++) sum += weights[i];
        sums[b] = sum;
        kept += sum;
    }
    const double goal = (double)uniform * kept;
    double cumulative = 0.0;
    int64_t last = -1;
    for (int64_t b = 0; b * DRAW_BLOCK < n; b++) {
        if (sums[b] <= 0.0f) continue;
        const int64_t end = (b + 1) * DRAW_BLOCK < n ? (b + 1) * DRAW_BLOCK : n;
        if (cumulative + sums[b] <= goal) {
            cumulative += sums[b];
            for (int64_t i = end - 1; i >= b * DRAW_BLOCK; i--)
                if (weights[i] > 0.0f) {
                    last = i;
                    break;
                }
            continue;
        }
        for (int64_t i = b * DRAW_BLOCK; i < end; i++) {
            if (weights[i] <= 0.0f) continue;
            cumulative += weights[i];
            last = i;
            if (cumulative > goal) return i;
        }
    }
    return last;  // u * total rounded up to the total: the last token with mass
}

// The first largest of x[0, n), or the first NaN, as torch's argmax: greedy rows.
static int64_t argmax_of(const float *x, int64_t n) {
    float top = -INFINITY;
    int unordered = 0;
    int64_t i = 0;
#if defined(__AVX512F__)
    __m512 tops = _mm512_set1_ps(-INFINITY);
    __mmask16 nans = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512 v = _mm512_loadu_ps(x + i);
        nans |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        tops = _mm512_max_ps(v, tops);
    }
    top = _mm512_reduce_max_ps(tops);
    unordered = nans != 0;
#endif
    for (; i < n; i++) {
        unordered |= isnan(x[i]);
        top = x[i] > top ? x[i] : top;
    }
    for (i = 0; i < n; i++)
        if (unordered ? isnan(x[i]) : x[i] == top) return i;
    return 0;
}

// A row's logits as float32 in `values`: widened from bfloat16 (exact) or copied, then its additive
// adjustments (logit bias, presence and frequency penalties) applied in their order.
static void adjusted_row(const void *logits, int bf16, int64_t n, const int64_t *tokens, const float *deltas,
                         int64_t count, float *values) {
    if (bf16) {
        const uint16_t *x = logits;
        for (int64_t i = 0; i < n; i++) {
            const uint32_t bits = (uint32_t)x[i] << 16;
            memcpy(values + i, &bits, sizeof bits);
        }
    } else {
        memcpy(values, logits, sizeof(float) * (size_t)n);
    }
    for (int64_t j = 0; j < count; j++)
        if (tokens[j] >= 0 && tokens[j] < n) values[tokens[j]] += deltas[j];  // never outside the row
}

// logits: bfloat16 (bf16 = 1) or float32, rows ld elements apart (the first n columns are the
// vocabulary), of which rows row_ids[0, rows) are sampled, each with its settings and uniform in [0, 1);
// a temperature of 0 takes the largest logit (greedy). Row r's adjustments are tokens and deltas
// [adjust_start[r], adjust_start[r + 1]) (adjust_start NULL: none); the caller's logits are not written.
// tokens: out. Rows are independent (a seeded row draws the same in any batch) and split over the
// threads. Returns 0, or 3 out of memory.
int sample_rows(const void *logits, int bf16, int64_t ld, const int64_t *row_ids, int64_t rows, int64_t n,
                const int64_t *adjust_start, const int64_t *adjust_tokens, const float *adjust_deltas,
                const float *temperature, const int64_t *top_k, const float *top_p, const float *min_p,
                const float *uniforms, int64_t *tokens, int num_threads) {
    const size_t element = bf16 ? sizeof(uint16_t) : sizeof(float);
    int failed = 0;
#pragma omp parallel num_threads(num_threads)
    {
        float *weights = malloc(sizeof(float) * (size_t)n), *values = malloc(sizeof(float) * (size_t)n);
        uint32_t *keys = malloc(sizeof(uint32_t) * (size_t)n);
        if (!weights || !values || !keys) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t r = 0; r < rows; r++) {
            if (!weights || !values || !keys) continue;
            const char *source = (const char *)logits + (size_t)(row_ids[r] * ld) * element;
            const int64_t begin = adjust_start ? adjust_start[r] : 0, end = adjust_start ? adjust_start[r + 1] : 0;
            const float *x = (const float *)source;
            if (bf16 || end > begin) {
                adjusted_row(source, bf16, n, adjust_tokens + begin, adjust_deltas + begin, end - begin, values);
                x = values;
            }
            tokens[r] = temperature[r] > 0.0f ? sample_row(x, n, temperature[r], top_k[r], top_p[r], min_p[r],
                                                          uniforms[r], weights, keys)
                                              : argmax_of(x, n);
        }
        free(weights);
        free(values);
        free(keys);
    }
    return failed ? 3 : 0;
}
