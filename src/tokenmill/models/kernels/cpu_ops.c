// The operators a decode step spends its time in, for the CPU: few-row matrix products against bfloat16
// weights at memory speed, and residual add + RMSNorm and rotary embedding each fused into one call that
// replaces about ten torch ops. The fused ones take float32 or bfloat16 and round where torch rounds (after
// every op), so they give torch's values, not better ones.
//
// Matrix products: y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]), torch's Linear layout (w is [N, K],
// row-major). Each block of four weight rows is read from memory once and multiplied with every row of x
// while it sits in L1; products and sums are in float32 (AVX-512 BF16 dot products), each output rounded
// once to bfloat16. Threads split the weight rows with OpenMP: the library links the same libgomp.so.1
// torch has loaded, so both share one thread pool instead of spinning against each other.

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define ROWS_PER_BLOCK 4  // weight rows a tile reads together
#define X_PER_TILE 4      // rows of x a tile multiplies with them

static inline uint16_t to_bf16(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40);  // quiet NaN
    bits += 0x7fffu + ((bits >> 16) & 1u);  // round to nearest, ties to even
    return (uint16_t)(bits >> 16);
}

static inline float from_bf16(uint16_t value) {
    uint32_t bits = (uint32_t)value << 16;
    float out;
    memcpy(&out, &bits, sizeof out);
    return out;
}

// ---- few-row matrix products ------------------------------------------------------------------------

int skinny_gemm_supported(void) {
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
    return 1;
#else
    return 0;
#endif
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__)

// One tile: `nx` rows of x (at most X_PER_TILE) times `nw` weight rows (at most ROWS_PER_BLOCK). Inlined
// with constant nx and nw so the accumulators stay in registers.
static inline __attribute__((always_inline)) void tile_bf16(
    const uint16_t *x, int64_t ldx, const uint16_t *w, int64_t K, const uint16_t *bias, uint16_t *y,
    int64_t ldy, int nx, int nw
) {
    __m512 acc[X_PER_TILE][ROWS_PER_BLOCK];
    for (int i = 0; i < nx; i++)
        for (int j = 0; j < nw; j++) acc[i][j] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        __m512i wv[ROWS_PER_BLOCK];
        for (int j = 0; j < nw; j++) wv[j] = _mm512_loadu_si512((const void *)(w + j * K + k));
        for (int i = 0; i < nx; i++) {
            __m512i xv = _mm512_loadu_si512((const void *)(x + i * ldx + k));
            for (int j = 0; j < nw; j++)
                acc[i][j] = _mm512_dpbf16_ps(acc[i][j], (__m512bh)xv, (__m512bh)wv[j]);
        }
    }
    if (k < K) {  // the tail of a K that is not a multiple of 32: masked loads read zeros past the end
        __mmask32 mask = (__mmask32)((1u << (K - k)) - 1);
        __m512i wv[ROWS_PER_BLOCK];
        for (int j = 0; j < nw; j++) wv[j] = _mm512_maskz_loadu_epi16(mask, w + j * K + k);
        for (int i = 0; i < nx; i++) {
            __m512i xv = _mm512_maskz_loadu_epi16(mask, x + i * ldx + k);
            for (int j = 0; j < nw; j++)
                acc[i][j] = _mm512_dpbf16_ps(acc[i][j], (__m512bh)xv, (__m512bh)wv[j]);
        }
    }
    for (int i = 0; i < nx; i++)
        for (int j = 0; j < nw; j++) {
            float sum = _mm512_reduce_add_ps(acc[i][j]);
            if (bias) sum += from_bf16(bias[j]);
            y[i * ldy + j] = to_bf16(sum);
        }
}

#endif

// Returns 0, or 1 where the CPU lacks AVX-512 BF16 (callers check skinny_gemm_supported first).
int skinny_gemm_bf16(
    const uint16_t *x, int64_t ldx, const uint16_t *w, const uint16_t *bias, uint16_t *y, int64_t ldy,
    int64_t M, int64_t N, int64_t K, int num_threads
) {
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
    int64_t blocks = (N + ROWS_PER_BLOCK - 1) / ROWS_PER_BLOCK;
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t block = 0; block < blocks; block++) {
        int64_t n = block * ROWS_PER_BLOCK;
        const uint16_t *wb = w + n * K, *bb = bias ? bias + n : 0;
        for (int64_t m = 0; m < M; m += X_PER_TILE) {
            const uint16_t *xt = x + m * ldx;
            uint16_t *yt = y + m * ldy + n;
            if (n + ROWS_PER_BLOCK > N) {  // the last, partial block of weight rows: one row at a time
                for (int64_t r = 0; r < N - n; r++)
                    for (int64_t i = 0; i < X_PER_TILE && m + i < M; i++)
                        tile_bf16(xt + i * ldx, ldx, wb + r * K, K, bb ? bb + r : 0, yt + i * ldy + r, ldy, 1, 1);
                continue;
            }
            switch (M - m) {
                case 1: tile_bf16(xt, ldx, wb, K, bb, yt, ldy, 1, ROWS_PER_BLOCK); break;
                case 2: tile_bf16(xt, ldx, wb, K, bb, yt, ldy, 2, ROWS_PER_BLOCK); break;
                case 3: tile_bf16(xt, ldx, wb, K, bb, yt, ldy, 3, ROWS_PER_BLOCK); break;
                default: tile_bf16(xt, ldx, wb, K, bb, yt, ldy, 4, ROWS_PER_BLOCK); break;
            }
        }
    }
    return 0;
