/* paged_decode_bf16 by tiles of 16 rows, on CPUs with BF16 dot products (included by paged_decode.c).
 *
 * A prompt chunk's tokens are rows of a step too, each a query over its sequence's cache up to itself, and
 * the vector kernel scores them one row at a time at about the CPU's float32 rate. Here the rows that share
 * a context (consecutive tokens of one sequence, times the query heads of a KV head) go 16 to a tile, and
 * their scores and weighted values are computed 32 cached positions at a time, each read of the context
 * shared by the tile's rows: by AMX tile multiplies where the CPU has them (256 BF16 dot products an
 * instruction), else by AVX-512 BF16 dot products in vectors that sum exactly as a tile multiply does.
 * A 512-token prompt's attention: 3-4x faster than the vector kernel with AMX, 2.2x on a 2-core EPYC
 * without (22 against 47 ms over 30 layers); a decode's, level with it.
 *
 * Per step of 32 positions, for a tile of rows (r) and the positions (p):
 *   scores^T[p][r] = K[p] . q[r]    K straight from the cache (the left tile, or broadcast pairs), q^T
 *                                   packed once per run; a few rows take K^T instead (few_rows_scores)
 *   an online softmax: each row's running maximum m, sum l and float32 output o, rescaled by exp(m - m')
 *   o[r] += P[r] . V                P rounded to bfloat16, V's rows paired (the right tile's layout)
 * Each row's result depends on its own query and context only: the steps start at multiples of 32 positions
 * whatever rows share its tile, every score and weighted value is the same float32 sum of pairs in the same
 * order whichever way it is computed, positions outside a row's context weigh exactly zero, and a step with
 * none of them leaves its sums as they were. So a token gets the same attention as a prompt token, as a
 * decode or in any batch, as the vector kernel's rows do. It differs from the vector kernel in the last
 * bits: the softmax is online, and P is rounded to bfloat16.
 */
#include "amx.c"
#if defined(__AVX512BF16__)
#define PAGED_TILES 1
#define TILE_ROWS 16

#define STEP_POSITIONS 32 /* two tiles of 16 positions; also the pairs of positions a tile of P holds */
#define RUN_ROWS 64       /* (token, head) rows a job takes at most: four tiles */
#define MAX_TILE_DIM 256  /* the head sizes the tiles take: multiples of 32 up to this */
#define FAR_STEPS 3       /* a few rows also ask for their context this many steps ahead, into L2 */
#define FEW_ROWS 6        /* a tile of this many rows or fewer (a decode's query heads): see softmax_few_rows */

/* Per-thread buffers of a job (64-byte aligned rows, as tile loads and stores read them). */
typedef struct {
    uint32_t qt[RUN_ROWS / TILE_ROWS][MAX_TILE_DIM / 2][TILE_ROWS]; /* q^T: [pair of dims][row] */
    uint32_t values[STEP_POSITIONS / 2][MAX_TILE_DIM];             /* V: [pair of positions][dim] */
    float scores[STEP_POSITIONS][TILE_ROWS];                        /* [position][row] */
    uint32_t keys_t[2][MAX_TILE_DIM / 2][TILE_ROWS];                /* K^T: [half][pair of dims][position] */
    uint32_t weights[TILE_ROWS][STEP_POSITIONS / 2];                /* P: [row][pair of positions] */
    float step_out[TILE_ROWS][MAX_TILE_DIM];                        /* P . V of the step */
    float out[RUN_ROWS][MAX_TILE_DIM];                             /* o */
    float max[RUN_ROWS], sum[RUN_ROWS];                            /* m, l */
    int32_t lo[RUN_ROWS], hi[RUN_ROWS];                            /* each row's positions [lo, hi) */
    float (*few)[FEW_ROWS][STEP_POSITIONS]; /* a few rows' scores, [step][row][position]: see attend_run */
} TileScratch;

/* e^x on 16 lanes, within ~2 ulp: 2^n e^r with n = round(x / ln 2), so |r| <= ln 2 / 2, where a degree-6
 * Taylor polynomial is exact to float32 rounding. Below -103 (ln of the smallest denormal) it is 0, and
 * exactly 0 at -inf: a masked position must weigh nothing. */
