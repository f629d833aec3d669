/* An application on the CUDA-runtime stand-in (cudart.c): two kernels with
 * the same block size, each launched through its own host stub (what nvcc
 * generates for kernel<<<...>>>), alternately, 100 launches a second for
 * SECONDS, then "done" and asleep until killed. Every launch reaches
 * libcuda from the runtime's one call site: only the frames above it tell
 * the kernels apart. Prints "ready" and waits for GO_FILE first; with
 * RESOLVE_EARLY the kernels are resolved before "ready" (a process older
 * than the agent), otherwise at their first launch.
 *
 * usage: runtime_app LIBCUDA LIBCUDART SECONDS GO_FILE */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

/* The kernels' host symbols (their addresses are what the runtime keys). */
static const char gemm_symbol = 1, add_symbol = 2;

static int (*launch_kernel)(const void *, unsigned, unsigned, void **);

__attribute__((noinline)) static int stub_gemm(void) {
    void *args[2] = {0, 0};
    int status = launch_kernel(&gemm_symbol, 132, 256, args);
    __asm__ volatile("" ::: "memory");
    return status;
}

__attribute__((noinline)) static int stub_add(void) {
    void *args[2] = {0, 0};
    int status = launch_kernel(&add_symbol, 64, 256, args);
    __asm__ volatile("" ::: "memory");
    return status;
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: runtime_app LIBCUDA LIBCUDART SECONDS GO_FILE\n");
        return 2;
    }
    void *runtime = dlopen(argv[2], RTLD_NOW);
    if (!runtime) {
        fprintf(stderr, "dlopen: %s\n", dlerror());
        return 1;
    }
    int (*init)(const char *) = dlsym(runtime, "cudartInit");
    void (*register_kernel)(const void *, const char *) = dlsym(runtime, "cudartRegisterKernel");
    void (*resolve_all)(void) = dlsym(runtime, "cudartResolveAll");
    launch_kernel = dlsym(runtime, "cudaLaunchKernel");
    if (init(argv[1])) return 1;
    register_kernel(&gemm_symbol, "_Z9gemm_f16PKvPvi");
    register_kernel(&add_symbol, "_Z7add_f32PKfPfi");
    if (getenv("RESOLVE_EARLY")) resolve_all();
    printf("ready\n");
    fflush(stdout);
    while (access(argv[4], F_OK) != 0) usleep(10000);
    struct timespec start, now, nap = {0, 10000000};
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (unsigned long n = 0;; n++) {
        if (n % 2 ? stub_add() : stub_gemm()) return 1;
        nanosleep(&nap, NULL);
        clock_gettime(CLOCK_MONOTONIC, &now);
        if (now.tv_sec - start.tv_sec >= atol(argv[3])) break;
    }
    printf("done\n");
    fflush(stdout);
    for (;;) pause();
}