#else
    (void)x; (void)ldx; (void)w; (void)bias; (void)y; (void)ldy; (void)M; (void)N; (void)K; (void)num_threads;
    return 1;
#endif
}

// ---- fused small operators ----------------------------------------------------------------------------

// Elements are float32 (is_bf16 = 0) or bfloat16; each operator is instantiated for both by the exported
// wrappers at the end, so the branches on is_bf16 compile away.
static inline __attribute__((always_inline)) float load(const void *base, int64_t i, int is_bf16) {
    return is_bf16 ? from_bf16(((const uint16_t *)base)[i]) : ((const float *)base)[i];
}

static inline __attribute__((always_inline)) void store(void *base, int64_t i, float value, int is_bf16) {
    if (is_bf16) ((uint16_t *)base)[i] = to_bf16(value);
    else ((float *)base)[i] = value;
}

// The value torch holds after an op in this dtype: rounded to bfloat16, or the float32 as is.
static inline __attribute__((always_inline)) float held(float value, int is_bf16) {
    return is_bf16 ? from_bf16(to_bf16(value)) : value;
}

// With a residual: residual += x (rounded), r = residual; without: r = x. Then
// out = weight * (r * rsqrt(mean(r^2) + eps)), the normalisation in float32 and rounded before the weight
// multiplies, as torch does. Rows of x, residual and out are ldx, ldr and ldo elements apart.
static inline __attribute__((always_inline)) void add_rms_norm(
    const void *x, int64_t ldx, void *residual, int64_t ldr, const void *weight, void *out, int64_t ldo,
    int64_t M, int64_t K, float eps, int is_bf16
) {
    for (int64_t m = 0; m < M; m++) {
        const void *row = (const char *)x + m * ldx * (is_bf16 ? 2 : 4);
        if (residual) {
            void *res = (char *)residual + m * ldr * (is_bf16 ? 2 : 4);
            for (int64_t k = 0; k < K; k++) store(res, k, load(row, k, is_bf16) + load(res, k, is_bf16), is_bf16);
            row = res;
        }
        float sum = 0.0f;
        for (int64_t k = 0; k < K; k++) {
            float v = load(row, k, is_bf16);
            sum += v * v;
        }
        float scale = 1.0f / sqrtf(sum / (float)K + eps);
        void *dst = (char *)out + m * ldo * (is_bf16 ? 2 : 4);
        for (int64_t k = 0; k < K; k++)
            store(dst, k, load(weight, k, is_bf16) * held(load(row, k, is_bf16) * scale, is_bf16), is_bf16);
    }
}

// In place on `heads` consecutive heads of D elements per token (token rows ld elements apart):
// rotate-half rotary with the rows of the float32 cos/sin tables at each token's position, cast to the
// dtype first as torch does.
static inline __attribute__((always_inline)) void rotary(
    void *x, int64_t ld, int64_t T, int64_t heads, int64_t D, const int64_t *positions, const float *cos,
    const float *sin, int is_bf16
) {
    int64_t half = D / 2;
    for (int64_t t = 0; t < T; t++) {
        const float *c = cos + positions[t] * D, *s = sin + positions[t] * D;
        for (int64_t h = 0; h < heads; h++) {
            int64_t base = t * ld + h * D;
            for (int64_t i = 0; i < half; i++) {
                float x1 = load(x, base + i, is_bf16), x2 = load(x, base + half + i, is_bf16);
                float c1 = held(c[i], is_bf16), c2 = held(c[half + i], is_bf16);
                float s1 = held(s[i], is_bf16), s2 = held(s[half + i], is_bf16);
                store(x, base + i, held(x1 * c1, is_bf16) + held(-x2 * s1, is_bf16), is_bf16);
                store(x, base + half + i, held(x2 * c2, is_bf16) + held(x1 * s2, is_bf16), is_bf16);
            }
        }
    }
}

#define INSTANTIATE(suffix, is_bf16)                                                                    \
    void add_rms_norm_##suffix(const void *x, int64_t ldx, void *residual, int64_t ldr,                 \
                               const void *weight, void *out, int64_t ldo, int64_t M, int64_t K,        \
                               float eps) {                                                             \
        add_rms_norm(x, ldx, residual, ldr, weight, out, ldo, M, K, eps, is_bf16);                      \
    }                                                                                                   \
    void rotary_##suffix(void *x, int64_t ld, int64_t T, int64_t heads, int64_t D,                      \
                         const int64_t *positions, const float *cos, const float *sin) {                \
        rotary(x, ld, T, heads, D, positions, cos, sin, is_bf16);                                       \
    }

INSTANTIATE(f32, 0)
INSTANTIATE(bf16, 1)

// ---- memory bandwidth ---------------------------------------------------------------------------------

// Reads `bytes` (a multiple of 64) with `num_threads` threads and returns a value that depends on all of
// them, so the reads cannot be optimised away: the speed a decode step's weights can stream at, at best.
uint64_t read_memory(const void *data, int64_t bytes, int num_threads) {
    const uint64_t *words = (const uint64_t *)data;
    int64_t n = bytes / 8;
    uint64_t acc = 0;
#pragma omp parallel for schedule(static) reduction(^ : acc) num_threads(num_threads)
    for (int64_t i = 0; i < n; i += 8)
        acc ^= words[i] ^ words[i + 1] ^ words[i + 2] ^ words[i + 3] ^ words[i + 4] ^ words[i + 5] ^
               words[i + 6] ^ words[i + 7];
    return acc;
}
