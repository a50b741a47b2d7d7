/* The CPU's peak floating-point rate, for bench/precision.py: every core runs independent chains of
   fused multiply-adds (float32) or bfloat16 dot products (VDPBF16PS), all in registers, and the
   program prints GFLOP/s. Built at bench time by the machine's C compiler with the widest vectors the
   CPU has (AVX-512, else AVX2 + FMA); run with OMP_NUM_THREADS = the number of cores.

       peak_flops float32|bfloat16          */
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <string.h>

#define CHAINS 12            /* enough to cover the latency of both FMA pipes, few enough to stay in registers */
#define ITERS 100000000L   /* ~0.3 s a run at 3.6 GHz: long enough to hold the clock steady */

#ifdef __AVX512F__
typedef __m512 vec;
#define LANES 16
#define SET(x) _mm512_set1_ps(x)
#define FMA(acc, a, b) _mm512_fmadd_ps(acc, a, b)
#define SUM(v) _mm512_reduce_add_ps(v)
#else
typedef __m256 vec;
#define LANES 8
#define SET(x) _mm256_set1_ps(x)
#define FMA(acc, a, b) _mm256_fmadd_ps(acc, a, b)
static float SUM(__m256 v) { float f[8]; _mm256_storeu_ps(f, v); return f[0] + f[1] + f[2] + f[3] + f[4] + f[5] + f[6] + f[7]; }
#endif

static double float32(void) {
    double flops = 0;
#pragma omp parallel reduction(+ : flops)
    {
        vec acc[CHAINS], a = SET(1.0000001f), b = SET(0.9999999f);
        for (int c = 0; c < CHAINS; c++) acc[c] = SET((float)c);
        for (long i = 0; i < ITERS; i++)
            for (int c = 0; c < CHAINS; c++) acc[c] = FMA(acc[c], a, b);
        float sink = 0;
        for (int c = 0; c < CHAINS; c++) sink += SUM(acc[c]);
        if (sink == 42.0f) printf(" ");   /* keeps the chains from being optimised away */
        flops += 2.0 * LANES * CHAINS * ITERS;
    }
    return flops;
}

#ifdef __AVX512BF16__
static double bfloat16(void) {
    double flops = 0;
#pragma omp parallel reduction(+ : flops)
    {
        __m512 acc[CHAINS];
        __m512bh a = _mm512_cvtne2ps_pbh(SET(1e-3f), SET(1e-3f)), b = a;
        for (int c = 0; c < CHAINS; c++) acc[c] = SET((float)c);
        for (long i = 0; i < ITERS; i++)
            for (int c = 0; c < CHAINS; c++) acc[c] = _mm512_dpbf16_ps(acc[c], a, b);
        float sink = 0;
        for (int c = 0; c < CHAINS; c++) sink += SUM(acc[c]);
        if (sink == 42.0f) printf(" ");
        flops += 2.0 * 32 * CHAINS * ITERS;   /* 32 bfloat16 products a vector, each one added */
    }
    return flops;
}
#endif

int main(int argc, char **argv) {
    const char *precision = argc > 1 ? argv[1] : "float32";
    double (*kernel)(void) = strcmp(precision, "float32") == 0 ? float32 : NULL;
#ifdef __AVX512BF16__
    if (strcmp(precision, "bfloat16") == 0) kernel = bfloat16;
#endif
    if (!kernel) {
        fprintf(stderr, "no %s kernel on this CPU\n", precision);
        return 2;
    }
    double t0 = omp_get_wtime(), flops = kernel();
    printf("%.1f\n", flops / (omp_get_wtime() - t0) / 1e9);
    return 0;
}
