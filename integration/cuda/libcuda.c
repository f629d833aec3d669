/* A stand-in libcuda.so.1 for tests on machines without a GPU: it exports
 * the kernel launch entry points podgpu's uprobes attach to, with the
 * driver API's signatures, and does nothing. */
#include <stddef.h>

#include "cuda_standin.h"

#define ENTRY __attribute__((visibility("default"), noinline, used))

ENTRY int cuLaunchKernel(void *f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                         unsigned shmem, void *stream, void **params, void **extra) {
    __asm__ volatile("" ::: "memory");
    return 0;
}

ENTRY int cuLaunchKernel_ptsz(void *f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                              unsigned shmem, void *stream, void **params, void **extra) {
    __asm__ volatile("" ::: "memory");
    return 0;
}

ENTRY int cuLaunchKernelEx(const CUlaunchConfig *config, void *f, void **params, void **extra) {
    __asm__ volatile("" ::: "memory");
    return 0;
}

ENTRY int cuLaunchCooperativeKernel(void *f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                                    unsigned bz, unsigned shmem, void *stream, void **params) {
    __asm__ volatile("" ::: "memory");
    return 0;
}

ENTRY int cuGraphLaunch(void *graph, void *stream) {
    __asm__ volatile("" ::: "memory");
    return 0;
}
