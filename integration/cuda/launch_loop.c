/* A launch-bound CUDA-application stand-in: loads a libcuda with dlopen and
 * calls cuLaunchKernel in a loop, spinning SPIN_NS after each launch for
 * the host-side work a real launch does, until killed. Every 250 ms it
 * prints "MONOTONIC_NS LAUNCHES" (the truth for rate checks); with a
 * SECONDS argument it stops launching after that long, prints
 * "done LAUNCHES RATE" and sleeps until killed. With GO_FILE it prints
 * "ready" and starts only once that file exists. With KERNEL_NAME in the
 * environment it launches the handle libcuda gives that name
 * (cuModuleGetFunction, or with KERNEL_VIA=library cuLibraryGetKernel then
 * cuKernelGetFunction), as an application loading its kernels does; with
 * KERNEL_IMAGE also, it first loads the module (cuModuleLoadData, or
 * cuLibraryLoadData) from an image starting with that text (inside a
 * fatbin wrapper with KERNEL_IMAGE_WRAPPED);
 * otherwise the fixed handle 0x4001. With KERNEL_EARLY also, the kernel is
 * resolved (and "function" printed) before "ready", as in a process that
 * loaded its kernels before the agent attached. With LAUNCH_HELPER, the
 * launches go through one call site in a helper function, alternating the
 * handle with KERNEL_NAME2's (from the same module) where that is set, as
 * a launcher shared by several kernels does. With LAUNCH_SCHEDULE="RATE:SECONDS,..."
 * it launches at each RATE per second (paced by sleeping, 0 for idle) for
 * its SECONDS, in order, and holds the last step; SPIN_NS still adds host
 * work per launch. With WAIT_EVERY=N it calls cuCtxSynchronize after every
 * N launches (what a wait probe costs). With HANDLES=N (and no KERNEL_NAME)
 * it cycles through N made-up handles, so its first N launches are each
 * the first of a handle (what a new handle costs the probes).
 *
 * usage: launch_loop LIBCUDA SPIN_NS [SECONDS [GO_FILE]] */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cuda_standin.h"

/* Bytes of the image KERNEL_IMAGE loads: more than the probes hash. */
#define IMAGE_BYTES 512


/* The launch rate LAUNCH_SCHEDULE asks for at ELAPSED_S; -1 without one. */
static double scheduled_rate(const char *schedule, double elapsed_s) {
    if (!schedule) return -1;
    double rate = 0, start = 0, seconds = 0;
    const char *step = schedule;
    while (step && *step) {
        if (sscanf(step, "%lf:%lf", &rate, &seconds) != 2) break;
        if (elapsed_s < start + seconds) return rate;
        start += seconds;
        step = strchr(step, ',');
        if (step) step++;
    }
    return rate;
}

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* Resolves the handle KERNEL_NAME names (and KERNEL_NAME2's, from the same
 * module or library) into *F and *F2; returns 0, or 1 after saying why. */
static int resolve_kernels(void *lib, const char *kernel_name, void **f, void **f2) {
    const char *via = getenv("KERNEL_VIA");
    int library = via && strcmp(via, "library") == 0;
    int status = 0;
    /* The module or library the name is looked up in: loaded from an
     * image of IMAGE_BYTES whose first bytes are KERNEL_IMAGE, zeros
     * after (none without KERNEL_IMAGE, as before the loads were
     * probed). */
    void *module = NULL;
    static unsigned char image[IMAGE_BYTES];
    const char *image_text = getenv("KERNEL_IMAGE");
    if (image_text) {
        strncpy((char *)image, image_text, sizeof image - 1);
        /* With KERNEL_IMAGE_WRAPPED, the load is given the image inside
         * a fatbin wrapper, as the CUDA runtime registers it: magic,
         * version, a pointer to the image (which differs per process). */
        static struct { unsigned magic, version; const void *data, *filename; } wrapper;
        const void *loaded = image;
        if (getenv("KERNEL_IMAGE_WRAPPED")) {
            wrapper.magic = 0x466243b1;
            wrapper.version = 1;
            wrapper.data = image;
            loaded = &wrapper;
        }
        if (library) {
            int (*load)(void **, const void *, void *, void **, unsigned, void *, void **, unsigned) =
                dlsym(lib, "cuLibraryLoadData");
            status = load(&module, loaded, NULL, NULL, 0, NULL, NULL, 0);
        } else {
            int (*load)(void **, const void *) = dlsym(lib, "cuModuleLoadData");
            status = load(&module, loaded);
        }
    }
    if (status == 0 && library) {
        void *kernel = NULL;
        int (*get_kernel)(void **, void *, const char *) = dlsym(lib, "cuLibraryGetKernel");
        int (*kernel_function)(void **, void *) = dlsym(lib, "cuKernelGetFunction");
        status = get_kernel(&kernel, module, kernel_name) || kernel_function(f, kernel);
        const char *second = getenv("KERNEL_NAME2");
        if (!status && second) status = get_kernel(&kernel, module, second) || kernel_function(f2, kernel);
    } else if (status == 0) {
        int (*get_function)(void **, void *, const char *) = dlsym(lib, "cuModuleGetFunction");
        status = get_function(f, module, kernel_name);
        const char *second = getenv("KERNEL_NAME2");
        if (!status && second) status = get_function(f2, module, second);
    }
    if (status) {
        fprintf(stderr, "resolving %s failed\n", kernel_name);
        return 1;
    }
    printf("function %p\n", *f);
    fflush(stdout);
    return 0;
}

