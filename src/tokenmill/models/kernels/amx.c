// AMX: Intel's tile registers and tile multiplies (Sapphire Rapids and later), for the kernels that use
// them (cpu_ops.c's packed products, paged_tiles.c's attention). Linux hands the tiles out only to a
// process that asks once (ARCH_REQ_XCOMP_PERM); each thread then loads a configuration before its first
// tile instruction and releases the tiles after its last, so its saved state stays small.
#ifndef TOKENMILL_AMX
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__linux__)
#define TOKENMILL_AMX 1
#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
#define AMX_ROWS 16  // rows of every tile: 16 rows of 64 bytes (32 bfloat16 or 16 float32)

static int amx_granted = -1;

// 1 once Linux lets this process use the tiles (asked on the first call, from the calling thread).
static int amx_ready(void) {
    if (amx_granted < 0) amx_granted = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
    return amx_granted;
}

// All eight tiles 16 rows of 64 bytes: what every kernel here uses.
static void amx_configure(void) {
    struct {
        uint8_t palette, start_row, reserved[14];
        uint16_t colsb[16];
        uint8_t rows[16];
    } config;
    memset(&config, 0, sizeof config);
    config.palette = 1;
    for (int t = 0; t < 8; t++) {
        config.colsb[t] = 64;
        config.rows[t] = AMX_ROWS;
    }
    _tile_loadconfig(&config);
}
#endif
#endif
