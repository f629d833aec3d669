/* Drives the stand-in NVIDIA devices with the calls a CUDA process makes,
 * in a known order, so a test can check what the driver path decodes:
 *
 * phase 0: waits until GO.0 exists (the test has moved it into its pod's
 *   cgroup: in a cluster the runtime does that before exec).
 * phase 1: version check; client, device 0 (NVOS64); three controls;
 *   channel group, channel, compute object (one GPU context); VRAM of
 *   FIRST_MIB (NVOS21) and of SECOND_MIB (NVOS64 wrapped in XFER); a VRAM
 *   allocation the device refuses; an RM_ALLOC of unknown size; a memory
 *   mapping; two UVM commands on nvidia-uvm; an escape-shaped ioctl on
 *   /dev/null (not a driver call). Prints "allocated".
 * phase 2 (once GO.1 exists): frees the first VRAM allocation and the
 *   channel group (which takes the channel and compute object with it).
 *   Prints "freed".
 * phase 3 (once GO.2 exists): closes its fds and exits.
 *
 * Every ioctl and close goes through the stand-in driver library
 * (`driver_calls.c`, linked as libcuda.so.1), as a CUDA process's go
 * through libcuda.
 *
 * Usage: driver_client DIR FIRST_MIB SECOND_MIB GO */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "nv_standin.h"

int nv_standin_ioctl(int fd, unsigned long request, void *params);
int nv_standin_close(int fd);

#define CLIENT 0xc1
#define DEVICE 0xd0
#define CHANNEL_GROUP 0x100
#define FIRST_VRAM 0x200

static void call(int fd, unsigned long request, void *params, const char *what) {
    if (nv_standin_ioctl(fd, request, params) != 0) {
        perror(what);
        exit(1);
    }
}

static void alloc21(int fd, uint32_t parent, uint32_t handle, uint32_t class, void *params) {
    struct nvos21 alloc = {CLIENT, parent, handle, class, (uint64_t)(uintptr_t)params, 0, 0};
    call(fd, NV_IOCTL(ESC_RM_ALLOC, sizeof alloc), &alloc, "RM_ALLOC");
}

static void wait_for(const char *go, int phase) {
    char path[4096];
    snprintf(path, sizeof path, "%s.%d", go, phase);
    while (access(path, F_OK) != 0) usleep(10000);
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s DIR FIRST_MIB SECOND_MIB GO\n", argv[0]);
        return 2;
    }
    char path[4096];
    snprintf(path, sizeof path, "%s/nvidiactl", argv[1]);
    int ctl = open(path, O_RDWR);
    snprintf(path, sizeof path, "%s/nvidia-uvm", argv[1]);
    int uvm = open(path, O_RDWR);
    int null = open("/dev/null", O_RDWR);
    if (ctl < 0 || uvm < 0 || null < 0) {
        perror("open");
        return 1;
    }
    uint64_t first = strtoull(argv[2], NULL, 10) << 20, second = strtoull(argv[3], NULL, 10) << 20;
    wait_for(argv[4], 0);

    unsigned char version[0x48] = {0};
    call(ctl, NV_IOCTL(ESC_CHECK_VERSION, sizeof version), version, "CHECK_VERSION");
    alloc21(ctl, 0, CLIENT, 0x41, NULL);
    uint32_t device_params[16] = {0}; /* deviceId 0 */
    struct nvos64 device = {CLIENT, CLIENT, DEVICE, 0x80, (uint64_t)(uintptr_t)device_params, 0, 0, 0, 0, 0};
    call(ctl, NV_IOCTL(ESC_RM_ALLOC, sizeof device), &device, "RM_ALLOC device");
    for (int i = 0; i < 3; i++) {
        struct nvos54 control = {CLIENT, DEVICE, 0x800102 + i, 0, 0, 0, 0};
        call(ctl, NV_IOCTL(ESC_RM_CONTROL, sizeof control), &control, "RM_CONTROL");
    }
    uint32_t group_params[5] = {0, 0, 0, 1, 0}; /* engineType 1 (graphics/compute) */
    alloc21(ctl, DEVICE, CHANNEL_GROUP, 0xa06c, group_params);
    alloc21(ctl, CHANNEL_GROUP, CHANNEL_GROUP + 1, 0xc86f, NULL);
    alloc21(ctl, CHANNEL_GROUP + 1, CHANNEL_GROUP + 2, 0xcbc0, NULL);

    struct nv_memory_params memory = {.size = first};
    alloc21(ctl, DEVICE, FIRST_VRAM, 0x40, &memory);
    struct nv_memory_params wrapped_memory = {.size = second};
    struct nvos64 wrapped = {CLIENT, DEVICE, FIRST_VRAM + 1, 0x40, (uint64_t)(uintptr_t)&wrapped_memory, 0, 0, 0, 0, 0};
    struct nv_xfer xfer = {ESC_RM_ALLOC, sizeof wrapped, (uint64_t)(uintptr_t)&wrapped};
    call(ctl, NV_IOCTL(ESC_XFER, sizeof xfer), &xfer, "XFER(RM_ALLOC)");
    struct nv_memory_params refused_memory = {.size = 1ull << 30};
    struct nvos21 refused = {CLIENT, DEVICE, REFUSED_HANDLE, 0x40, (uint64_t)(uintptr_t)&refused_memory, 0, 0};
    call(ctl, NV_IOCTL(ESC_RM_ALLOC, sizeof refused), &refused, "RM_ALLOC refused");
    unsigned char odd[40] = {0};
    call(ctl, NV_IOCTL(ESC_RM_ALLOC, sizeof odd), odd, "RM_ALLOC of unknown size");
    struct nvos33 map = {CLIENT, DEVICE, FIRST_VRAM, 0, 0, first, 0, 0, 0, ctl, 0};
    call(ctl, NV_IOCTL(ESC_RM_MAP_MEMORY, sizeof map), &map, "RM_MAP_MEMORY");
    call(uvm, 0x30000001, NULL, "UVM_INITIALIZE");
    unsigned char register_gpu[40] = {0};
    call(uvm, 37, register_gpu, "UVM_REGISTER_GPU");
    /* Not a driver call: /dev/null refuses it, and the agent must not book it. */
    struct nvos21 stray = {CLIENT, DEVICE, 0x999, 0x40, (uint64_t)(uintptr_t)&memory, 0, 0};
    (void)nv_standin_ioctl(null, NV_IOCTL(ESC_RM_ALLOC, sizeof stray), &stray);
    printf("allocated\n");
    fflush(stdout);

    wait_for(argv[4], 1);
    struct nvos00 free_memory = {CLIENT, DEVICE, FIRST_VRAM, 0};
    call(ctl, NV_IOCTL(ESC_RM_FREE, sizeof free_memory), &free_memory, "RM_FREE memory");
    struct nvos00 free_group = {CLIENT, DEVICE, CHANNEL_GROUP, 0};
    call(ctl, NV_IOCTL(ESC_RM_FREE, sizeof free_group), &free_group, "RM_FREE channel group");
    printf("freed\n");
    fflush(stdout);

    wait_for(argv[4], 2);
    nv_standin_close(uvm);
    nv_standin_close(ctl);
    nv_standin_close(null);
    return 0;
}
