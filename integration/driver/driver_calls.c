/* The stand-in driver library: the part of libcuda that calls the
 * driver. Built as `libcuda.so.1`, it reaches libc's `ioctl` and `close`
 * through its PLT, as the real libcuda does, so the agent's library
 * hooks (uprobes on those PLT stubs) see every call `driver_client`
 * makes through it. */
#include <sys/ioctl.h>
#include <unistd.h>

int nv_standin_ioctl(int fd, unsigned long request, void *params) { return ioctl(fd, request, params); }

int nv_standin_close(int fd) { return close(fd); }
