//! The NVIDIA driver path (`agent-ebpf/src/driver.rs`): which ioctls the
//! request probe's syscall tracepoints decode, and the event each decoded
//! ioctl (or close of a driver fd) hands user space.
//!
//! Facts behind the numbers: `docs/gpu-driver-abi.md` (open kernel
//! modules 535-595).

/// Entries in the (tgid, fd) -> device kind map.
pub const MAX_DRIVER_FDS: u32 = 65536;
/// Bytes of the driver event ring. CUDA init issues ~1600 ioctls per
/// process, then next to none: 1 MiB holds ~8,000 events.
pub const DRIVER_RING_BYTES: u32 = 1 << 20;

/// ioctl type of the NVIDIA escapes (`_IOC_TYPE`, 'F').
pub const ESCAPE_TYPE: u32 = 0x46;
/// `_IOC_NR` of the escapes the decoder reads (`nv_escape.h`,
/// `nv-ioctl-numbers.h`).
pub mod escape {
    /// NVOS02 + fd (56): system memory.
    pub const RM_ALLOC_MEMORY: u32 = 0x27;
    /// NVOS00 (16).
    pub const RM_FREE: u32 = 0x29;
    /// NVOS54 (32).
    pub const RM_CONTROL: u32 = 0x2a;
    /// NVOS21 (32) or NVOS64 (48).
    pub const RM_ALLOC: u32 = 0x2b;
    /// NVOS32.
    pub const RM_VID_HEAP_CONTROL: u32 = 0x4a;
    /// NVOS33 + fd (56).
    pub const RM_MAP_MEMORY: u32 = 0x4e;
    /// First of the driver's own (non-RM) escapes: card info, register
    /// fd, version check, ...
    pub const FIRST_NV: u32 = 200;
    /// `{int ctl_fd}` (4).
    pub const REGISTER_FD: u32 = 201;
    /// `nv_ioctl_xfer_t` (16): wraps another escape whose parameters are
    /// larger than an ioctl number can say.
    pub const XFER: u32 = 211;
    /// Last escape number the kernel pre-filter accepts.
    pub const LAST_NV: u32 = 220;
}

/// Whether an ioctl request has the shape of an NVIDIA escape:
/// `_IOWR('F', nr, size)` with `nr` in the RM or driver escape ranges.
#[inline(always)]
pub const fn is_escape_shaped(request: u32) -> bool {
    let nr = request & 0xff;
    let kind = (request >> 8) & 0xff;
    let direction = request >> 30;
    kind == ESCAPE_TYPE
        && direction == 3
        && ((nr >= escape::RM_ALLOC_MEMORY && nr <= escape::RM_MAP_MEMORY)
            || (nr >= escape::FIRST_NV && nr <= escape::LAST_NV))
}

/// What a (tgid, fd) is, as far as the driver probe knows
/// (`DRIVER_FDS` values, `DriverEvent::fd_kind`).
pub mod fd_kind {
    /// Not in the map yet: user space must check the fd before booking
    /// the event.
    pub const UNVERIFIED: u32 = 0;
    /// Checked, not an NVIDIA device: the kernel ignores its ioctls.
    pub const NOT_NVIDIA: u32 = 1;
    /// `/dev/nvidiactl` (195:255).
    pub const CONTROL: u32 = 2;
    /// `/dev/nvidiaN` (195:N).
    pub const GPU: u32 = 3;
    /// `/dev/nvidia-uvm` (dynamic major).
    pub const UVM: u32 = 4;
    /// Another NVIDIA node (modeset, uvm-tools, caps): counted only.
    pub const OTHER: u32 = 5;
}

/// What a `DriverEvent` reports.
pub mod driver_event {
    /// An ioctl returned.
    pub const IOCTL: u32 = 0;
    /// A driver fd (or an fd checked as not NVIDIA) was closed.
    pub const CLOSE: u32 = 1;
}

/// `DriverEvent::flags`.
pub mod decode_flags {
    /// The parameters were read and decoded by size (else only counted).
    pub const DECODED: u32 = 1;
    /// The escape came wrapped in XFER (`nr`/`size` are the inner ones).
    pub const XFER: u32 = 2;
    /// A parameter read from user memory failed.
    pub const READ_FAILED: u32 = 4;
}

/// RM status of an event whose parameters were not decoded.
pub const STATUS_UNKNOWN: u32 = u32::MAX;

/// One driver call, from the exit of its ioctl (or one close).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DriverEvent {
    /// `bpf_ktime_get_ns` at exit.
    pub timestamp_ns: u64,
    /// Time from entry to exit: blocked in the driver.
    pub duration_ns: u64,
    /// cgroup v2 id of the caller.
    pub cgroup_id: u64,
    /// Class-specific word of an RM_ALLOC's parameters: the VRAM size
    /// (class 0x40, `NV_MEMORY_ALLOCATION_PARAMS.size`), the device
    /// index (0x80), the engine type (channel group); the length of an
    /// RM_MAP_MEMORY; the limit of an RM_ALLOC_MEMORY.
    pub alloc_word: u64,
    /// Process.
    pub tgid: u32,
    /// The fd the ioctl was issued on.
    pub fd: u32,
    /// `driver_event`.
    pub event: u32,
    /// The ioctl request as issued.
    pub request: u32,
    /// Escape number after XFER unwrapping; for UVM fds, the raw command.
    pub nr: u32,
    /// Parameter size after XFER unwrapping.
    pub size: u32,
    /// Syscall return value.
    pub ret: i32,
    /// RM status written back by the driver (`STATUS_UNKNOWN` if not
    /// decoded).
    pub status: u32,
    /// hClass of an RM_ALLOC / RM_ALLOC_MEMORY.
    pub class: u32,
    /// RM_ALLOC: hRoot, hObjectParent, hObjectNew. RM_FREE: hRoot,
    /// hObjectParent, hObjectOld. RM_CONTROL: hClient, hObject, cmd.
    pub handles: [u32; 3],
    /// `fd_kind` known to the kernel at entry.
    pub fd_kind: u32,
    /// `decode_flags`.
    pub flags: u32,
}

#[cfg(feature = "user")]
// SAFETY: repr(C); four u64 then fourteen u32 (an even count): no padding
// (checked by a test), every bit pattern valid.
unsafe impl aya::Pod for DriverEvent {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_event_has_no_padding() {
        assert_eq!(core::mem::size_of::<DriverEvent>(), 4 * 8 + 14 * 4);
    }

    #[test]
    fn escape_shape_matches_driver_requests() {
        // RM_ALLOC with NVOS21 and NVOS64, XFER, the card-info escape.
        for request in [0xc020_462b_u32, 0xc030_462b, 0xc010_46d3, 0xca00_46c8, 0xc048_46d2] {
            assert!(is_escape_shaped(request), "{request:#x}");
        }
        // Framebuffer ('F', no direction), a read-only 'F', a UVM raw
        // command, an RW 'F' outside the escape ranges.
        for request in [0x4600_u32, 0x8020_462b, 0x3000_0001, 0xc004_4610] {
            assert!(!is_escape_shaped(request), "{request:#x}");
        }
    }
}
