//! What one process holds in the NVIDIA driver, rebuilt from its decoded
//! calls: the resource-manager objects it allocated (per client handle),
//! which of them are GPU contexts, and the VRAM they hold.
//!
//! The driver's objects form a tree per client (client -> device ->
//! channel group -> channel -> compute object; device -> memory). A free
//! releases an object with its subtree, and freeing the client releases
//! all of it, so the tree is kept (handle -> parent) and walked on free
//! and to find which GPU a context lives on. Only calls that succeeded
//! (syscall 0 and RM status 0) change it.
use std::collections::HashMap;

use podgpu_common::driver::{decode_flags, escape, fd_kind, DriverEvent};

/// hClass values the accounting tells apart (`docs/gpu-driver-abi.md`).
mod class {
    pub const VRAM: u32 = 0x40;
    pub const DEVICE: u32 = 0x80;
    pub const CHANNEL_GROUP: u32 = 0xa06c;
    /// GPFIFO channels, Volta to Blackwell.
    pub const CHANNELS: [u32; 6] = [0xc36f, 0xc46f, 0xc56f, 0xc86f, 0xc96f, 0xca6f];
    /// Compute engine objects, Volta to Blackwell.
    pub const COMPUTE: [u32; 8] = [0xc3c0, 0xc5c0, 0xc6c0, 0xc7c0, 0xc9c0, 0xcbc0, 0xcdc0, 0xcec0];
}

/// UVM commands that register a GPU, address space or channel.
const UVM_REGISTRATIONS: [u32; 3] = [25, 27, 37];

/// What a driver call was, for per-pod counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CallKind {
    /// Client, device, address space setup; the driver's own escapes.
    Setup,
    /// Channel group, channel or compute object: part of a GPU context.
    Context,
    /// VRAM allocation (class 0x40).
    VramAlloc,
    /// Other allocations (system memory, events, ...).
    Alloc,
    /// Mapping memory into the process.
    Mapping,
    /// RM_CONTROL.
    Control,
    /// RM_FREE.
    Free,
    /// UVM registration (GPU, address space, channel).
    UvmRegistration,
    /// Other UVM commands.
    Uvm,
    /// An escape of unknown number or size: counted, not read.
    Undecoded,
    /// The driver refused it (syscall error or RM status).
    Failed,
}

impl CallKind {
    /// Every kind, in display order.
    pub const ALL: [CallKind; 11] = [
        CallKind::Setup,
        CallKind::Context,
        CallKind::VramAlloc,
        CallKind::Alloc,
        CallKind::Mapping,
        CallKind::Control,
        CallKind::Free,
        CallKind::UvmRegistration,
        CallKind::Uvm,
        CallKind::Undecoded,
        CallKind::Failed,
    ];

    /// Label value in `/metrics`.
    pub fn name(self) -> &'static str {
        match self {
            CallKind::Setup => "setup",
            CallKind::Context => "context",
            CallKind::VramAlloc => "vram_alloc",
            CallKind::Alloc => "alloc",
            CallKind::Mapping => "mapping",
            CallKind::Control => "control",
            CallKind::Free => "free",
            CallKind::UvmRegistration => "uvm_registration",
            CallKind::Uvm => "uvm",
            CallKind::Undecoded => "undecoded",
            CallKind::Failed => "failed",
        }
    }
}

/// One live resource-manager object.
#[derive(Clone, Copy, Debug)]
struct RmObject {
    class: u32,
    parent: u32,
    /// VRAM bytes (class 0x40), device index (0x80), else 0.
    word: u64,
}

/// GPU device a context is on when its tree does not lead to a device
/// object (allocated before the agent started watching).
pub const UNKNOWN_DEVICE: u32 = u32::MAX;

/// The driver state of one process.
#[derive(Clone, Debug, Default)]
pub struct ProcessDriver {
    /// Objects by (client, handle).
    objects: HashMap<(u32, u32), RmObject>,
    /// Driver calls, by kind.
    pub calls: HashMap<CallKind, u64>,
    /// Time blocked in driver calls, ns.
    pub blocked_ns: u64,
}

impl ProcessDriver {
    /// Books one ioctl's exit; returns what it was.
    pub fn apply(&mut self, event: &DriverEvent) -> CallKind {
        let kind = self.classify_and_apply(event);
        *self.calls.entry(kind).or_default() += 1;
        // Kernel-reported, but never trusted not to wrap (found by fuzzing).
        self.blocked_ns = self.blocked_ns.saturating_add(event.duration_ns);
        kind
    }

