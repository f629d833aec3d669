/* A stand-in for the NVIDIA device nodes, for tests without a GPU: a FUSE
 * file system with the files nvidiactl, nvidia0 and nvidia-uvm whose
 * ioctls succeed. Each ioctl's parameters are handed back as written
 * (status 0), except that RM_ALLOC of REFUSED_HANDLE gets an RM error
 * status and RM_CONTROL blocks for CONTROL_BLOCK_US, as the real driver
 * may. The agent is told to treat these files as NVIDIA devices.
 *
 * Usage: standin_device MOUNTPOINT (prints "mounted" once it serves). */
#define FUSE_USE_VERSION 35
#include <errno.h>
#include <fuse_lowlevel.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "nv_standin.h"

static const char *const names[] = {"nvidiactl", "nvidia0", "nvidia-uvm"};
#define FIRST_FILE_INO 2
#define FILE_COUNT 3

static void attributes(fuse_ino_t ino, struct stat *st) {
    memset(st, 0, sizeof *st);
    st->st_ino = ino;
    if (ino == FUSE_ROOT_ID) {
        st->st_mode = S_IFDIR | 0755;
        st->st_nlink = 2;
    } else {
        st->st_mode = S_IFREG | 0666;
        st->st_nlink = 1;
    }
}

static int valid(fuse_ino_t ino) { return ino == FUSE_ROOT_ID || (ino >= FIRST_FILE_INO && ino < FIRST_FILE_INO + FILE_COUNT); }

static void do_lookup(fuse_req_t req, fuse_ino_t parent, const char *name) {
    for (int i = 0; parent == FUSE_ROOT_ID && i < FILE_COUNT; i++) {
        if (strcmp(name, names[i]) == 0) {
            struct fuse_entry_param entry = {.ino = FIRST_FILE_INO + i, .attr_timeout = 3600, .entry_timeout = 3600};
            attributes(entry.ino, &entry.attr);
            fuse_reply_entry(req, &entry);
            return;
        }
    }
    fuse_reply_err(req, ENOENT);
}

static void do_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
    (void)fi;
    if (!valid(ino)) {
        fuse_reply_err(req, ENOENT);
        return;
    }
    struct stat st;
    attributes(ino, &st);
    fuse_reply_attr(req, &st, 3600);
}

static void do_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
    if (ino == FUSE_ROOT_ID) {
        fuse_reply_err(req, EISDIR);
        return;
    }
    fi->direct_io = 1;
    fuse_reply_open(req, fi);
}

static void do_ioctl(fuse_req_t req, fuse_ino_t ino, unsigned int cmd, void *arg, struct fuse_file_info *fi,
                     unsigned flags, const void *in_buf, size_t in_bufsz, size_t out_bufsz) {
    (void)ino, (void)arg, (void)fi, (void)flags;
    if (out_bufsz == 0) {
        fuse_reply_ioctl(req, 0, NULL, 0);
        return;
    }
    unsigned char *out = calloc(1, out_bufsz);
    if (!out) {
        fuse_reply_err(req, ENOMEM);
        return;
    }
    memcpy(out, in_buf, in_bufsz < out_bufsz ? in_bufsz : out_bufsz);
    unsigned nr = _IOC_NR(cmd);
    if (nr == ESC_RM_ALLOC && out_bufsz == sizeof(struct nvos21)) {
        struct nvos21 *alloc = (struct nvos21 *)out;
        if (alloc->h_new == REFUSED_HANDLE) alloc->status = NV_ERR_NO_MEMORY;
    } else if (nr == ESC_RM_ALLOC && out_bufsz == sizeof(struct nvos64)) {
        struct nvos64 *alloc = (struct nvos64 *)out;
        if (alloc->h_new == REFUSED_HANDLE) alloc->status = NV_ERR_NO_MEMORY;
    } else if (nr == ESC_RM_CONTROL) {
        usleep(CONTROL_BLOCK_US);
    }
    fuse_reply_ioctl(req, 0, out, out_bufsz);
    free(out);
}

static const struct fuse_lowlevel_ops operations = {
    .lookup = do_lookup,
    .getattr = do_getattr,
    .open = do_open,
    .ioctl = do_ioctl,
};

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s MOUNTPOINT\n", argv[0]);
        return 2;
    }
    char *fuse_argv[] = {argv[0], NULL};
    struct fuse_args args = FUSE_ARGS_INIT(1, fuse_argv);
    struct fuse_session *session = fuse_session_new(&args, &operations, sizeof operations, NULL);
    if (!session || fuse_set_signal_handlers(session) != 0 || fuse_session_mount(session, argv[1]) != 0) {
        fprintf(stderr, "standin_device: cannot mount on %s\n", argv[1]);
        return 1;
    }
    printf("mounted\n");
    fflush(stdout);
    int result = fuse_session_loop(session);
    fuse_session_unmount(session);
    fuse_remove_signal_handlers(session);
    fuse_session_destroy(session);
    return result == 0 ? 0 : 1;
}
