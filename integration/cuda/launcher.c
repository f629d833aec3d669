/* A CUDA-application stand-in for tests: loads a libcuda with dlopen and
 * calls its launch entry points through function pointers, as the CUDA
 * runtime does, a known number of times with known sizes.
 *
 * usage: launcher LIBCUDA GO_FILE SEED KERNELS EX_LAUNCHES GRAPHS
 * Waits until GO_FILE exists (so the agent has attached), then launches:
 *   KERNELS x cuLaunchKernel(f = 0x1000 + SEED, grid 4x2x1, block 128x1xSEED)
 *   10 x cuLaunchKernel_ptsz (same function and sizes)
 *   EX_LAUNCHES x cuLaunchKernelEx(f = 0x2000 + SEED, grid 8x1x1, block 256x1x1)
 *   GRAPHS x cuGraphLaunch(graph = 0x3000 + SEED)
 * prints "done" and sleeps until killed. */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "cuda_standin.h"

typedef int (*launch_ex_fn)(const CUlaunchConfig *, void *, void **, void **);
typedef int (*graph_fn)(void *, void *);

int main(int argc, char **argv) {
    if (argc != 7) {
        fprintf(stderr, "usage: launcher LIBCUDA GO_FILE SEED KERNELS EX_LAUNCHES GRAPHS\n");
        return 2;
    }
    void *lib = open_libcuda(argv[1]);
    launch_fn launch = (launch_fn)dlsym(lib, "cuLaunchKernel");
    launch_fn launch_ptsz = (launch_fn)dlsym(lib, "cuLaunchKernel_ptsz");
    launch_ex_fn launch_ex = (launch_ex_fn)dlsym(lib, "cuLaunchKernelEx");
    graph_fn graph = (graph_fn)dlsym(lib, "cuGraphLaunch");
    unsigned seed = (unsigned)atoi(argv[3]);
    long kernels = atol(argv[4]), ex = atol(argv[5]), graphs = atol(argv[6]);
    printf("{\"ready\":true}\n");
    fflush(stdout);
    while (access(argv[2], F_OK) != 0) usleep(20000);
    void *f = (void *)(unsigned long)(0x1000 + seed);
    for (long i = 0; i < kernels; i++) launch(f, 4, 2, 1, 128, 1, seed, 0, NULL, NULL, NULL);
    for (long i = 0; i < 10; i++) launch_ptsz(f, 4, 2, 1, 128, 1, seed, 0, NULL, NULL, NULL);
    CUlaunchConfig config = {8, 1, 1, 256, 1, 1, 0, NULL, NULL, 0};
    for (long i = 0; i < ex; i++) launch_ex(&config, (void *)(unsigned long)(0x2000 + seed), NULL, NULL);
    for (long i = 0; i < graphs; i++) graph((void *)(unsigned long)(0x3000 + seed), NULL);
    printf("done\n");
    fflush(stdout);
    for (;;) pause();
}