/* The launch call of LAUNCH_HELPER mode: one call site in its own
 * function, alternating two handles (F2 may be F), as a launcher shared by
 * several kernels does. */
__attribute__((noinline)) static void launch_through_helper(launch_fn launch, void *f, void *f2,
                                                            unsigned long long n) {
    launch(n % 2 ? f2 : f, 64, 1, 1, 256, 1, 1, 0, NULL, NULL, NULL);
    __asm__ volatile("" ::: "memory");
}

int main(int argc, char **argv) {
    if (argc < 3 || argc > 5) {
        fprintf(stderr, "usage: launch_loop LIBCUDA SPIN_NS [SECONDS [GO_FILE]]\n");
        return 2;
    }
    void *lib = open_libcuda(argv[1]);
    launch_fn launch = (launch_fn)dlsym(lib, "cuLaunchKernel");
    long long spin_ns = atoll(argv[2]);
    void *f = (void *)0x4001, *f2 = NULL;
    const char *kernel_name = getenv("KERNEL_NAME");
    /* KERNEL_EARLY: the kernels are resolved before "ready", i.e. before
     * the probes are attached (a process older than the agent). */
    int early = getenv("KERNEL_EARLY") != NULL;
    if (kernel_name && early && resolve_kernels(lib, kernel_name, &f, &f2)) return 1;
    if (argc == 5) {
        printf("ready\n");
        fflush(stdout);
        while (access(argv[4], F_OK) != 0) usleep(10000);
    }
    long long stop_ns = argc >= 4 ? now_ns() + (long long)(atof(argv[3]) * 1e9) : 0;
    long long started = now_ns(), next_report = started + 250000000LL;
    unsigned long long launches = 0;
    if (kernel_name && !early && resolve_kernels(lib, kernel_name, &f, &f2)) return 1;
    if (!f2) f2 = f;
    int helper = getenv("LAUNCH_HELPER") != NULL;
    const char *wait_every_env = getenv("WAIT_EVERY");
    unsigned long long wait_every = wait_every_env ? strtoull(wait_every_env, NULL, 10) : 0;
    const char *handles_env = getenv("HANDLES");
    unsigned long long handles = handles_env && !kernel_name ? strtoull(handles_env, NULL, 10) : 0;
    int (*ctx_sync)(void) = dlsym(lib, "cuCtxSynchronize");
    const char *schedule = getenv("LAUNCH_SCHEDULE");
    double paced = 0; /* launches owed to the schedule so far */
    long long last = started;
    for (;;) {
        long long t = now_ns();
        double rate = scheduled_rate(schedule, (t - started) / 1e9);
        if (rate >= 0) {
            paced += rate * (t - last) / 1e9;
            last = t;
            if (paced < 1) {
                struct timespec nap = {0, 2000000}; /* 2 ms */
                nanosleep(&nap, NULL);
                goto report;
            }
            paced -= 1;
        }
        if (helper)
            launch_through_helper(launch, f, f2, launches);
        else if (handles)
            launch((void *)(0x100000ULL + (launches % handles) * 0x40), 64, 1, 1, 256, 1, 1, 0, NULL, NULL, NULL);
        else
            launch(f, 64, 1, 1, 256, 1, 1, 0, NULL, NULL, NULL);
        launches++;
        if (wait_every && ctx_sync && launches % wait_every == 0) ctx_sync();
        t = now_ns();
        long long until = t + spin_ns;
        while (t < until) t = now_ns();
    report:
        if (t >= next_report) {
            printf("%lld %llu\n", t, launches);
            fflush(stdout);
            next_report += 250000000LL;
            if (stop_ns && t >= stop_ns) {
                printf("done %llu %.1f\n", launches, launches / ((t - started) / 1e9));
                fflush(stdout);
                for (;;) pause();
            }
        }
    }
}
