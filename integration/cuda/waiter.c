/* A CUDA-application stand-in that waits on its work, for the completion
 * span probes: loads a libcuda with dlopen and, once GO_FILE exists,
 * repeats forever: launch 5 kernels, sleep BUSY_MS (the GPU's time on
 * them), wait, sleep IDLE_MS.
 *
 * usage: waiter LIBCUDA GO_FILE MODE BUSY_MS IDLE_MS
 * MODE: ctx     launches on the default stream, cuCtxSynchronize
 *       stream  launches on stream 0x77, cuStreamSynchronize(0x77)
 *       copy    launches on the default stream, cuMemcpyDtoH_v2
 *       mixed   launches on streams 0x77 and 0x78, cuStreamSynchronize(0x77)
 *               (the other stream's work may still run: the span stays open)
 *       threads as stream, on the default stream, while a second thread
 *               launches on its own default stream every 10 ms (the main
 *               thread's wait does not cover it: the span stays open)
 * Prints {"ready":true} at start. */
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cuda_standin.h"

typedef int (*wait_fn)(void);
typedef int (*stream_wait_fn)(void *);
typedef int (*copy_fn)(void *, unsigned long long, size_t);

static launch_fn launch;

/* The second thread of mode "threads". */
static void *launch_beside(void *unused) {
    for (;;) {
        launch((void *)0x4002, 4, 1, 1, 128, 1, 1, 0, NULL, NULL, NULL);
        usleep(10000);
    }
    return unused;
}

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: waiter LIBCUDA GO_FILE MODE BUSY_MS IDLE_MS\n");
        return 2;
    }
    void *lib = open_libcuda(argv[1]);
    launch = (launch_fn)dlsym(lib, "cuLaunchKernel");
    wait_fn ctx_sync = (wait_fn)dlsym(lib, "cuCtxSynchronize");
    stream_wait_fn stream_sync = (stream_wait_fn)dlsym(lib, "cuStreamSynchronize");
    copy_fn copy = (copy_fn)dlsym(lib, "cuMemcpyDtoH_v2");
    const char *mode = argv[3];
    useconds_t busy = (useconds_t)atoi(argv[4]) * 1000, idle = (useconds_t)atoi(argv[5]) * 1000;
    void *stream = strcmp(mode, "stream") == 0 || strcmp(mode, "mixed") == 0 ? (void *)0x77 : NULL;
    printf("{\"ready\":true}\n");
    fflush(stdout);
    while (access(argv[2], F_OK) != 0) usleep(20000);
    pthread_t beside;
    if (strcmp(mode, "threads") == 0) pthread_create(&beside, NULL, launch_beside, NULL);
    char sink[8];
    for (;;) {
        for (int i = 0; i < 5; i++) launch((void *)0x4000, 4, 1, 1, 128, 1, 1, 0, stream, NULL, NULL);
        if (strcmp(mode, "mixed") == 0) launch((void *)0x4000, 4, 1, 1, 128, 1, 1, 0, (void *)0x78, NULL, NULL);
        usleep(busy);
        if (strcmp(mode, "ctx") == 0) ctx_sync();
        else if (strcmp(mode, "copy") == 0) copy(sink, 0x1000, sizeof sink);
        else if (strcmp(mode, "threads") == 0) stream_sync(NULL);
        else stream_sync((void *)0x77);
        usleep(idle);
    }
}
