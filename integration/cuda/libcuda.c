/* A stand-in libcuda.so.1 for tests on machines without a GPU: it exports
 * the kernel launch entry points podgpu's uprobes attach to, with the
 * driver API's signatures, and does nothing; and the calls that create
 * kernel handles by name, handing out handles that differ per process
 * (as real addresses do) for the same name, and the module and library
 * loads those names are looked up in.
 *
 * With PODGPU_SIM_LAUNCHES_DIR set, every launch also adds one to a
 * counter in DIR/PID (8 bytes, shared memory): the simulated GPU
 * (`--gpu sim`, a process with `launch_cost_us`) reads it to run the work
 * these launches stand for, as a real GPU would, independently of the
 * probes that count the same calls. */
#include <fcntl.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include "cuda_standin.h"

#define ENTRY __attribute__((visibility("default"), noinline, used))

static unsigned long long *launch_counter;

__attribute__((constructor)) static void map_launch_counter(void) {
    const char *dir = getenv("PODGPU_SIM_LAUNCHES_DIR");
    if (!dir) return;
    char path[4096];
    snprintf(path, sizeof path, "%s/%d", dir, (int)getpid());
    int fd = open(path, O_RDWR | O_CREAT, 0644);
    if (fd < 0) return;
    if (ftruncate(fd, sizeof *launch_counter) == 0) {
        void *mapped = mmap(NULL, sizeof *launch_counter, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (mapped != MAP_FAILED) launch_counter = mapped;
    }
    close(fd);
}

static inline void ran(void) {
    if (launch_counter) __atomic_fetch_add(launch_counter, 1, __ATOMIC_RELAXED);
}

/* A handle for NAME in this process: its pid in the high bits, a hash of
 * the name below, TAG in the lowest bits (function 1, kernel 2). */
static unsigned long long handle_for(const char *name, unsigned tag) {
    unsigned long long hash = 1469598103934665603ULL;
    for (const char *c = name; *c; c++) hash = (hash ^ (unsigned char)*c) * 1099511628211ULL;
    return ((unsigned long long)getpid() << 32) | (hash & 0xfffff00ULL) | tag;
}

/* A module or library handle: this process's pid high, a count below. */
static unsigned long long next_module = 0;
static void *module_handle(void) {
    return (void *)(((unsigned long long)getpid() << 32) | (++next_module << 8) | 4);
}

/* cuModuleLoadData(CUmodule *module, const void *image) */
ENTRY int cuModuleLoadData(void **module, const void *image) {
    if (!module || !image) return 1;
    *module = module_handle();
    __asm__ volatile("" ::: "memory");
    return 0;
}

/* cuLibraryLoadData(CUlibrary *library, const void *code, CUjit_option *jit_options, void **jit_values,
 * unsigned jit_count, CUlibraryOption *options, void **option_values, unsigned option_count) */
ENTRY int cuLibraryLoadData(void **library, const void *code, void *jit_options, void **jit_values, unsigned jit_count,
                            void *options, void **option_values, unsigned option_count) {
    if (!library || !code) return 1;
    *library = module_handle();
    __asm__ volatile("" ::: "memory");
    return 0;
}

/* cuModuleLoad(CUmodule *module, const char *fname) */
ENTRY int cuModuleLoad(void **module, const char *fname) {
    if (!module || !fname) return 1;
    *module = module_handle();
    __asm__ volatile("" ::: "memory");
    return 0;
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
    ran();
    __asm__ volatile("" ::: "memory");
    return 0;
}

ENTRY int cuLaunchKernel_ptsz(void *f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                              unsigned shmem, void *stream, void **params, void **extra) {
    ran();
    __asm__ volatile("" ::: "memory");
    return 0;
}

ENTRY int cuLaunchKernelEx(const CUlaunchConfig *config, void *f, void **params, void **extra) {
    ran();
    __asm__ volatile("" ::: "memory");
    return 0;
}

ENTRY int cuLaunchCooperativeKernel(void *f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                                    unsigned bz, unsigned shmem, void *stream, void **params) {
    ran();
    __asm__ volatile("" ::: "memory");
    return 0;
}

ENTRY int cuGraphLaunch(void *graph, void *stream) {
    ran();
    __asm__ volatile("" ::: "memory");
    return 0;
}

/* The waits: the stand-in has no work outstanding, so they return at once
 * (an application stands for the GPU's time by sleeping before it waits). */
ENTRY int cuCtxSynchronize(void) {
    __asm__ volatile("" ::: "memory");
    return 0;
}

ENTRY int cuStreamSynchronize(void *stream) {
    __asm__ volatile("" ::: "memory");
    return 0;
}

ENTRY int cuStreamSynchronize_ptsz(void *stream) {
    __asm__ volatile("" ::: "memory");
    return 0;
}

ENTRY int cuMemcpyDtoH_v2(void *dst, unsigned long long src, size_t bytes) {
    __asm__ volatile("" ::: "memory");
    return 0;
}
