/* A CUDA-runtime stand-in: what sits between an application's kernels and
 * libcuda in a real program. The application registers each kernel's host
 * symbol with its name (as nvcc's generated code does through
 * __cudaRegisterFunction); a symbol's handle is resolved with
 * cuModuleGetFunction at its first launch (CUDA 12's lazy loading), or all
 * at once with cudartResolveAll; and every launch reaches cuLaunchKernel
 * from one call site here, whichever kernel it is, through an internal
 * function with its own frame, as the real runtime's do. */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>

#include "cuda_standin.h"

#define MAX_KERNELS 16

static launch_fn launch;
static int (*get_function)(void **, void *, const char *);
static struct {
    const void *symbol;
    const char *name;
    void *handle;
} kernels[MAX_KERNELS];
static int registered;

/* Loads the libcuda at PATH; 0 on success. */
int cudartInit(const char *libcuda_path) {
    void *lib = open_libcuda(libcuda_path);
    launch = (launch_fn)dlsym(lib, "cuLaunchKernel");
    get_function = dlsym(lib, "cuModuleGetFunction");
    return !(launch && get_function);
}

/* Registers a kernel's host symbol under its (mangled) name. */
void cudartRegisterKernel(const void *symbol, const char *name) {
    if (registered < MAX_KERNELS) {
        kernels[registered].symbol = symbol;
        kernels[registered].name = name;
        registered++;
    }
}

static void *handle_of(int index) {
    if (!kernels[index].handle) get_function(&kernels[index].handle, NULL, kernels[index].name);
    return kernels[index].handle;
}

/* Resolves every registered kernel now (what eager module loading does). */
void cudartResolveAll(void) {
    for (int i = 0; i < registered; i++) handle_of(i);
}

/* The one call into libcuda: the runtime's per-launch bookkeeping sits on
 * the stack between the application's frames and libcuda's. */
__attribute__((noinline)) static int launch_internal(void *handle, unsigned grid_x, unsigned block_x, void **args) {
    volatile unsigned char bookkeeping[96];
    bookkeeping[0] = 1;
    int status = launch(handle, grid_x, 1, 1, block_x, 1, 1, 0, NULL, args, NULL);
    __asm__ volatile("" ::: "memory");
    return status + bookkeeping[0] - 1;
}

/* cudaLaunchKernel, reduced: the kernel's host symbol, grid and block x. */
int cudaLaunchKernel(const void *symbol, unsigned grid_x, unsigned block_x, void **args) {
    for (int i = 0; i < registered; i++)
        if (kernels[i].symbol == symbol) return launch_internal(handle_of(i), grid_x, block_x, args);
    return 98; /* cudaErrorInvalidDeviceFunction */
}