    fn classify_and_apply(&mut self, event: &DriverEvent) -> CallKind {
        if event.fd_kind == fd_kind::UVM {
            return if event.ret != 0 {
                CallKind::Failed
            } else if UVM_REGISTRATIONS.contains(&event.nr) {
                CallKind::UvmRegistration
            } else {
                CallKind::Uvm
            };
        }
        let decoded = event.flags & decode_flags::DECODED != 0;
        if event.ret != 0 || (decoded && event.status != 0) {
            return CallKind::Failed;
        }
        if !decoded {
            return if event.nr >= escape::FIRST_NV && event.nr <= escape::LAST_NV {
                CallKind::Setup
            } else {
                CallKind::Undecoded
            };
        }
        let [client, parent, handle] = event.handles;
        match event.nr {
            escape::RM_ALLOC => {
                self.objects.insert((client, handle), RmObject { class: event.class, parent, word: event.alloc_word });
                match event.class {
                    class::VRAM => CallKind::VramAlloc,
                    class::CHANNEL_GROUP => CallKind::Context,
                    c if class::CHANNELS.contains(&c) || class::COMPUTE.contains(&c) => CallKind::Context,
                    0x0 | 0x41 | class::DEVICE | 0x2080 | 0x90f1 => CallKind::Setup,
                    _ => CallKind::Alloc,
                }
            }
            escape::RM_ALLOC_MEMORY => {
                self.objects.insert((client, handle), RmObject { class: event.class, parent, word: 0 });
                CallKind::Alloc
            }
            escape::RM_FREE => {
                self.free(client, handle);
                CallKind::Free
            }
            escape::RM_CONTROL => CallKind::Control,
            escape::RM_MAP_MEMORY => CallKind::Mapping,
            _ => CallKind::Undecoded,
        }
    }

    /// Releases `handle` and everything allocated under it; the client
    /// handle itself releases the whole client.
    fn free(&mut self, client: u32, handle: u32) {
        if handle == client {
            self.objects.retain(|(owner, _), _| *owner != client);
            return;
        }
        let mut doomed = vec![handle];
        while let Some(next) = doomed.pop() {
            if self.objects.remove(&(client, next)).is_none() && next != handle {
                continue;
            }
            doomed.extend(
                self.objects
                    .iter()
                    .filter(|((owner, _), object)| *owner == client && object.parent == next)
                    .map(|((_, child), _)| *child),
            );
        }
    }

    /// VRAM bytes the process holds through the driver.
    pub fn vram_bytes(&self) -> u64 {
        self.objects
            .values()
            .filter(|object| object.class == class::VRAM)
            .fold(0u64, |total, object| total.saturating_add(object.word))
    }

    /// GPUs (device index, or `UNKNOWN_DEVICE`) on which the process holds
    /// a context: a live channel group, channel or compute object.
    pub fn context_devices(&self) -> Vec<u32> {
        let mut devices: Vec<u32> = self
            .objects
            .iter()
            .filter(|(_, object)| {
                object.class == class::CHANNEL_GROUP
                    || class::CHANNELS.contains(&object.class)
                    || class::COMPUTE.contains(&object.class)
            })
            .map(|((client, handle), _)| self.device_of(*client, *handle))
            .collect();
        devices.sort_unstable();
        devices.dedup();
        devices
    }

    /// Follows parents up to a device object.
    fn device_of(&self, client: u32, handle: u32) -> u32 {
        let mut current = handle;
        // Trees are a handful of levels deep; the bound guards cycles.
        for _ in 0..16 {
            let Some(object) = self.objects.get(&(client, current)) else { break };
            if object.class == class::DEVICE {
                return object.word as u32;
            }
            current = object.parent;
        }
        UNKNOWN_DEVICE
    }

