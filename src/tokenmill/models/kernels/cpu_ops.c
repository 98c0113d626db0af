// The operators a decode step spends its time in, for the CPU: few-row matrix products against bfloat16,
// float32 or int8 weights at memory speed, and residual add + RMSNorm, rotary embedding and SiLU * up each
// fused into one call that replaces several torch ops. The fused ones take float32 or bfloat16 and round
// where torch rounds (after every op), so they give torch's values, not better ones.
//
// Matrix products: y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]), torch's Linear layout (w is [N, K],
// row-major). Each block of four weight rows is read from memory once and multiplied with every row of x
// while it sits in L1; products and sums are in float32 (AVX-512 BF16 dot products, or AVX2 FMAs), each
// output rounded once to the activations' dtype. Threads split the weight rows with OpenMP: the library
// links the same libgomp.so.1 torch has loaded, so both share one thread pool instead of spinning against
// each other.

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
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

// Activations of the int8 product and the fused operators are float32 (is_bf16 = 0) or bfloat16; each is
// instantiated for both by exported wrappers, so the branches on is_bf16 compile away.
static inline __attribute__((always_inline)) float load(const void *base, int64_t i, int is_bf16) {
    return is_bf16 ? from_bf16(((const uint16_t *)base)[i]) : ((const float *)base)[i];
}

static inline __attribute__((always_inline)) void store(void *base, int64_t i, float value, int is_bf16) {
    if (is_bf16) ((uint16_t *)base)[i] = to_bf16(value);
    else ((float *)base)[i] = value;
}

// ---- few-row matrix products ------------------------------------------------------------------------

// Two sets of tiles: AVX-512 (with BF16 dot products for bfloat16 weights) and AVX2 + FMA for the CPUs
// without AVX-512 (AMD Zen 2/3, older Intel), where a bfloat16 weight is widened to float32 by a shift (its
// bits are a float32's upper half) and multiplied with x converted to float32 once per call.
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define BF16_TILES_512 1
#endif
#if defined(__AVX512F__)
#define F32_TILES_512 1
#endif
#if defined(__AVX2__) && defined(__FMA__)
#define TILES_256 1
#endif

#if defined(__AVX512F__)
// The totals of four accumulators at once, [sum a0, sum a1, sum a2, sum a3]: a transposing add tree costs
// about a third of four separate horizontal sums, which matter when K is short (576: 18 products a row).
static inline __m128 sum4_ps(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
    __m512 s01 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
    __m512 s23 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
    __m512 t = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(s01), _mm512_castps_pd(s23))),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(s01), _mm512_castps_pd(s23))));
    __m256 h = _mm256_add_ps(_mm512_castps512_ps256(t), _mm512_extractf32x8_ps(t, 1));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}
#endif

#if defined(TILES_256)
static inline __m128 sum4_ps256(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
    __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

static inline float sum_ps256(__m256 a) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}
#endif

// Stores a tile's float32 sums: y[i, j] = sums[i][j] + bias[j], rounded to the output's dtype once.
#define STORE_TILE(ROUND, FROM)                                                                         \
    for (int i = 0; i < nx; i++)                                                                        \
        for (int j = 0; j < nw; j++) y[i * ldy + j] = ROUND(bias ? sums[i][j] + FROM(bias[j]) : sums[i][j]);
#define AS_IS(v) (v)

// The totals of a tile's accumulators (REDUCE4 when a whole block of four rows, REDUCE1 each otherwise).
#define SUM_TILE(REDUCE4, REDUCE1)                                                                      \
    float sums[X_PER_TILE][ROWS_PER_BLOCK];                                                            \
    for (int i = 0; i < nx; i++) {                                                                      \
        if (nw == ROWS_PER_BLOCK) _mm_storeu_ps(sums[i], REDUCE4(acc[i][0], acc[i][1], acc[i][2], acc[i][3])); \
        else for (int j = 0; j < nw; j++) sums[i][j] = REDUCE1(acc[i][j]);                              \
    }

// One tile: `nx` rows of x (at most X_PER_TILE) times `nw` weight rows (at most ROWS_PER_BLOCK). Inlined
// with constant nx and nw so the accumulators stay in registers.
#if defined(BF16_TILES_512)
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
        for (int j = 0; j < nw; j++) {
            wv[j] = _mm512_loadu_si512((const void *)(w + j * K + k));
            // The next block's rows, a block ahead: ~10% on a matrix streamed from memory (measured).
            _mm_prefetch((const char *)(w + (j + ROWS_PER_BLOCK) * K + k), _MM_HINT_T0);
        }
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
    SUM_TILE(sum4_ps, _mm512_reduce_add_ps)
    STORE_TILE(to_bf16, from_bf16)
}
#endif

#if defined(F32_TILES_512)
static inline __attribute__((always_inline)) void tile_f32(
    const float *x, int64_t ldx, const float *w, int64_t K, const float *bias, float *y, int64_t ldy, int nx,
    int nw
) {
    __m512 acc[X_PER_TILE][ROWS_PER_BLOCK];
    for (int i = 0; i < nx; i++)
        for (int j = 0; j < nw; j++) acc[i][j] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        __m512 wv[ROWS_PER_BLOCK];
        for (int j = 0; j < nw; j++) {
            wv[j] = _mm512_loadu_ps(w + j * K + k);
            _mm_prefetch((const char *)(w + (j + ROWS_PER_BLOCK) * K + k), _MM_HINT_T0);
        }
        for (int i = 0; i < nx; i++) {
            __m512 xv = _mm512_loadu_ps(x + i * ldx + k);
            for (int j = 0; j < nw; j++) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
        }
    }
    if (k < K) {  // masked loads only for the tail: in the main loop they cost ~2x (measured)
        __mmask16 mask = (__mmask16)((1u << (K - k)) - 1);
        for (int i = 0; i < nx; i++) {
            __m512 xv = _mm512_maskz_loadu_ps(mask, x + i * ldx + k);
            for (int j = 0; j < nw; j++)
                acc[i][j] = _mm512_fmadd_ps(xv, _mm512_maskz_loadu_ps(mask, w + j * K + k), acc[i][j]);
        }
    }
    SUM_TILE(sum4_ps, _mm512_reduce_add_ps)
    STORE_TILE(AS_IS, AS_IS)
}
#endif

