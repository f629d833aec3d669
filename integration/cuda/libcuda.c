/* A stand-in libcuda.so.1 for tests on machines without a GPU: it exports
 * the kernel launch entry points podgpu's uprobes attach to, with the
 * driver API's signatures, and does nothing; and the calls that create
 * kernel handles by name, handing out handles that differ per process
 * (as real addresses do) for the same name. */
#include <stddef.h>
#include <unistd.h>

#include "cuda_standin.h"

#define ENTRY __attribute__((visibility("default"), noinline, used))

/* A handle for NAME in this process: its pid in the high bits, a hash of
 * the name below, TAG in the lowest bits (function 1, kernel 2). */
static unsigned long long handle_for(const char *name, unsigned tag) {
    unsigned long long hash = 1469598103934665603ULL;
    for (const char *c = name; *c; c++) hash = (hash ^ (unsigned char)*c) * 1099511628211ULL;
    return ((unsigned long long)getpid() << 32) | (hash & 0xfffff00ULL) | tag;
}

/* cuModuleGetFunction(CUfunction *hfunc, CUmodule hmod, const char *name) */
ENTRY int cuModuleGetFunction(void **hfunc, void *hmod, const char *name) {
    if (!hfunc || !name) return 1; /* CUDA_ERROR_INVALID_VALUE */
    *hfunc = (void *)handle_for(name, 1);
    __asm__ volatile("" ::: "memory");
    return 0;
}

/* cuLibraryGetKernel(CUkernel *pKernel, CUlibrary library, const char *name) */
ENTRY int cuLibraryGetKernel(void **kernel, void *library, const char *name) {
    if (!kernel || !name) return 1;
    *kernel = (void *)handle_for(name, 2);
    __asm__ volatile("" ::: "memory");
    return 0;
}

/* cuKernelGetFunction(CUfunction *pFunc, CUkernel kernel) */
ENTRY int cuKernelGetFunction(void **func, void *kernel) {
    if (!func) return 1;
    *func = (void *)(((unsigned long long)kernel & ~0xffULL) | 3);
    __asm__ volatile("" ::: "memory");
    return 0;
}

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
