/* Parameter layouts of the NVIDIA escapes the driver path decodes, as the
 * open kernel modules define them for x86-64 (535-595; see
 * docs/gpu-driver-abi.md). Shared by the stand-in device and the client
 * that drives it. */
#ifndef NV_STANDIN_H
#define NV_STANDIN_H
#include <stdint.h>
#include <sys/ioctl.h>

#define ESC_RM_FREE 0x29
#define ESC_RM_CONTROL 0x2a
#define ESC_RM_ALLOC 0x2b
#define ESC_RM_MAP_MEMORY 0x4e
#define ESC_CHECK_VERSION 0xd2
#define ESC_XFER 0xd3

#define NV_IOCTL(nr, size) _IOC(_IOC_READ | _IOC_WRITE, 'F', (nr), (size))

/* NVOS21: RM_ALLOC with a 32-byte struct. */
struct nvos21 {
    uint32_t h_root, h_parent, h_new, h_class;
    uint64_t alloc_params;
    uint32_t params_size, status;
};

/* NVOS64: RM_ALLOC with a 48-byte struct. */
struct nvos64 {
    uint32_t h_root, h_parent, h_new, h_class;
    uint64_t alloc_params;
    uint64_t rights_requested;
    uint32_t params_size, flags, status, pad;
};

/* NVOS00: RM_FREE. */
struct nvos00 {
    uint32_t h_root, h_parent, h_old, status;
};

/* NVOS54: RM_CONTROL. */
struct nvos54 {
    uint32_t h_client, h_object, cmd, flags;
    uint64_t params;
    uint32_t params_size, status;
};

/* NVOS33 + fd: RM_MAP_MEMORY. */
struct nvos33 {
    uint32_t h_client, h_device, h_memory, pad;
    uint64_t offset, length, linear_address;
    uint32_t status, flags;
    int32_t fd, pad2;
};

/* nv_ioctl_xfer_t. */
struct nv_xfer {
    uint32_t cmd, size;
    uint64_t ptr;
};

/* NV_MEMORY_ALLOCATION_PARAMS (545+: 128 bytes), size at 64. */
struct nv_memory_params {
    uint8_t head[64];
    uint64_t size;
    uint8_t tail[56];
};

/* A handle the stand-in refuses to allocate (RM status NO_MEMORY). */
#define REFUSED_HANDLE 0xbad
#define NV_ERR_NO_MEMORY 0x51
/* RM_CONTROL blocks this long in the stand-in (time in the driver). */
#define CONTROL_BLOCK_US 20000
#endif