#if defined(TILES_256)
// x is float32 here (skinny_gemm_bf16 converts it once); each 16 bfloat16 weights become two float32
// vectors. A K that is not a multiple of 16 ends with scalar products.
static inline __attribute__((always_inline)) void tile_bf16_256(
    const float *x, int64_t ldx, const uint16_t *w, int64_t K, const uint16_t *bias, uint16_t *y, int64_t ldy,
    int nx, int nw
) {
    __m256 acc[X_PER_TILE][ROWS_PER_BLOCK];
    for (int i = 0; i < nx; i++)
        for (int j = 0; j < nw; j++) acc[i][j] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        __m256 low[ROWS_PER_BLOCK], high[ROWS_PER_BLOCK];
        for (int j = 0; j < nw; j++) {
            __m256i v = _mm256_loadu_si256((const __m256i *)(w + j * K + k));
            low[j] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(v)), 16));
            high[j] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(v, 1)), 16));
            _mm_prefetch((const char *)(w + (j + ROWS_PER_BLOCK) * K + k), _MM_HINT_T0);
        }
        for (int i = 0; i < nx; i++) {
            __m256 x0 = _mm256_loadu_ps(x + i * ldx + k), x1 = _mm256_loadu_ps(x + i * ldx + k + 8);
            for (int j = 0; j < nw; j++) acc[i][j] = _mm256_fmadd_ps(x1, high[j], _mm256_fmadd_ps(x0, low[j], acc[i][j]));
        }
    }
    SUM_TILE(sum4_ps256, sum_ps256)
    for (; k < K; k++)
        for (int i = 0; i < nx; i++)
            for (int j = 0; j < nw; j++) sums[i][j] += x[i * ldx + k] * from_bf16(w[j * K + k]);
    STORE_TILE(to_bf16, from_bf16)
}

static inline __attribute__((always_inline)) void tile_f32_256(
    const float *x, int64_t ldx, const float *w, int64_t K, const float *bias, float *y, int64_t ldy, int nx,
    int nw
) {
    __m256 acc[X_PER_TILE][ROWS_PER_BLOCK];
    for (int i = 0; i < nx; i++)
        for (int j = 0; j < nw; j++) acc[i][j] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 wv[ROWS_PER_BLOCK];
        for (int j = 0; j < nw; j++) {
            wv[j] = _mm256_loadu_ps(w + j * K + k);
            _mm_prefetch((const char *)(w + (j + ROWS_PER_BLOCK) * K + k), _MM_HINT_T0);
        }
        for (int i = 0; i < nx; i++) {
            __m256 xv = _mm256_loadu_ps(x + i * ldx + k);
            for (int j = 0; j < nw; j++) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
        }
    }
    SUM_TILE(sum4_ps256, sum_ps256)
    for (; k < K; k++)
        for (int i = 0; i < nx; i++)
            for (int j = 0; j < nw; j++) sums[i][j] += x[i * ldx + k] * w[j * K + k];
    STORE_TILE(AS_IS, AS_IS)
}
#endif

// The driver every tile shares: threads split the blocks of weight rows; each block meets the rows of x
// four at a time, while it sits in L1.
#define DEFINE_ROWS(NAME, TX, TW, TILE)                                                                 \
    static void NAME(const TX *x, int64_t ldx, const TW *w, const TW *bias, TW *y, int64_t ldy, int64_t M, \
                     int64_t N, int64_t K, int num_threads) {                                           \
        int64_t blocks = (N + ROWS_PER_BLOCK - 1) / ROWS_PER_BLOCK;                                     \
        _Pragma("omp parallel for schedule(static) num_threads(num_threads)")                          \
        for (int64_t block = 0; block < blocks; block++) {                                              \
            int64_t n = block * ROWS_PER_BLOCK;                                                         \
            const TW *wb = w + n * K, *bb = bias ? bias + n : 0;                                        \
            for (int64_t m = 0; m < M; m += X_PER_TILE) {                                               \
                const TX *xt = x + m * ldx;                                                             \
                TW *yt = y + m * ldy + n;                                                               \
                if (n + ROWS_PER_BLOCK > N) { /* the last, partial block of rows: one at a time */     \
                    for (int64_t r = 0; r < N - n; r++)                                                 \
                        for (int64_t i = 0; i < X_PER_TILE && m + i < M; i++)                           \
                            TILE(xt + i * ldx, ldx, wb + r * K, K, bb ? bb + r : 0, yt + i * ldy + r,   \
                                 ldy, 1, 1);                                                            \
                    continue;                                                                           \
                }                                                                                       \
                switch (M - m) {                                                                        \
                    case 1: TILE(xt, ldx, wb, K, bb, yt, ldy, 1, ROWS_PER_BLOCK); break;                \
                    case 2: TILE(xt, ldx, wb, K, bb, yt, ldy, 2, ROWS_PER_BLOCK); break;                \
                    case 3: TILE(xt, ldx, wb, K, bb, yt, ldy, 3, ROWS_PER_BLOCK); break;                \
                    default: TILE(xt, ldx, wb, K, bb, yt, ldy, 4, ROWS_PER_BLOCK); break;               \
                }                                                                                       \
            }                                                                                           \
        }                                                                                               \
    }

#if defined(BF16_TILES_512)
DEFINE_ROWS(rows_bf16, uint16_t, uint16_t, tile_bf16)
#elif defined(TILES_256)
DEFINE_ROWS(rows_bf16, float, uint16_t, tile_bf16_256)
#endif
#if defined(F32_TILES_512)
DEFINE_ROWS(rows_f32, float, float, tile_f32)
#elif defined(TILES_256)
DEFINE_ROWS(rows_f32, float, float, tile_f32_256)
#endif