    /// Calls of every kind.
    pub fn total_calls(&self) -> u64 {
        self.calls.values().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alloc(handles: [u32; 3], class: u32, word: u64) -> DriverEvent {
        DriverEvent {
            nr: escape::RM_ALLOC,
            size: 32,
            handles,
            class,
            alloc_word: word,
            fd_kind: fd_kind::CONTROL,
            flags: decode_flags::DECODED,
            duration_ns: 1_000,
            ..DriverEvent::default()
        }
    }

    fn free(handles: [u32; 3]) -> DriverEvent {
        DriverEvent { nr: escape::RM_FREE, size: 16, handles, flags: decode_flags::DECODED, ..DriverEvent::default() }
    }

    /// Regression (fuzz/driver_ioctls): blocked time and VRAM sizes from
    /// garbage events saturate instead of overflowing.
    #[test]
    fn huge_durations_and_sizes_saturate() {
        let mut process = ProcessDriver::default();
        let mut slow = alloc([1, 10, 50], class::VRAM, u64::MAX);
        slow.duration_ns = u64::MAX;
        process.apply(&slow);
        process.apply(&alloc([1, 10, 51], class::VRAM, u64::MAX));
        process.apply(&DriverEvent { duration_ns: u64::MAX, ..free([9, 9, 9]) });
        assert_eq!(process.blocked_ns, u64::MAX);
        assert_eq!(process.vram_bytes(), u64::MAX);
        assert_eq!(process.total_calls(), 3);
    }

    /// A CUDA-shaped tree: client, device 1, channel group, channel,
    /// compute object, and two VRAM allocations.
    fn context_on_device_1() -> ProcessDriver {
        let mut process = ProcessDriver::default();
        for (event, kind) in [
            (alloc([1, 0, 1], 0x41, 0), CallKind::Setup),
            (alloc([1, 1, 10], class::DEVICE, 1), CallKind::Setup),
            (alloc([1, 10, 20], class::CHANNEL_GROUP, 1), CallKind::Context),
            (alloc([1, 20, 30], 0xc86f, 0), CallKind::Context),
            (alloc([1, 30, 40], 0xcbc0, 0), CallKind::Context),
            (alloc([1, 10, 50], class::VRAM, 64 << 20), CallKind::VramAlloc),
            (alloc([1, 10, 51], class::VRAM, 2 << 20), CallKind::VramAlloc),
        ] {
            assert_eq!(process.apply(&event), kind);
        }
        process
    }

    #[test]
    fn contexts_and_memory_follow_allocations() {
        let process = context_on_device_1();
        assert_eq!(process.context_devices(), vec![1]);
        assert_eq!(process.vram_bytes(), 66 << 20);
        assert_eq!(process.total_calls(), 7);
        assert_eq!(process.blocked_ns, 7_000);
    }

    #[test]
    fn a_free_releases_the_subtree_and_the_client_everything() {
        let mut process = context_on_device_1();
        assert_eq!(process.apply(&free([1, 10, 51])), CallKind::Free);
        assert_eq!(process.vram_bytes(), 64 << 20);
        // Freeing the channel group takes the channel and compute object.
        process.apply(&free([1, 10, 20]));
        assert!(process.context_devices().is_empty());
        assert_eq!(process.vram_bytes(), 64 << 20);
        process.apply(&free([1, 0, 1]));
        assert_eq!(process.vram_bytes(), 0);
    }

    #[test]
    fn failed_and_undecoded_calls_change_nothing() {
        let mut process = ProcessDriver::default();
        let refused = DriverEvent { status: 0x51, ..alloc([1, 10, 50], class::VRAM, 1 << 30) };
        assert_eq!(process.apply(&refused), CallKind::Failed);
        let errno = DriverEvent { ret: -22, ..alloc([1, 10, 50], class::VRAM, 1 << 30) };
        assert_eq!(process.apply(&errno), CallKind::Failed);
        let unknown_size =
            DriverEvent { nr: escape::RM_ALLOC, size: 40, flags: 0, alloc_word: 1 << 30, ..DriverEvent::default() };
        assert_eq!(process.apply(&unknown_size), CallKind::Undecoded);
        assert_eq!(process.vram_bytes(), 0);
        assert_eq!(process.total_calls(), 3);
    }

    #[test]
    fn a_context_without_its_device_is_on_an_unknown_gpu() {
        let mut process = ProcessDriver::default();
        process.apply(&alloc([7, 99, 20], class::CHANNEL_GROUP, 1));
        assert_eq!(process.context_devices(), vec![UNKNOWN_DEVICE]);
    }

    #[test]
    fn uvm_commands_are_classified_by_number() {
        let mut process = ProcessDriver::default();
        let uvm = |nr| DriverEvent { nr, fd_kind: fd_kind::UVM, ..DriverEvent::default() };
        assert_eq!(process.apply(&uvm(37)), CallKind::UvmRegistration);
        assert_eq!(process.apply(&uvm(0x3000_0001)), CallKind::Uvm);
        assert_eq!(process.apply(&DriverEvent { ret: -1, ..uvm(27) }), CallKind::Failed);
    }
}
