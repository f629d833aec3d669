//! The driver-path decoder fed arbitrary ioctl exits (any request, escape
//! number, class, handles, sizes, statuses, in any order, as a process
//! that allocates and frees RM objects might issue them, or garbage). It
//! must not panic, and its counts add up.
#![no_main]
use libfuzzer_sys::fuzz_target;
use podgpu_agent::probes::driver::objects::ProcessDriver;
use podgpu_common::driver::DriverEvent;

fuzz_target!(|data: &[u8]| {
    let size = core::mem::size_of::<DriverEvent>();
    let mut process = ProcessDriver::default();
    let mut applied = 0u64;
    for chunk in data.chunks_exact(size) {
        // SAFETY: DriverEvent is repr(C) integers without padding (a
        // podgpu-common test checks): every bit pattern is a valid value.
        let event: DriverEvent = unsafe { core::ptr::read_unaligned(chunk.as_ptr().cast()) };
        process.apply(&event);
        applied += 1;
        let _ = process.vram_bytes();
        let _ = process.context_devices();
    }
    assert_eq!(process.total_calls(), applied);
});