int skinny_gemm_supported(void) {
#if defined(BF16_TILES_512) || defined(TILES_256)
    return 1;
#else
    return 0;
#endif
}

int skinny_gemm_f32_supported(void) {
#if defined(F32_TILES_512) || defined(TILES_256)
    return 1;
#else
    return 0;
#endif
}

// Up to how many rows of x the kernel takes a product (more: torch's GEMM), and so a whole decode step
// (decode_step.c). On a small model's shapes (SmolLM2's, weights streamed from memory) with 512-bit tiles:
// on a 2-core Xeon with AVX-512 BF16 (2026-12-02) the kernel beat torch to ~32-48 rows in both dtypes
// (torch's bfloat16 GEMM without AMX runs at half its float32 rate); on a 2-core EPYC with AVX-512 BF16
// (2026-12-02) it matches torch's bfloat16 GEMM at 64 rows (35 against 32 ms over 30 layers; 27 against
// 37 at 48) and beats its float32 one (68 against 105), and a whole step of 33-64 rows in one call is
// 1.6x the same step run one operator at a time from Python. With the AVX2 tiles: up to 8 rows.
int skinny_gemm_max_rows(int is_bf16) {
#if defined(BF16_TILES_512)
    if (is_bf16) return 64;
#endif
#if defined(F32_TILES_512)
    if (!is_bf16) return 64;
#endif
    (void)is_bf16;
    return 8;
}

// Returns 0; 1 where the CPU lacks the instructions (callers check skinny_gemm_supported first); 3 if out
// of memory.
int skinny_gemm_bf16(
    const uint16_t *x, int64_t ldx, const uint16_t *w, const uint16_t *bias, uint16_t *y, int64_t ldy,
    int64_t M, int64_t N, int64_t K, int num_threads
) {
#if defined(BF16_TILES_512)
    rows_bf16(x, ldx, w, bias, y, ldy, M, N, K, num_threads);
    return 0;
#elif defined(TILES_256)
    float *wide = malloc(sizeof(float) * (size_t)(M * K));
    if (!wide) return 3;
    for (int64_t m = 0; m < M; m++)
        for (int64_t k = 0; k < K; k++) wide[m * K + k] = from_bf16(x[m * ldx + k]);
    rows_bf16(wide, K, w, bias, y, ldy, M, N, K, num_threads);
    free(wide);
    return 0;
#else
    (void)x; (void)ldx; (void)w; (void)bias; (void)y; (void)ldy; (void)M; (void)N; (void)K; (void)num_threads;
    return 1;
#endif
}

int skinny_gemm_f32(
    const float *x, int64_t ldx, const float *w, const float *bias, float *y, int64_t ldy, int64_t M, int64_t N,
    int64_t K, int num_threads
) {
#if defined(F32_TILES_512) || defined(TILES_256)
    rows_f32(x, ldx, w, bias, y, ldy, M, N, K, num_threads);
    return 0;
#else
    (void)x; (void)ldx; (void)w; (void)bias; (void)y; (void)ldy; (void)M; (void)N; (void)K; (void)num_threads;
    return 1;
#endif
}

// ---- matrix products against packed bfloat16 weights --------------------------------------------------

// The same product, y = x w^T (+ bias), for any number of rows, against a weight packed once at load
// (models/packed_linear.py): panels of PANEL output columns, each stored as K/2 pairs of inputs for all its
// columns, packed[p][k / 2][c][k % 2] = w[p * PANEL + c][k] (zero past the last row of w). One 64-byte load
// then holds two inputs of 16 columns, which is what a BF16 dot product takes, so a tile of up to PACKED_MR
// rows of x keeps 2 * PACKED_MR column vectors of float32 sums in registers, and each step broadcasts one
// pair of inputs per row: no horizontal sums at the end, and a panel is one contiguous stream. Few rows: the
// panel streams from memory at close to its bandwidth; many: the panel stays in L1/L2 while every tile of
// rows passes over it, at close to the BF16 dot product's peak (SmolLM2's shapes on a 2-core EPYC,
// 2026-12-02: 56 GB/s at 1 row against 46 for the skinny kernel above, 880 GFLOP/s at 64 rows against 560,
// 970 at 576 against torch's 900).
#define PANEL 32
#define PACKED_MR 12
// Bytes ahead of the tile's reads to prefetch: far enough to cover memory's latency when every pair of
// inputs feeds a dozen rows (8 KB: +5-10% over 1 KB from 16 rows up, measured).
#define PACKED_PREFETCH 8192

#if defined(BF16_TILES_512)
// float32 -> bfloat16 on 16 lanes, rounded as to_bf16 (to nearest, ties to even; NaN stays NaN): the same
// bits as torch's conversion, denormals included.
static inline __m256i round_to_bf16(__m512 v) {
    __m512i bits = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_or_si512(bits, _mm512_set1_epi32(0x400000)));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
}

static inline __m512 widen_bf16(const uint16_t *values, __mmask16 mask) {
    __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, values));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

// A panel's `cols` real columns as masks of its two 16-column halves, and its bias (zero without one).
typedef struct {
    __mmask16 low, high;
    __m512 b0, b1;
} panel_edge;

static inline __attribute__((always_inline)) panel_edge panel_edge_of(const uint16_t *bias, int cols) {
    panel_edge edge;
    edge.low = (__mmask16)(cols >= 16 ? 0xffff : (1u << cols) - 1);
    edge.high = (__mmask16)(cols >= 32 ? 0xffff : cols > 16 ? (1u << (cols - 16)) - 1 : 0);
    edge.b0 = bias ? widen_bf16(bias, edge.low) : _mm512_setzero_ps();
    edge.b1 = bias ? widen_bf16(bias + 16, edge.high) : _mm512_setzero_ps();
    return edge;
}

