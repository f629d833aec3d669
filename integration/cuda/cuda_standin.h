/* The driver API's CUlaunchConfig, as cuLaunchKernelEx takes it: gridDimX/Y/Z
 * and blockDimX/Y/Z are the first six u32 (what the launch probe reads). */
#ifndef PODGPU_CUDA_STANDIN_H
#define PODGPU_CUDA_STANDIN_H

typedef struct {
    unsigned int gridDimX, gridDimY, gridDimZ;
    unsigned int blockDimX, blockDimY, blockDimZ;
    unsigned int sharedMemBytes;
    void *hStream;
    void *attrs;
    unsigned int numAttrs;
} CUlaunchConfig;

/* cuLaunchKernel's signature, as applications call it through a pointer. */
typedef int (*launch_fn)(void *, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, void *,
                         void **, void **);

/* Loads the libcuda at PATH as the CUDA runtime does (dlopen), or exits
 * with status 1 saying why. */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
static inline void *open_libcuda(const char *path) {
    void *lib = dlopen(path, RTLD_NOW);
    if (!lib) {
        fprintf(stderr, "dlopen: %s\n", dlerror());
        exit(1);
    }
    return lib;
}

#endif