static inline __m512 exp16(__m512 x) {
    const __mmask16 zero = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-103.0f), _CMP_LT_OQ);
    x = _mm512_max_ps(x, _mm512_set1_ps(-103.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    /* r = x - n ln 2, with ln 2 in two parts so n ln 2 is exact enough */
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_maskz_scalef_ps((__mmask16)~zero, p, n);
}

/* The 16 x 16 transpose of 32-bit elements: v[i] lane j <-> v[j] lane i. */
static inline void transpose16(__m512i v[16]) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(v[i], v[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(v[i], v[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        v[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        v[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        v[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        v[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int i = 0; i < 4; i++) { /* 128-bit lanes: rows 4i..4i+3 of each quarter */
        t[i] = _mm512_shuffle_i32x4(v[i], v[i + 4], 0x88);
        t[i + 4] = _mm512_shuffle_i32x4(v[i], v[i + 4], 0xDD);
        t[i + 8] = _mm512_shuffle_i32x4(v[i + 8], v[i + 12], 0x88);
        t[i + 12] = _mm512_shuffle_i32x4(v[i + 8], v[i + 12], 0xDD);
    }
    for (int i = 0; i < 4; i++) {
        v[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
        v[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xDD);
        v[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
        v[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xDD);
    }
}

/* The online softmax of a step, for a tile's rows [base, base + 16): scores (raw dot products,
 * [position][row]) to weights (bfloat16, [row][pair of positions]), each row's running maximum and sum
 * updated, and rescale[r] = exp(m - m') for its output. Two ways with the same arithmetic on every value,
 * so the same bits: on vectors over the 16 rows (a tile of prompt tokens), or row by row on vectors over the
 * positions (a tile of FEW_ROWS rows or fewer, such as one decode token's query heads). The weights of a
 * step sum as a tree: positions p and p + 16, then p and p + 8, ... */
static inline void softmax_rows(TileScratch *s, int64_t base, int64_t step, float scale, float *rescale) {
    const __m512i row_lo = _mm512_load_si512(s->lo + base), row_hi = _mm512_load_si512(s->hi + base);
    const __m512 minus_inf = _mm512_set1_ps(-INFINITY), scale16 = _mm512_set1_ps(scale);
    __m512 step_max = minus_inf;
    for (int p = 0; p < STEP_POSITIONS; p++) {
        const __m512i at = _mm512_set1_epi32((int32_t)(step + p));
        const __mmask16 seen = _mm512_cmpge_epi32_mask(at, row_lo) & _mm512_cmplt_epi32_mask(at, row_hi);
        const __m512 score = _mm512_mask_mul_ps(minus_inf, seen, _mm512_load_ps(s->scores[p]), scale16);
        _mm512_store_ps(s->scores[p], score);
        step_max = _mm512_max_ps(step_max, score);
    }
    const __m512 before = _mm512_load_ps(s->max + base), now = _mm512_max_ps(before, step_max);
    _mm512_store_ps(s->max + base, now);
    /* No position seen yet: shift by 0, so the weights are exp(-inf) = 0, not NaN. */
    const __m512 shift = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(now, minus_inf, _CMP_EQ_OQ), now,
                                              _mm512_setzero_ps());
    const __m512 factor = exp16(_mm512_sub_ps(before, shift));
    _mm512_store_ps(rescale, factor);
    __m512 weights[STEP_POSITIONS];
    __m512i columns[STEP_POSITIONS / 2]; /* columns[k][r] = row r's weights at positions 2k and 2k + 1 */
    for (int p = 0; p < STEP_POSITIONS; p += 2) {
        const __m256i even = (__m256i)_mm512_cvtneps_pbh(exp16(_mm512_sub_ps(_mm512_load_ps(s->scores[p]), shift)));
        const __m256i odd = (__m256i)_mm512_cvtneps_pbh(exp16(_mm512_sub_ps(_mm512_load_ps(s->scores[p + 1]), shift)));
        const __m512i even32 = _mm512_cvtepu16_epi32(even), odd32 = _mm512_cvtepu16_epi32(odd);
        weights[p] = _mm512_castsi512_ps(_mm512_slli_epi32(even32, 16));
        weights[p + 1] = _mm512_castsi512_ps(_mm512_slli_epi32(odd32, 16));
        columns[p / 2] = _mm512_or_si512(even32, _mm512_slli_epi32(odd32, 16));
    }
    for (int width = STEP_POSITIONS / 2; width > 0; width /= 2)
        for (int p = 0; p < width; p++) weights[p] = _mm512_add_ps(weights[p], weights[p + width]);
    _mm512_store_ps(s->sum + base, _mm512_fmadd_ps(_mm512_load_ps(s->sum + base), factor, weights[0]));
    transpose16(columns);
    for (int r = 0; r < TILE_ROWS; r++) _mm512_store_si512(s->weights[r], columns[r]);
}

static inline void softmax_few_rows(TileScratch *s, int64_t base, int64_t real, int64_t step, float scale,
                                    float *rescale, const float (*raw)[STEP_POSITIONS]) {
    const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i at_low = _mm512_add_epi32(iota, _mm512_set1_epi32((int32_t)step));
    const __m512i at_high = _mm512_add_epi32(at_low, _mm512_set1_epi32(TILE_ROWS));
    const __m512 minus_inf = _mm512_set1_ps(-INFINITY), scale16 = _mm512_set1_ps(scale);
    for (int64_t r = 0; r < real; r++) {
        const __m512i row_lo = _mm512_set1_epi32(s->lo[base + r]), row_hi = _mm512_set1_epi32(s->hi[base + r]);
        const __mmask16 seen_low = _mm512_cmpge_epi32_mask(at_low, row_lo) & _mm512_cmplt_epi32_mask(at_low, row_hi);
        const __mmask16 seen_high = _mm512_cmpge_epi32_mask(at_high, row_lo) & _mm512_cmplt_epi32_mask(at_high, row_hi);
        const __m512 low = _mm512_mask_mul_ps(minus_inf, seen_low, _mm512_load_ps(raw[r]), scale16);
        const __m512 high = _mm512_mask_mul_ps(minus_inf, seen_high, _mm512_load_ps(raw[r] + TILE_ROWS), scale16);
        const float before = s->max[base + r], step_max = _mm512_reduce_max_ps(_mm512_max_ps(low, high));
        const float now = step_max > before ? step_max : before, shift = now == -INFINITY ? 0.0f : now;
        s->max[base + r] = now;
        rescale[r] = _mm512_cvtss_f32(exp16(_mm512_set1_ps(before - shift)));
        const __m512 shift16 = _mm512_set1_ps(shift);
        const __m512i rounded = (__m512i)_mm512_cvtne2ps_pbh(exp16(_mm512_sub_ps(high, shift16)),
                                                             exp16(_mm512_sub_ps(low, shift16)));
        _mm512_store_si512(s->weights[r], rounded);
        const __m512 weight_low = _mm512_castsi512_ps(
            _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(rounded)), 16));
        const __m512 weight_high = _mm512_castsi512_ps(
            _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(rounded, 1)), 16));
        const __m512 sum16 = _mm512_add_ps(weight_low, weight_high);
        const __m256 sum8 = _mm256_add_ps(_mm512_castps512_ps256(sum16), _mm512_extractf32x8_ps(sum16, 1));
        const __m128 sum4 = _mm_add_ps(_mm256_castps256_ps128(sum8), _mm256_extractf128_ps(sum8, 1));
        const __m128 sum2 = _mm_add_ps(sum4, _mm_movehl_ps(sum4, sum4));
        const __m128 sum1 = _mm_add_ss(sum2, _mm_shuffle_ps(sum2, sum2, 1));
        s->sum[base + r] = _mm_cvtss_f32(_mm_fmadd_ss(_mm_set_ss(s->sum[base + r]), _mm_set_ss(rescale[r]), sum1));
    }
}

/* ---- the two products of a step: by AMX tile multiplies, or by BF16 dot products in vectors ------------
 * The vectors compute what a tile multiply does, each output a float32 sum over pairs of inputs in order,
 * so a row's arithmetic is the same whichever rows share its tile. */

/* The scores of a few rows by vectors over positions: raw[r][p] = q[r] . K[p] for r < R, from K^T (the
 * step's keys transposed, s->keys_t). */
static inline __attribute__((always_inline)) void few_rows_scores(TileScratch *s, int64_t t, int64_t pairs,
                                                                  float (*raw)[STEP_POSITIONS], const int R) {
    __m512 sums[FEW_ROWS][2];
    for (int r = 0; r < R; r++) sums[r][0] = sums[r][1] = _mm512_setzero_ps();
    for (int64_t d = 0; d < pairs; d++) {
        const __m512bh low = (__m512bh)_mm512_load_si512(s->keys_t[0][d]);
        const __m512bh high = (__m512bh)_mm512_load_si512(s->keys_t[1][d]);
        for (int r = 0; r < R; r++) {
            const __m512bh q = (__m512bh)_mm512_set1_epi32((int32_t)s->qt[t][d][r]);
            sums[r][0] = _mm512_dpbf16_ps(sums[r][0], q, low);
            sums[r][1] = _mm512_dpbf16_ps(sums[r][1], q, high);
        }
    }
    for (int r = 0; r < R; r++) {
        _mm512_store_ps(raw[r], sums[r][0]);
        _mm512_store_ps(raw[r] + TILE_ROWS, sums[r][1]);
    }
}

/* s->keys_t: the step's keys transposed, pairs of dimensions by positions (zero for a NULL half). Each
 * row is read whole (the hardware prefetcher follows rows better than columns), and meanwhile the same row
 * of the halves in `ahead` is asked for (NULL: none): of the next step into L1, of the one FAR_STEPS on
 * into L2. */
static inline void transpose_keys(TileScratch *s, const uint16_t *const half_keys[2],
                                  const uint16_t *const ahead[2][2], int64_t head_dim) {
    for (int h = 0; h < 2; h++) {
        if (!half_keys[h]) {
            memset(s->keys_t[h], 0, sizeof(uint32_t) * TILE_ROWS * (size_t)(head_dim / 2));
            continue;
        }
        for (int p = 0; p < TILE_ROWS; p++) {
            for (int64_t d = 0; ahead[0][h] && d < head_dim; d += 32) {
                _mm_prefetch((const char *)(ahead[0][h] + p * head_dim + d), _MM_HINT_T0);
                if (ahead[1][h]) _mm_prefetch((const char *)(ahead[1][h] + p * head_dim + d), _MM_HINT_T2);
            }
            for (int64_t d = 0; d < head_dim / 2; d += TILE_ROWS)
                _mm512_store_si512(s->keys_t[h][d + p], _mm512_loadu_si512(half_keys[h] + p * head_dim + 2 * d));
        }
        for (int64_t d = 0; d < head_dim / 2; d += TILE_ROWS) {
            __m512i block[TILE_ROWS];
            for (int p = 0; p < TILE_ROWS; p++) block[p] = _mm512_load_si512(s->keys_t[h][d + p]);
            transpose16(block);
            for (int i = 0; i < TILE_ROWS; i++) _mm512_store_si512(s->keys_t[h][d + i], block[i]);
        }
    }
}

/* The scores of tile t's rows (the first `real` of them real) for the step's two halves of 16 positions
 * (NULL: a half outside every row's context; its scores are 0 and the softmax masks them): in
 * s->scores[p][r], or for FEW_ROWS rows or fewer in raw[r][p]. `ahead`: as transpose_keys takes it. */
static inline void step_scores(TileScratch *s, int64_t t, int64_t real, const uint16_t *const half_keys[2],
                               const uint16_t *const ahead[2][2], int64_t head_dim, int amx,
                               float (*raw)[STEP_POSITIONS]) {
    const int64_t pairs = head_dim / 2;
#if defined(TOKENMILL_AMX)
    if (amx) { /* tiles 0 and 1 the two halves of positions, 4 the keys, 6 q^T */
        _tile_zero(0);
        _tile_zero(1);
        for (int64_t d = 0; d < head_dim; d += 32) {
            _tile_loadd(6, &s->qt[t][d / 2][0], TILE_ROWS * 4);
            if (half_keys[0]) {
                _tile_loadd(4, half_keys[0] + d, head_dim * 2);
                _tile_dpbf16ps(0, 4, 6);
            }
            if (half_keys[1]) {
                _tile_loadd(4, half_keys[1] + d, head_dim * 2);
                _tile_dpbf16ps(1, 4, 6);
            }
        }
        _tile_stored(0, &s->scores[0][0], TILE_ROWS * 4);
        _tile_stored(1, &s->scores[TILE_ROWS][0], TILE_ROWS * 4);
        if (real <= FEW_ROWS)
            for (int h = 0; h < 2; h++) {
                __m512i rows[TILE_ROWS];
                for (int p = 0; p < TILE_ROWS; p++) rows[p] = _mm512_load_si512(s->scores[h * TILE_ROWS + p]);
                transpose16(rows);
                for (int64_t r = 0; r < real; r++) _mm512_store_si512(raw[r] + h * TILE_ROWS, rows[r]);
            }
        return;
    }
#endif
    (void)amx;
    if (real <= FEW_ROWS) {
        transpose_keys(s, half_keys, ahead, head_dim);
        switch (real) {
            case 1: few_rows_scores(s, t, pairs, raw, 1); break;
            case 2: few_rows_scores(s, t, pairs, raw, 2); break;
            case 3: few_rows_scores(s, t, pairs, raw, 3); break;
            case 4: few_rows_scores(s, t, pairs, raw, 4); break;
            case 5: few_rows_scores(s, t, pairs, raw, 5); break;
            default: few_rows_scores(s, t, pairs, raw, 6); break;
        }
        return;
    }
    /* Vectors over the tile's rows: sums[p] lane r is row r's score at position p. */
    for (int h = 0; h < 2; h++) {
        __m512 sums[TILE_ROWS];
        for (int p = 0; p < TILE_ROWS; p++) sums[p] = _mm512_setzero_ps();
        if (half_keys[h]) {
            const uint32_t *keys = (const uint32_t *)half_keys[h];
            for (int64_t d = 0; d < pairs; d++) {
                const __m512bh qt = (__m512bh)_mm512_load_si512(s->qt[t][d]);
                for (int p = 0; p < TILE_ROWS; p++)
                    sums[p] = _mm512_dpbf16_ps(sums[p], (__m512bh)_mm512_set1_epi32((int32_t)keys[p * pairs + d]), qt);
            }
        }
        for (int p = 0; p < TILE_ROWS; p++) _mm512_store_ps(s->scores[h * TILE_ROWS + p], sums[p]);
    }
}

/* P . V for R rows (up to 4) from r0 and `parts` slices of 16 dimensions from d: the sums stay in
 * registers while the step's pairs of positions go by. */
static inline __attribute__((always_inline)) void values_by_vectors(TileScratch *s, int64_t r0, int64_t d,
                                                                    const int parts, const int R) {
    __m512 sums[4][4];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < parts; c++) sums[r][c] = _mm512_setzero_ps();
    for (int k = 0; k < STEP_POSITIONS / 2; k++) {
        __m512bh v[4];
        for (int c = 0; c < parts; c++) v[c] = (__m512bh)_mm512_load_si512(&s->values[k][d + 16 * c]);
        for (int r = 0; r < R; r++) {
            const __m512bh w = (__m512bh)_mm512_set1_epi32((int32_t)s->weights[r0 + r][k]);
            for (int c = 0; c < parts; c++) sums[r][c] = _mm512_dpbf16_ps(sums[r][c], w, v[c]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < parts; c++) _mm512_store_ps(&s->step_out[r0 + r][d + 16 * c], sums[r][c]);
}

/* values_by_vectors for `rows` (1 to 4) rows, each count its own code. */
static inline __attribute__((always_inline)) void values_of_rows(TileScratch *s, int64_t r0, int64_t d,
                                                                 const int parts, int64_t rows) {
    switch (rows) {
        case 1: values_by_vectors(s, r0, d, parts, 1); break;
        case 2: values_by_vectors(s, r0, d, parts, 2); break;
        case 3: values_by_vectors(s, r0, d, parts, 3); break;
        default: values_by_vectors(s, r0, d, parts, 4); break;
    }
}

/* s->step_out[r] = P[r] . V for the tile's first `real` rows (by tiles: all 16). */
static inline void step_values(TileScratch *s, int64_t real, int64_t head_dim, int amx) {
#if defined(TOKENMILL_AMX)
    if (amx) { /* 64 dimensions (four tiles of 16) at a time: tiles 0-3 the sums, 5 P, 6 V */
        _tile_loadd(5, &s->weights[0][0], STEP_POSITIONS * 2);
        for (int64_t d = 0; d < head_dim; d += 64) {
            const int64_t parts = head_dim - d < 64 ? (head_dim - d) / 16 : 4;
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            _tile_loadd(6, &s->values[0][d], MAX_TILE_DIM * 4);
            _tile_dpbf16ps(0, 5, 6);
            _tile_loadd(6, &s->values[0][d + 16], MAX_TILE_DIM * 4);
            _tile_dpbf16ps(1, 5, 6);
            _tile_stored(0, &s->step_out[0][d], MAX_TILE_DIM * 4);
            _tile_stored(1, &s->step_out[0][d + 16], MAX_TILE_DIM * 4);
            if (parts == 4) {
                _tile_loadd(6, &s->values[0][d + 32], MAX_TILE_DIM * 4);
                _tile_dpbf16ps(2, 5, 6);
                _tile_loadd(6, &s->values[0][d + 48], MAX_TILE_DIM * 4);
                _tile_dpbf16ps(3, 5, 6);
                _tile_stored(2, &s->step_out[0][d + 32], MAX_TILE_DIM * 4);
                _tile_stored(3, &s->step_out[0][d + 48], MAX_TILE_DIM * 4);
            }
        }
        return;
    }
#endif
    (void)amx;
    for (int64_t r0 = 0; r0 < real; r0 += 4)
        for (int64_t d = 0; d < head_dim; d += 64) {
            const int64_t rows = real - r0 < 4 ? real - r0 : 4;
            if (head_dim - d >= 64) values_of_rows(s, r0, d, 4, rows);
            else values_of_rows(s, r0, d, 2, rows);
        }
}

/* Indices interleaving two vectors of 32 bfloat16 (a, b) as a0 b0 a1 b1 ..., from lane 0 or lane 16 on. */
static const uint16_t PAIR_LOW[32] __attribute__((aligned(64))) = {
    0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39, 8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
static const uint16_t PAIR_HIGH[32] __attribute__((aligned(64))) = {
    16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
    24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};

/* The cache rows of a step's two halves of 16 positions, each consecutive in the cache (blocks hold
 * multiples of 16); NULL for a half wholly outside [lo, hi) (its block may not be this sequence's). */
static inline void step_halves(const uint16_t *cache, const int64_t *table, int64_t block_size, int64_t head_dim,
                               int64_t step, int64_t lo, int64_t hi, const uint16_t *half[2]) {
    for (int h = 0; h < 2; h++) {
        const int64_t at = step + h * TILE_ROWS;
        half[h] = at + TILE_ROWS > lo && at < hi
                      ? cache + (table[at / block_size] * block_size + at % block_size) * head_dim
                      : NULL;
    }
}

/* Asks for the cache lines of a step's halves at once (a run's first step: nothing to overlap with). */
static inline void prefetch_halves(const uint16_t *const half[2], int64_t head_dim) {
    for (int h = 0; h < 2; h++)
        for (int64_t d = 0; half[h] && d < TILE_ROWS * head_dim; d += 32) _mm_prefetch((const char *)(half[h] + d), _MM_HINT_T0);
}

/* Rows [first_row, first_row + tokens) of the step, one run, with KV head kvh: `group` query heads each. */
static void attend_run(TileScratch *s, const uint16_t *q, const uint16_t *keys, const uint16_t *values,
                       const int64_t *table, const int64_t *context_lens, uint16_t *out, int64_t first_row,
                       int64_t tokens, int64_t group, int64_t kvh, int64_t num_heads, int64_t head_dim,
                       int64_t block_size, int64_t window, float scale, int amx) {
    const int64_t rows = tokens * group, tiles = (rows + TILE_ROWS - 1) / TILE_ROWS, pairs = head_dim / 2;
    /* A tile's lanes past the run keep an earlier run's (finite) queries: those rows see no position. */
    for (int64_t r = 0; r < tiles * TILE_ROWS; r++) {
        s->max[r] = -INFINITY;
        s->sum[r] = 0.0f;
        s->lo[r] = s->hi[r] = 0;
        if (r >= rows) continue;
        const int64_t row = first_row + r / group, head = kvh * group + r % group, end = context_lens[row];
        s->lo[r] = (int32_t)(window > 0 && end > window ? end - window : 0);
        s->hi[r] = (int32_t)end;
        memset(s->out[r], 0, sizeof(float) * (size_t)head_dim);
        uint32_t query[MAX_TILE_DIM / 2];
        memcpy(query, q + (row * num_heads + head) * head_dim, sizeof(uint16_t) * (size_t)head_dim);
        for (int64_t d = 0; d < pairs; d++) s->qt[r / TILE_ROWS][d][r % TILE_ROWS] = query[d];
    }
    const int64_t lo = s->lo[0], hi = s->hi[rows - 1], first_step = lo / STEP_POSITIONS * STEP_POSITIONS;
    const __m512i pair_low = _mm512_load_si512(PAIR_LOW), pair_high = _mm512_load_si512(PAIR_HIGH);
    /* A run of a few rows (a decode's query heads) on vectors takes every step's scores first, reading the
     * keys, then the rest step by step, reading the values: two streams from memory, each asked for a step
     * ahead into L1 and FAR_STEPS ahead into L2, a row at a time. Reading both in each step took ~15% longer
     * for a decode's context, asking for it all a step ahead ~5% (more steps ahead into L1 did worse). The
     * same sums either way. */
    const int scores_first = !amx && rows <= FEW_ROWS;
    const uint16_t *none[2][2] = {{NULL, NULL}, {NULL, NULL}};
    for (int64_t step = first_step; scores_first && step < hi; step += STEP_POSITIONS) {
        const uint16_t *half_keys[2], *ahead[2][2];
        step_halves(keys, table, block_size, head_dim, step, lo, hi, half_keys);
        step_halves(keys, table, block_size, head_dim, step + STEP_POSITIONS, lo, hi, ahead[0]);
        step_halves(keys, table, block_size, head_dim, step + FAR_STEPS * STEP_POSITIONS, lo, hi, ahead[1]);
        if (step == first_step) prefetch_halves(half_keys, head_dim);
        step_scores(s, 0, rows, half_keys, ahead, head_dim, amx, s->few[(step - first_step) / STEP_POSITIONS]);
    }
    for (int64_t step = first_step; step < hi; step += STEP_POSITIONS) {
        const uint16_t *half_keys[2], *next_keys[2] = {NULL, NULL}, *next_values[2], *far_values[2] = {NULL, NULL};
        step_halves(keys, table, block_size, head_dim, step, lo, hi, half_keys);
        /* The next step's values (and keys, unless read already), asked for a slice at a time while this
         * step's are read: a sequence's blocks lie anywhere in the cache, where the hardware prefetcher does
         * not follow, and a burst of requests at once would stall this step's own reads behind them. */
        step_halves(values, table, block_size, head_dim, step + STEP_POSITIONS, lo, hi, next_values);
        if (!scores_first) step_halves(keys, table, block_size, head_dim, step + STEP_POSITIONS, lo, hi, next_keys);
        else {
            step_halves(values, table, block_size, head_dim, step + FAR_STEPS * STEP_POSITIONS, lo, hi, far_values);
            if (step == first_step) {
                const uint16_t *half_values[2];
                step_halves(values, table, block_size, head_dim, step, lo, hi, half_values);
                prefetch_halves(half_values, head_dim);
            }
        }
        /* V's rows of the step two by two, interleaved as a right tile wants them; zero outside [lo, hi),
         * where a weight of zero must not meet a NaN of an unwritten slot. */
        for (int64_t k = 0; k < STEP_POSITIONS / 2; k++) {
            const int64_t at = step + 2 * k;
            const int64_t lines = head_dim / 16, half = 2 * k / TILE_ROWS; /* a half's lines, over 8 pairs */
            for (int64_t line = k % 8 * lines; next_values[half] && line < (k % 8 + 1) * lines; line++) {
                _mm_prefetch((const char *)next_values[half] + 64 * line, _MM_HINT_T0);
                if (far_values[half]) _mm_prefetch((const char *)far_values[half] + 64 * line, _MM_HINT_T2);
                if (next_keys[half]) _mm_prefetch((const char *)next_keys[half] + 64 * line, _MM_HINT_T0);
            }
            const uint16_t *even = 0, *odd = 0;
            if (half_keys[half]) {
                const uint16_t *base = values + (table[at / block_size] * block_size + at % block_size) * head_dim;
                if (at >= lo && at < hi) even = base;
                if (at + 1 >= lo && at + 1 < hi) odd = base + head_dim;
            }
            for (int64_t d = 0; d < head_dim; d += 32) {
                const __m512i a = even ? _mm512_loadu_si512(even + d) : _mm512_setzero_si512();
                const __m512i b = odd ? _mm512_loadu_si512(odd + d) : _mm512_setzero_si512();
                _mm512_store_si512(&s->values[k][d], _mm512_permutex2var_epi16(a, pair_low, b));
                _mm512_store_si512(&s->values[k][d + 16], _mm512_permutex2var_epi16(a, pair_high, b));
            }
        }
        for (int64_t t = 0; t < tiles; t++) {
            const int64_t base = t * TILE_ROWS;
            const int64_t real = rows - base < TILE_ROWS ? rows - base : TILE_ROWS;
            float(*raw)[STEP_POSITIONS] = s->few[scores_first ? (step - first_step) / STEP_POSITIONS : 0];
            if (!scores_first) step_scores(s, t, real, half_keys, none, head_dim, amx, raw);
            float rescale[TILE_ROWS] __attribute__((aligned(64)));
            if (real <= FEW_ROWS) softmax_few_rows(s, base, real, step, scale, rescale, (const float(*)[STEP_POSITIONS])raw);
            else softmax_rows(s, base, step, scale, rescale);
            step_values(s, real, head_dim, amx);
            for (int64_t r = 0; r < real; r++) {
                const __m512 factor = _mm512_set1_ps(rescale[r]);
                for (int64_t d = 0; d < head_dim; d += 16)
                    _mm512_store_ps(s->out[base + r] + d, _mm512_fmadd_ps(_mm512_load_ps(s->out[base + r] + d), factor,
                                                                           _mm512_load_ps(s->step_out[r] + d)));
            }
        }
    }
    for (int64_t r = 0; r < rows; r++) {
        const int64_t row = first_row + r / group, head = kvh * group + r % group;
        uint16_t *dst = out + (row * num_heads + head) * head_dim;
        const float inv = 1.0f / s->sum[r];
        for (int64_t d = 0; d < head_dim; d++) dst[d] = float_to_bf16(s->out[r][d] * inv);
    }
}

/* 1 if the tiles take this shape, else 0: the vector kernel runs. */
static int tiles_take(int64_t head_dim, int64_t group, int64_t block_size) {
    return head_dim % 32 == 0 && head_dim <= MAX_TILE_DIM && group <= TILE_ROWS && block_size % TILE_ROWS == 0;
}

/* The calling thread's scratch with room for `few_steps` steps of a few rows' scores, kept from call to call
 * (a step calls once per layer); zeroed once, so every lane a tile reads holds a finite value. NULL if out
 * of memory. */
static TileScratch *thread_scratch(int64_t few_steps) {
    static __thread TileScratch *scratch;
    static __thread int64_t capacity;
    const size_t bytes = (sizeof(TileScratch) + 63) / 64 * 64;
    if (scratch == NULL && (scratch = aligned_alloc(64, bytes)) != NULL) memset(scratch, 0, bytes);
    if (scratch == NULL) return NULL;
    if (few_steps > capacity) {
        free(scratch->few);
        scratch->few = aligned_alloc(64, sizeof *scratch->few * (size_t)few_steps);
        capacity = scratch->few != NULL ? few_steps : 0;
    }
    return scratch->few != NULL ? scratch : NULL;
}

/* paged_decode_bf16's arguments and result. */
static int paged_tiles_bf16(const uint16_t *q, const uint16_t *k_cache, const uint16_t *v_cache,
                            const int64_t *block_tables, const int64_t *context_lens, uint16_t *out,
                            int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                            int64_t num_slots, int64_t max_blocks, int64_t block_size, int64_t window,
                            float scale) {
    const int64_t group = num_heads / num_kv_heads, run_tokens = RUN_ROWS / group;
    int64_t *starts = malloc(sizeof(int64_t) * (size_t)(num_seqs + 1)), runs = 0;
    if (starts == NULL) return 2;
    for (int64_t i = 0; i < num_seqs; i++)
        if (i == 0 || i - starts[runs - 1] == run_tokens
            || !continues_run(block_tables, context_lens, i, max_blocks, block_size))
            starts[runs++] = i;
    starts[runs] = num_seqs;
#if defined(TOKENMILL_AMX)
    const int amx = amx_ready(); /* Linux lets the process use the tiles */
#else
    const int amx = 0;
#endif
    int64_t longest = 0;
    for (int64_t i = 0; i < num_seqs; i++) longest = context_lens[i] > longest ? context_lens[i] : longest;
    const int64_t few_steps = amx ? 1 : longest / STEP_POSITIONS + 2; /* attend_run's scores_first */
    int failed = 0;
    _Pragma("omp parallel") {
        TileScratch *scratch = thread_scratch(few_steps);
        if (scratch == NULL) failed = 1;
#if defined(TOKENMILL_AMX)
        else if (amx) amx_configure();
#endif
        _Pragma("omp for schedule(dynamic, 1)")
        for (int64_t job = 0; job < runs * num_kv_heads; job++) {
            if (scratch == NULL) continue;
            const int64_t run = job / num_kv_heads, kvh = job % num_kv_heads, first_row = starts[run];
            attend_run(scratch, q, k_cache + kvh * num_slots * head_dim, v_cache + kvh * num_slots * head_dim,
                       block_tables + first_row * max_blocks, context_lens, out, first_row,
                       starts[run + 1] - first_row, group, kvh, num_heads, head_dim, block_size, window, scale, amx);
        }
#if defined(TOKENMILL_AMX)
        if (scratch != NULL && amx) _tile_release();
#endif
    }
    free(starts);
    return failed ? 2 : 0;
}
#endif