// One row of y's panel from its float32 sums (the panel's two halves): plus bias, rounded once.
static inline __attribute__((always_inline)) void store_panel_row(uint16_t *y, __m512 s0, __m512 s1, panel_edge edge) {
    _mm256_mask_storeu_epi16(y, edge.low, round_to_bf16(_mm512_add_ps(s0, edge.b0)));
    _mm256_mask_storeu_epi16(y + 16, edge.high, round_to_bf16(_mm512_add_ps(s1, edge.b1)));
}

// `mr` rows of x (a constant where inlined) times one panel; `cols` of its PANEL columns are real.
static inline __attribute__((always_inline)) void packed_tile(
    const uint16_t *x, int64_t ldx, const uint16_t *panel, int64_t pairs, const uint16_t *bias, uint16_t *y,
    int64_t ldy, int mr, int cols
) {
    __m512 acc[PACKED_MR][2];
    for (int i = 0; i < mr; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    for (int64_t kk = 0; kk < pairs; kk++) {
        const uint16_t *w = panel + kk * 2 * PANEL;
        __m512i w0 = _mm512_loadu_si512((const void *)w), w1 = _mm512_loadu_si512((const void *)(w + 32));
        _mm_prefetch((const char *)w + PACKED_PREFETCH, _MM_HINT_T0);
        _mm_prefetch((const char *)w + PACKED_PREFETCH + 64, _MM_HINT_T0);
        for (int i = 0; i < mr; i++) {
            int32_t pair;
            memcpy(&pair, x + i * ldx + 2 * kk, sizeof pair);
            __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
            acc[i][0] = _mm512_dpbf16_ps(acc[i][0], xv, (__m512bh)w0);
            acc[i][1] = _mm512_dpbf16_ps(acc[i][1], xv, (__m512bh)w1);
        }
    }
    panel_edge edge = panel_edge_of(bias, cols);
    for (int i = 0; i < mr; i++) store_panel_row(y + i * ldy, acc[i][0], acc[i][1], edge);
}
#endif

#include "amx.c"
#if defined(BF16_TILES_512) && defined(TOKENMILL_AMX)
// With AMX the same packed layout is what a tile multiply takes as its right operand: 16 pairs of inputs
// (rows) of 16 columns (64 bytes), and a panel's two halves are two such tiles 128 bytes a row apart. One
// tile multiply does 16 x 16 x 32 multiply-adds: on a 2-core Xeon (2026-12-02, SmolLM2's shapes) 2.3-2.6
// TFLOP/s from 128 rows, 5-10x the tiles above and 1.1-2.9x torch's oneDNN GEMM from 16 rows up; at 1-4
// rows, streaming the weights, ~10% slower than the tiles above. Each output sums its products in float32
// in the same order whatever the number of rows, so a row's result does not depend on the rows beside it.
// Bytes ahead of a weight tile to prefetch, for few rows, where the tiles stream from memory (4 KB: +10-20%
// over none at 1-4 rows; 8 and 16 KB no better, measured).
#define AMX_PREFETCH 4096

// One or two tiles of x (16 rows each, rows ldx0 and ldx1 elements apart) times the pairs [k0, k1) of a
// panel, into sums[32][PANEL] (added to what sums holds unless k0 is 0: each output still sums its products
// over k in order). Tiles: sums 0-3 (two row tiles of x by the panel's two halves), x 4-5, weight 6-7.
// Each step of 16 pairs (32 lines of the panel) asks for the lines [lines_from, lines_to) of the step
// `ahead` bytes further on, into L1 (into L2 with to_l2). One pass after another: the first, streaming the
// panel from memory, asks for all; the others find it in L1 or L2 and ask for none, where the prefetches
// only took load slots (at 576 rows, the gate/up product 2.0 -> 2.3 TFLOP/s without them, qkv +9%, o +5%;
// a 2-core Xeon, 2026-12-03). Passes taking the panel in turn ask for a share each.
static inline __attribute__((always_inline)) void amx_panel(
    const uint16_t *x0, int64_t ldx0, const uint16_t *x1, int64_t ldx1, const uint16_t *panel, int64_t k0,
    int64_t k1, float *sums, int two, int64_t ahead, int lines_from, int lines_to, int to_l2
) {
    if (k0 == 0) {
        _tile_zero(0);
        _tile_zero(1);
        if (two) {
            _tile_zero(2);
            _tile_zero(3);
        }
    } else {
        _tile_loadd(0, sums, 4 * PANEL);
        _tile_loadd(1, sums + 16, 4 * PANEL);
        if (two) {
            _tile_loadd(2, sums + AMX_ROWS * PANEL, 4 * PANEL);
            _tile_loadd(3, sums + AMX_ROWS * PANEL + 16, 4 * PANEL);
        }
    }
    for (int64_t kk = k0; kk < k1; kk += AMX_ROWS) {
        const uint16_t *w = panel + kk * 2 * PANEL;
        if (to_l2)
            for (int line = lines_from; line < lines_to; line++)
                _mm_prefetch((const char *)w + ahead + 64 * line, _MM_HINT_T1);
        else
            for (int line = lines_from; line < lines_to; line++)
                _mm_prefetch((const char *)w + ahead + 64 * line, _MM_HINT_T0);
        _tile_loadd(6, w, 4 * PANEL);
        _tile_loadd(7, w + 32, 4 * PANEL);
        _tile_loadd(4, x0 + 2 * kk, 2 * ldx0);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        if (two) {
            _tile_loadd(5, x1 + 2 * kk, 2 * ldx1);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
        }
    }
    _tile_stored(0, sums, 4 * PANEL);
    _tile_stored(1, sums + 16, 4 * PANEL);
    if (two) {
        _tile_stored(2, sums + AMX_ROWS * PANEL, 4 * PANEL);
        _tile_stored(3, sums + AMX_ROWS * PANEL + 16, 4 * PANEL);
    }
}

// A pass's tiles of x: rows [m, m + 32) of M, those past the whole tiles read from `padded` (16 rows).
typedef struct {
    const uint16_t *x0, *x1;
    int64_t ldx0, ldx1;
    int rows;
} amx_rows;

static inline __attribute__((always_inline)) amx_rows amx_rows_at(
    const uint16_t *x, int64_t ldx, const uint16_t *padded, int64_t K, int64_t M, int64_t whole, int64_t m
) {
    amx_rows r;
    r.x0 = m < whole ? x + m * ldx : padded;
    r.x1 = m + AMX_ROWS < whole ? r.x0 + AMX_ROWS * ldx : padded;
    r.ldx0 = m < whole ? ldx : K;
    r.ldx1 = m + AMX_ROWS < whole ? ldx : K;
    r.rows = M - m < 2 * AMX_ROWS ? (int)(M - m) : 2 * AMX_ROWS;
    return r;
}

// amx_panel on a pass's one or two tiles of x.
static inline __attribute__((always_inline)) void amx_pass(
    amx_rows r, const uint16_t *panel, int64_t k0, int64_t k1, float *sums, int64_t ahead, int from, int to,
    int to_l2
) {
    if (r.rows > AMX_ROWS) amx_panel(r.x0, r.ldx0, r.x1, r.ldx1, panel, k0, k1, sums, 1, ahead, from, to, to_l2);
    else amx_panel(r.x0, r.ldx0, r.x1, r.ldx1, panel, k0, k1, sums, 0, ahead, from, to, to_l2);
}

static inline __attribute__((always_inline)) void store_panel_rows(
    uint16_t *y, int64_t ldy, const float *sums, int rows, panel_edge edge
) {
    for (int i = 0; i < rows; i++)
        store_panel_row(y + i * ldy, _mm512_load_ps(sums + i * PANEL), _mm512_load_ps(sums + i * PANEL + 16), edge);
}

// Rows up to which the passes over a panel take it a chunk at a time in turn (see packed_gemm_amx), and
// the chunk's pairs: 64 (8 KB of the panel) for up to 128 rows, 128 above (fewer reloads of the sums).
// Measured against one pass after the other, cold weights of SmolLM2's 30 layers, on a 2-core Xeon
// (2026-12-03): 33-64 rows 5-16% faster, 80-512 rows 10-18%; chunks of 32 pairs, or 128 at 80-96 rows, or
// 256, were slower.
#define MAX_INTERLEAVED_ROWS 512
#define INTERLEAVED_PAIRS 64

// packed_gemm_bf16 by tiles (K a multiple of 32). A tile loads 16 rows, so a last tile of x with fewer is
// read from a copy in a buffer of 16 rows, one per calling thread, kept for its next calls. A pass over a
// panel takes 32 rows. Done one after the other, the first streams the panel from memory and the others
// find it in L1 or L2 and compute with memory idle: the time is the sum of the two. So past 32 rows the
// passes take the panel a chunk at a time in turn, each asking for its share of the next chunk (into L2
// past 64 rows, where x's tiles would evict it from L1): memory streams while they compute. Each output
// still sums its products over k in the same order: the same bits whatever the number of rows.
static int packed_gemm_amx(
    const uint16_t *x, int64_t ldx, const uint16_t *packed, const uint16_t *bias, uint16_t *y, int64_t ldy,
    int64_t M, int64_t N, int64_t K, int num_threads
) {
    const int64_t panels = (N + PANEL - 1) / PANEL, pairs = K / 2, whole = M / AMX_ROWS * AMX_ROWS;
    const int interleaved = M > 2 * AMX_ROWS && M <= MAX_INTERLEAVED_ROWS, to_l2 = M > 4 * AMX_ROWS;
    const int64_t chunk = (M > 8 * AMX_ROWS ? 2 : 1) * INTERLEAVED_PAIRS, ahead = chunk * 2 * PANEL * sizeof *packed;
    const int passes = (int)((M + 2 * AMX_ROWS - 1) / (2 * AMX_ROWS));
    // Each interleaved pass's share of a step's 32 lines of the next chunk (no passes at all for M = 0).
    const int share = interleaved ? (2 * AMX_ROWS + passes - 1) / passes : 0;
    // Its rows past M are whatever an earlier call left (zeros at first): their sums are never stored.
    static __thread uint16_t *tail;
    static __thread int64_t tail_size;
    if (whole < M) {
        if (tail_size < AMX_ROWS * K) {
            free(tail);
            tail = calloc((size_t)(AMX_ROWS * K), sizeof *tail);
            tail_size = tail ? AMX_ROWS * K : 0;
            if (!tail) return 3;
        }
        for (int64_t i = whole; i < M; i++) memcpy(tail + (i - whole) * K, x + i * ldx, (size_t)K * sizeof *x);
    }
    const uint16_t *padded = tail;  // the calling thread's buffer, named so the team's threads read it
    _Pragma("omp parallel num_threads(num_threads)") {
        amx_configure();
        float sums[MAX_INTERLEAVED_ROWS * PANEL] __attribute__((aligned(64)));
        _Pragma("omp for schedule(static)")
        for (int64_t p = 0; p < panels; p++) {
            const uint16_t *panel = packed + p * pairs * 2 * PANEL;
            const int cols = N - p * PANEL < PANEL ? (int)(N - p * PANEL) : PANEL;
            panel_edge edge = panel_edge_of(bias ? bias + p * PANEL : 0, cols);
            if (!interleaved) {
                for (int64_t m = 0; m < M; m += 2 * AMX_ROWS) {
                    amx_rows r = amx_rows_at(x, ldx, padded, K, M, whole, m);
                    amx_pass(r, panel, 0, pairs, sums, AMX_PREFETCH, 0, m == 0 ? 2 * AMX_ROWS : 0, 0);
                    store_panel_rows(y + m * ldy + p * PANEL, ldy, sums, r.rows, edge);
                }
                continue;
            }
            for (int64_t k0 = 0; k0 < pairs; k0 += chunk) {
                const int64_t k1 = k0 + chunk < pairs ? k0 + chunk : pairs;
                for (int64_t m = 0, pass = 0; m < M; m += 2 * AMX_ROWS, pass++) {
                    amx_rows r = amx_rows_at(x, ldx, padded, K, M, whole, m);
                    const int from = (int)pass * share, to = from + share < 2 * AMX_ROWS ? from + share : 2 * AMX_ROWS;
                    amx_pass(r, panel, k0, k1, sums + m * PANEL, ahead, from < to ? from : to, to, to_l2);
                    if (k1 == pairs) store_panel_rows(y + m * ldy + p * PANEL, ldy, sums + m * PANEL, r.rows, edge);
                }
            }
        }
        _tile_release();
    }
    return 0;
}
#endif

int packed_gemm_supported(void) {
#if defined(BF16_TILES_512)
    return 1;
#else
    return 0;
#endif
}

// x [M, K] bfloat16 (rows ldx apart, K even), packed as above for w [N, K], y [M, N] (rows ldy apart).
// Threads split the panels; within one, the rows go in tiles of near-equal size (16 rows: 8 + 8, not
// 12 + 4, whose short tile would re-read the panel for little work); with AMX, by packed_gemm_amx where K
// is a multiple of 32. Returns 0; 1 without the instructions (callers check packed_gemm_supported first);
// 3 out of memory.
int packed_gemm_bf16(
    const uint16_t *x, int64_t ldx, const uint16_t *packed, const uint16_t *bias, uint16_t *y, int64_t ldy,
    int64_t M, int64_t N, int64_t K, int num_threads
) {
#if defined(BF16_TILES_512)
#if defined(TOKENMILL_AMX)
    if (K % (2 * AMX_ROWS) == 0 && amx_ready())
        return packed_gemm_amx(x, ldx, packed, bias, y, ldy, M, N, K, num_threads);
#endif
    const int64_t panels = (N + PANEL - 1) / PANEL, pairs = K / 2, tiles = (M + PACKED_MR - 1) / PACKED_MR;
    _Pragma("omp parallel for schedule(static) num_threads(num_threads)")
    for (int64_t p = 0; p < panels; p++) {
        const uint16_t *panel = packed + p * pairs * 2 * PANEL, *panel_bias = bias ? bias + p * PANEL : 0;
        const int cols = N - p * PANEL < PANEL ? (int)(N - p * PANEL) : PANEL;
        for (int64_t t = 0, m = 0; t < tiles; t++) {
            const int rows = (int)((M - m + (tiles - t) - 1) / (tiles - t));
            const uint16_t *xt = x + m * ldx;
            uint16_t *yt = y + m * ldy + p * PANEL;
            switch (rows) {
#define PACKED_TILE(R) case R: packed_tile(xt, ldx, panel, pairs, panel_bias, yt, ldy, R, cols); break;
                PACKED_TILE(1) PACKED_TILE(2) PACKED_TILE(3) PACKED_TILE(4) PACKED_TILE(5) PACKED_TILE(6)
                PACKED_TILE(7) PACKED_TILE(8) PACKED_TILE(9) PACKED_TILE(10) PACKED_TILE(11) PACKED_TILE(12)
#undef PACKED_TILE
            }
            m += rows;
        }
    }
    return 0;
#else
    (void)x; (void)ldx; (void)packed; (void)bias; (void)y; (void)ldy; (void)M; (void)N; (void)K; (void)num_threads;
    return 1;
#endif
}

// ---- few-row matrix products with int8 weights ---------------------------------------------------------

// y[m, n] = scale[n] * x[m] . q[n] (+ bias[n]): weight-only int8 with one float32 scale per weight row.
// Half the bytes of bfloat16 to stream; to multiply them at that speed, the step's few rows of x are
// quantized here to 8 bits in blocks of 64 (one scale per block: an outlier costs its own block precision,
// not the whole row's), so AVX-512 VNNI multiplies 64 byte pairs per instruction into exact int32 sums,
// which the block's scale brings into a float32 sum. VNNI takes unsigned x, so xq + 128 goes in, and
// 128 * each weight block's sum (block_sums[n, b], computed at load) weighted by the block scale comes out.
// Without VNNI (AVX2), xq stays signed and |xq| times the weight with xq's sign go through maddubs: both
// at most 127 in size, so its pairwise int16 sums cannot saturate, and the int32 sums are the same exact ones.
#define Q8_BLOCK 64
#define Q8_MAX_ROWS 16

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define Q8_TILES_512 1
#define Q8_OFFSET 128
#elif defined(TILES_256)
#define Q8_TILES_256 1
#define Q8_OFFSET 0
#endif

#if defined(Q8_TILES_512)

static inline __attribute__((always_inline)) void tile_q8(
    const uint8_t *xq, const float *xscale, int64_t K, int64_t blocks, const int8_t *q, const float *scale,
    const int32_t *block_sums, const void *bias, void *y, int64_t ldy, int nx, int nw, int is_bf16
) {
    __m512 acc[X_PER_TILE][ROWS_PER_BLOCK];
    for (int i = 0; i < nx; i++)
        for (int j = 0; j < nw; j++) acc[i][j] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; b++) {
        int64_t k = b * Q8_BLOCK;
        __m512i wv[ROWS_PER_BLOCK];
        if (k + Q8_BLOCK <= K) {  // unmasked: masked loads in the main loop cost ~2x here (measured)
            for (int j = 0; j < nw; j++) {
                wv[j] = _mm512_loadu_si512((const void *)(q + j * K + k));
                _mm_prefetch((const char *)(q + (j + ROWS_PER_BLOCK) * K + k), _MM_HINT_T0);
            }
        } else {  // the tail: masked loads read zeros past the end, which add nothing
            __mmask64 mask = ((__mmask64)1 << (K - k)) - 1;
            for (int j = 0; j < nw; j++) wv[j] = _mm512_maskz_loadu_epi8(mask, q + j * K + k);
        }
        for (int i = 0; i < nx; i++) {
            // x rows are padded to whole blocks with zeros (see gemm_q8): no mask needed.
            __m512i xv = _mm512_loadu_si512((const void *)(xq + i * blocks * Q8_BLOCK + k));
            __m512 xs = _mm512_set1_ps(xscale[i * blocks + b]);
            for (int j = 0; j < nw; j++) {
                __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), xv, wv[j]);
                acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), xs, acc[i][j]);
            }
        }
    }
    for (int i = 0; i < nx; i++) {
        float sums[ROWS_PER_BLOCK];
        if (nw == ROWS_PER_BLOCK) {
            _mm_storeu_ps(sums, sum4_ps(acc[i][0], acc[i][1], acc[i][2], acc[i][3]));
        } else {
            for (int j = 0; j < nw; j++) sums[j] = _mm512_reduce_add_ps(acc[i][j]);
        }
        for (int j = 0; j < nw; j++) {
            float offset = 0.0f;  // the +128 of every x byte, times the weights it met
            for (int64_t b = 0; b < blocks; b++) offset += xscale[i * blocks + b] * (float)block_sums[j * blocks + b];
            float sum = (sums[j] - 128.0f * offset) * scale[j];
            store(y, i * ldy + j, bias ? sum + load(bias, j, is_bf16) : sum, is_bf16);
        }
    }
}

