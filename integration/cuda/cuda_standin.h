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

#endif