#elif defined(Q8_TILES_256)

// AVX2 has 16 vector registers: each weight row's block is loaded where it is used (from L1 after the first
// row of x), so the accumulators and x's block stay in registers.
static inline __attribute__((always_inline)) void tile_q8(
    const uint8_t *xq, const float *xscale, int64_t K, int64_t blocks, const int8_t *q, const float *scale,
    const int32_t *block_sums, const void *bias, void *y, int64_t ldy, int nx, int nw, int is_bf16
) {
    (void)block_sums;  // no offset to take out: x is signed here
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[X_PER_TILE][ROWS_PER_BLOCK];
    for (int i = 0; i < nx; i++)
        for (int j = 0; j < nw; j++) acc[i][j] = _mm256_setzero_ps();
    int64_t full = K / Q8_BLOCK;  // blocks without a tail
    for (int64_t b = 0; b < blocks; b++) {
        int64_t k = b * Q8_BLOCK;
        int8_t tail[ROWS_PER_BLOCK][Q8_BLOCK];
        const int8_t *rows[ROWS_PER_BLOCK];
        for (int j = 0; j < nw; j++) {
            if (b < full) {
                rows[j] = q + j * K + k;
                _mm_prefetch((const char *)(q + (j + ROWS_PER_BLOCK) * K + k), _MM_HINT_T0);
            } else {  // the tail, through a zero-padded copy (zeros add nothing)
                memset(tail[j], 0, Q8_BLOCK);
                memcpy(tail[j], q + j * K + k, (size_t)(K - k));
                rows[j] = tail[j];
            }
        }
        for (int i = 0; i < nx; i++) {
            const uint8_t *row = xq + i * blocks * Q8_BLOCK + k;  // padded to whole blocks with zeros
            __m256i x0 = _mm256_loadu_si256((const __m256i *)row), x1 = _mm256_loadu_si256((const __m256i *)(row + 32));
            __m256i a0 = _mm256_sign_epi8(x0, x0), a1 = _mm256_sign_epi8(x1, x1);
            __m256 xs = _mm256_set1_ps(xscale[i * blocks + b]);
            for (int j = 0; j < nw; j++) {
                __m256i w0 = _mm256_loadu_si256((const __m256i *)rows[j]);
                __m256i w1 = _mm256_loadu_si256((const __m256i *)(rows[j] + 32));
                __m256i p0 = _mm256_maddubs_epi16(a0, _mm256_sign_epi8(w0, x0));
                __m256i p1 = _mm256_maddubs_epi16(a1, _mm256_sign_epi8(w1, x1));
                // p0 + p1 could leave int16 (up to 2 x 32,258): each is widened to int32 first.
                __m256i dot = _mm256_add_epi32(_mm256_madd_epi16(p0, ones), _mm256_madd_epi16(p1, ones));
                acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), xs, acc[i][j]);
            }
        }
    }
    SUM_TILE(sum4_ps256, sum_ps256)
    for (int i = 0; i < nx; i++)
        for (int j = 0; j < nw; j++) {
            float sum = sums[i][j] * scale[j];
            store(y, i * ldy + j, bias ? sum + load(bias, j, is_bf16) : sum, is_bf16);
        }
}

#endif

#if defined(Q8_OFFSET)
// Each block of 64 values of each row: step = absmax / 127, xq = round(x / step) + Q8_OFFSET, padding 0. Exactly
// these float32 operations, in this order: the file's -freciprocal-math and -fassociative-math would let the
// compiler rewrite x * (1 / step), and a bfloat16 value often lies on a rounding tie that a rewrite breaks
// the other way (tests mirror this arithmetic).
__attribute__((optimize("no-reciprocal-math", "no-associative-math"))) static void quantize_rows(
    const void *x, int64_t ldx, int64_t M, int64_t K, int64_t blocks, uint8_t *xq, float *xscale, int is_bf16
) {
    int64_t padded = blocks * Q8_BLOCK;
    for (int64_t m = 0; m < M; m++)
        for (int64_t b = 0; b < blocks; b++) {
            int64_t first = b * Q8_BLOCK, last = first + Q8_BLOCK < K ? first + Q8_BLOCK : K;
            float absmax = 0.0f;
            for (int64_t k = first; k < last; k++) absmax = fmaxf(absmax, fabsf(load(x, m * ldx + k, is_bf16)));
            float step = absmax > 0.0f ? absmax * (1.0f / 127.0f) : 1.0f, inverse = 1.0f / step;
            xscale[m * blocks + b] = step;
            uint8_t *row = xq + m * padded;
            for (int64_t k = first; k < last; k++)
                row[k] = (uint8_t)(lrintf(load(x, m * ldx + k, is_bf16) * inverse) + Q8_OFFSET);
            for (int64_t k = last; k < first + Q8_BLOCK; k++) row[k] = 0;  // padding meets zero weights
        }
}
#endif

int skinny_gemm_q8_supported(void) {
#if defined(Q8_TILES_512) || defined(Q8_TILES_256)
    return 1;
#else
    return 0;
#endif
}

// x, bias and y in the activations' dtype (is_bf16); block_sums: [N, ceil(K / Q8_BLOCK)] sums of each
// weight row's blocks. Returns 0; 1 where the CPU lacks AVX-512 VNNI and AVX2, 2 for more than Q8_MAX_ROWS
// rows (callers check both first), 3 if out of memory.
static inline __attribute__((always_inline)) int gemm_q8(
    const void *x, int64_t ldx, const int8_t *q, const float *scale, const int32_t *block_sums,
    const void *bias, void *y, int64_t ldy, int64_t M, int64_t N, int64_t K, int num_threads, int is_bf16
) {
#if defined(Q8_TILES_512) || defined(Q8_TILES_256)
    if (M > Q8_MAX_ROWS) return 2;
    int64_t blocks = (K + Q8_BLOCK - 1) / Q8_BLOCK, padded = blocks * Q8_BLOCK;
    uint8_t *xq = (uint8_t *)aligned_alloc(64, (size_t)(M * padded));
    float *xscale = (float *)malloc(sizeof(float) * (size_t)(M * blocks));
    if (!xq || !xscale) {
        free(xq);
        free(xscale);
        return 3;
    }
    quantize_rows(x, ldx, M, K, blocks, xq, xscale, is_bf16);
    int64_t row_blocks = (N + ROWS_PER_BLOCK - 1) / ROWS_PER_BLOCK;
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t block = 0; block < row_blocks; block++) {
        int64_t n = block * ROWS_PER_BLOCK;
        const int8_t *qb = q + n * K;
        const int32_t *sb = block_sums + n * blocks;
        const size_t es = is_bf16 ? 2 : 4;
        const char *bb = bias ? (const char *)bias + n * es : 0;
        for (int64_t m = 0; m < M; m += X_PER_TILE) {
            const uint8_t *xt = xq + m * padded;
            const float *st = xscale + m * blocks;
            char *yt = (char *)y + (m * ldy + n) * es;
            if (n + ROWS_PER_BLOCK > N) {  // the last, partial block of weight rows: one row at a time
                for (int64_t r = 0; r < N - n; r++)
                    for (int64_t i = 0; i < X_PER_TILE && m + i < M; i++)
                        tile_q8(xt + i * padded, st + i * blocks, K, blocks, qb + r * K, scale + n + r,
                                sb + r * blocks, bb ? bb + r * es : 0, yt + (i * ldy + r) * es, ldy, 1, 1,
                                is_bf16);
                continue;
            }
            switch (M - m) {
                case 1: tile_q8(xt, st, K, blocks, qb, scale + n, sb, bb, yt, ldy, 1, ROWS_PER_BLOCK, is_bf16); break;
                case 2: tile_q8(xt, st, K, blocks, qb, scale + n, sb, bb, yt, ldy, 2, ROWS_PER_BLOCK, is_bf16); break;
                case 3: tile_q8(xt, st, K, blocks, qb, scale + n, sb, bb, yt, ldy, 3, ROWS_PER_BLOCK, is_bf16); break;
                default: tile_q8(xt, st, K, blocks, qb, scale + n, sb, bb, yt, ldy, 4, ROWS_PER_BLOCK, is_bf16); break;
            }
        }
    }
    free(xq);
    free(xscale);
    return 0;
#else
    (void)x; (void)ldx; (void)q; (void)scale; (void)block_sums; (void)bias; (void)y; (void)ldy; (void)M; (void)N;
    (void)K; (void)num_threads; (void)is_bf16;
    return 1;
#endif
}

int skinny_gemm_q8_f32(
    const void *x, int64_t ldx, const int8_t *q, const float *scale, const int32_t *block_sums,
    const void *bias, void *y, int64_t ldy, int64_t M, int64_t N, int64_t K, int num_threads
) {
    return gemm_q8(x, ldx, q, scale, block_sums, bias, y, ldy, M, N, K, num_threads, 0);
}

int skinny_gemm_q8_bf16(
    const void *x, int64_t ldx, const int8_t *q, const float *scale, const int32_t *block_sums,
    const void *bias, void *y, int64_t ldy, int64_t M, int64_t N, int64_t K, int num_threads
) {
    return gemm_q8(x, ldx, q, scale, block_sums, bias, y, ldy, M, N, K, num_threads, 1);
}

// out[n, k] = q[n, k] * scale[n] in the activations' dtype: the whole matrix, for products with many rows
// (prefill chunks), which are compute-bound and go to torch's GEMM. One pass, all threads.
void dequantize_q8(const int8_t *q, const float *scale, void *out, int64_t N, int64_t K, int num_threads,
                   int is_bf16) {
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t n = 0; n < N; n++)
        for (int64_t k = 0; k < K; k++) store(out, n * K + k, (float)q[n * K + k] * scale[n], is_bf16);
}

// ---- fused small operators ----------------------------------------------------------------------------

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

// out = silu(gate) * up for the [gate | up] halves of each row of `gate_up` (I values each): silu rounded
// to the dtype, then the product, as torch's two ops do.
static inline __attribute__((always_inline)) void silu_mul(
    const void *gate_up, int64_t ld, void *out, int64_t ldo, int64_t M, int64_t I, int is_bf16
) {
    for (int64_t m = 0; m < M; m++)
        for (int64_t i = 0; i < I; i++) {
            float gate = load(gate_up, m * ld + i, is_bf16), up = load(gate_up, m * ld + I + i, is_bf16);
            store(out, m * ldo + i, held(gate / (1.0f + expf(-gate)), is_bf16) * up, is_bf16);
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
    }                                                                                                   \
    void silu_mul_##suffix(const void *gate_up, int64_t ld, void *out, int64_t ldo, int64_t M, int64_t I) { \
        silu_mul(gate_up, ld, out, ldo, M, I, is_bf16);                                                 \
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
