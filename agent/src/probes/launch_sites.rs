//! Launch sites: the code a kernel handle is launched from, named the way
//! profilers name code (the module's build id and an offset in it), so
//! that a handle whose creation the identity probes never saw (a process
//! that loaded its kernels before the agent attached, e.g. every process
//! across an agent restart) can still be recognised as a kernel another
//! process launches (`site_book`).
//!
//! The launch probes keep, at a handle's first launch in a process, the
//! call's return address and the top of the user stack
//! (`podgpu_common::LaunchSite`). Here the return address is the first
//! frame; further frames are found by scanning the kept stack for words
//! that point just after a call instruction in an executable file mapping
//! (what unwinders fall back to without frame pointers or unwind tables).
//! A frame is (module, file offset): the module is its file's GNU build
//! id, or its name and size where it has none, so the same code in two
//! containers (two overlay mounts of one image) is one module.
//!
//! A site is named by keys (`site_keys`): the first frame with the
//! launch's block size, and that with each further frame. A key names a
//! code path, not a kernel: one path may launch many kernels (the CUDA
//! runtime's own launch call does, for every kernel of the program), and a
//! scanned word may be stale (an uninitialised local still holding a
//! return address from an earlier, deeper call: the lazy loading of the
//! kernel just before its first launch leaves some). `site_book` decides
//! which keys stand for one kernel.
use std::collections::{HashMap, HashSet};
use std::os::unix::fs::FileExt as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use podgpu_common::{fnv1a, LaunchSite, FNV_OFFSET};

use super::site_book::SiteBook;
use crate::proc::{CodeMapping, ProcFs};

/// Frames kept per site: the return address and the next ones the scan
/// finds. Stale words take places too, so there are more places than a
/// runtime's few frames between the kernel's host stub and libcuda.
pub const SITE_FRAMES: usize = 8;

/// One frame: the code's module and the return address's offset in its file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Frame {
    /// Build id hash of the module's file (or of its name and size).
    pub module: u64,
    /// File offset of the return address.
    pub offset: u64,
}

/// The signature of a launch path: its frames and block size. Never 0.
pub fn signature(block: [u32; 3], frames: &[Frame]) -> u64 {
    let mut hash = fnv1a(FNV_OFFSET, b"launch site");
    for dimension in block {
        hash = fnv1a(hash, &dimension.to_le_bytes());
    }
    for frame in frames {
        hash = fnv1a(hash, &frame.module.to_le_bytes());
        hash = fnv1a(hash, &frame.offset.to_le_bytes());
    }
    hash.max(1)
}

/// The keys of a site: the first frame (the launch call itself) with the
/// block size, then the first frame with each further one. Each is
/// evidence on its own, so a stale word among the frames spoils one key,
/// not the site.
pub fn site_keys(block: [u32; 3], frames: &[Frame]) -> Vec<u64> {
    let Some(&first) = frames.first() else { return Vec::new() };
    let mut keys = vec![signature(block, &[first])];
    keys.extend(frames[1..].iter().map(|&frame| signature(block, &[first, frame])));
    keys
}

/// Whether the bytes that end at a return address end with an x86-64
/// call: `call rel32` (`e8`), or `call r/m64` (`ff /2`, with an optional
/// REX and `notrack` prefix) whose length, decoded from its ModRM and SIB
/// bytes, ends exactly there. `before` holds the bytes just before the
/// return address, the last one adjacent to it.
pub fn ends_with_call(before: &[u8]) -> bool {
    let len = before.len();
    if len >= 5 && before[len - 5] == 0xe8 {
        return true;
    }
    (2..=len).any(|size| {
        let instruction = &before[len - size..];
        // At most two prefixes: `notrack` (3e), then a REX.
        (0..=2.min(size - 2)).any(|prefix_len| {
            let (prefixes, rest) = instruction.split_at(prefix_len);
            let prefixes_ok = match prefixes {
                [] => true,
                [single] => (0x40..=0x4f).contains(single) || *single == 0x3e,
                [0x3e, rex] => (0x40..=0x4f).contains(rex),
                _ => false,
            };
            prefixes_ok
                && rest[0] == 0xff
                && (rest[1] >> 3) & 7 == 2
                && call_length(&rest[1..]) == Some(size - prefix_len)
        })
    })
}

/// Length of `ff /2` from its opcode on, given the bytes from its ModRM
/// on (`None` where they do not say).
fn call_length(operands: &[u8]) -> Option<usize> {
    let modrm = *operands.first()?;
    let (mode, rm) = (modrm >> 6, modrm & 7);
    let sib = (mode != 3 && rm == 4) as usize;
    let displacement = match mode {
        3 => 0,
        1 => 1,
        2 => 4,
        // Mode 0: rm 5 is RIP-relative; a SIB with base 5 has a disp32.
        _ if rm == 5 => 4,
        _ if sib == 1 && operands.get(1)? & 7 == 5 => 4,
        _ => 0,
    };
    Some(2 + sib + displacement)
}

/// A module's identity and its open file (for reading the bytes before
/// return addresses).
struct Module {
    id: u64,
    file: std::fs::File,
}

/// Turns kept launch sites into keys: reads the process's maps,
/// opens each module once (by device and inode) and hashes its build id.
pub struct SiteResolver {
    proc: ProcFs,
    /// By (device, inode): open files, at most `MAX_OPEN_MODULES`.
    modules: HashMap<(String, u64), Module>,
}

/// Module files kept open between reads (each holds an fd of the agent).
const MAX_OPEN_MODULES: usize = 64;

impl SiteResolver {
    /// A resolver reading processes through `proc`.
    pub fn new(proc: ProcFs) -> Self {
        Self { proc, modules: HashMap::new() }
    }

    /// The keys of `site`, kept from a launch in `pid` (`None` when its
    /// return address is in no file mapping of the process, or the
    /// process is gone).
    /// `mappings` are the process's (`code_mappings`), read once for all
    /// its new sites: a CUDA process maps thousands of regions.
    pub fn keys(&mut self, pid: u32, site: &LaunchSite, mappings: &[CodeMapping]) -> Option<Vec<u64>> {
        let first = self.frame(pid, mappings, site.return_address, false)?;
        let mut frames = vec![first];
        // On x86-64 the stack's first word is the return address itself.
        let skip = usize::from(site.stack.first() == Some(&site.return_address));
        for &word in site.stack.iter().skip(skip) {
            if frames.len() == SITE_FRAMES {
                break;
            }
            if let Some(frame) = self.frame(pid, mappings, word, true) {
                frames.push(frame);
            }
        }
        tracing::debug!(pid, frames = ?frames, "launch site resolved");
        Some(site_keys(site.block, &frames))
    }

    /// The frame of `address` in `pid`; with `verify`, only where a call
    /// instruction ends there (a stack word that is not a return address
    /// is skipped).
    fn frame(&mut self, pid: u32, mappings: &[CodeMapping], address: u64, verify: bool) -> Option<Frame> {
        let index = mappings.partition_point(|mapping| mapping.end <= address);
        let mapping = mappings.get(index)?;
        let offset = mapping.file_offset(address)?;
        let key = (mapping.file.device.clone(), mapping.file.inode);
        if !self.modules.contains_key(&key) {
            // A file that cannot be opened now (its process just exited)
            // is tried again next time, not remembered as unreadable.
            let opened = open_module(&self.proc, pid, mapping)?;
            if self.modules.len() >= MAX_OPEN_MODULES {
                self.modules.clear();
            }
            self.modules.insert(key.clone(), opened);
        }
        let module = self.modules.get(&key)?;
        if verify {
            // Nine bytes cover every call form `ends_with_call` knows.
            let start = offset.checked_sub(9)?;
            let mut before = [0u8; 9];
            module.file.read_exact_at(&mut before, start).ok()?;
            if !ends_with_call(&before) {
                return None;
            }
        }
        Some(Frame { module: module.id, offset })
    }
}

/// Opens the file of `mapping` through `pid`'s root and names it.
fn open_module(proc: &ProcFs, pid: u32, mapping: &CodeMapping) -> Option<Module> {
    let file = proc.open_mapped(pid, &mapping.file).ok()?;
    let id = module_id(&file, &mapping.file.path)?;
    Some(Module { id, file })
}

/// A module's identity: its GNU build id, or its file name and size where
/// it has none (the same file in every container that ships it).
fn module_id(file: &std::fs::File, path: &str) -> Option<u64> {
    let cache = object::ReadCache::new(file);
    let build_id = object::File::parse(&cache).ok().and_then(|elf| {
        use object::Object as _;
        elf.build_id().ok().flatten().map(|id| id.to_vec())
    });
    match build_id {
        Some(id) if !id.is_empty() => Some(fnv1a(fnv1a(FNV_OFFSET, b"build id"), &id)),
        _ => {
            let name = path.rsplit('/').next().unwrap_or(path);
            let size = file.metadata().ok()?.len();
            Some(fnv1a(fnv1a(FNV_OFFSET, name.as_bytes()), &size.to_le_bytes()))
        }
    }
}

/// How often the book is written (when it changed).
const SAVE_EVERY: Duration = Duration::from_secs(30);

/// Names handles from their launch sites: resolves each kept site once,
/// learns from the named handles and keeps the book (`site_book`).
pub struct SiteNames {
    resolver: SiteResolver,
    book: SiteBook,
    path: Option<PathBuf>,
    /// Site keys per (process, handle); `None`: could not be resolved.
    sites: HashMap<(u32, u64), Option<Vec<u64>>>,
    saved_at: Instant,
}

impl SiteNames {
    /// Starts from the book at `path` (`None`: nothing is kept across
    /// restarts).
    pub fn new(proc: ProcFs, path: Option<PathBuf>) -> Self {
        let book = path.as_deref().map(SiteBook::load_or_empty).unwrap_or_default();
        Self { resolver: SiteResolver::new(proc), book, path, sites: HashMap::new(), saved_at: Instant::now() }
    }

    /// The identities of the `launched` handles (process, handle) the
    /// identity probes did not name, from their launch sites (`site`
    /// fetches the one the launch probes kept; each is resolved once) and
    /// the handles `named`.
    pub fn name(
        &mut self,
        launched: impl IntoIterator<Item = (u32, u64)>,
        mut site: impl FnMut((u32, u64)) -> Option<LaunchSite>,
        named: &HashMap<(u32, u64), u64>,
    ) -> HashMap<(u32, u64), u64> {
        let mut mappings: HashMap<u32, Vec<CodeMapping>> = HashMap::new();
        for handle in launched {
            if !self.sites.contains_key(&handle) {
                let keys = site(handle).and_then(|kept| {
                    let pid = handle.0;
                    let mappings = mappings.entry(pid).or_insert_with(|| self.resolver.proc.code_mappings(pid));
                    self.resolver.keys(pid, &kept, mappings)
                });
                self.sites.insert(handle, keys);
            }
        }
        let sites: HashMap<(u32, u64), &[u64]> =
            self.sites.iter().filter_map(|(handle, keys)| Some((*handle, keys.as_deref()?))).collect();
        let now_unix =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |since| since.as_secs());
        let recovered = self.book.recover(&sites, named, now_unix);
        if let Some(path) = &self.path {
            if self.saved_at.elapsed() >= SAVE_EVERY {
                self.saved_at = Instant::now();
                if let Err(err) = self.book.save(path) {
                    tracing::warn!(error = %err, "saving the launch-site book");
                }
            }
        }
        recovered
    }

    /// Forgets the sites of exited processes.
    pub fn forget(&mut self, pids: &HashSet<u32>) {
        self.sites.retain(|(pid, _), _| !pids.contains(pid));
    }

    /// Writes the book now (at shutdown).
    pub fn save(&mut self) {
        if let Some(path) = &self.path {
            if let Err(err) = self.book.save(path) {
                tracing::warn!(error = %err, "saving the launch-site book");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The call forms compilers emit before a return address are known;
    /// other bytes (data, the middle of an instruction) are not.
    #[test]
    fn calls_are_told_from_other_bytes() {
        let tail = |bytes: &[u8]| {
            let mut before = vec![0x90u8; 9 - bytes.len()];
            before.extend_from_slice(bytes);
            before
        };
        assert!(ends_with_call(&tail(&[0xe8, 1, 2, 3, 4])), "call rel32");
        assert!(ends_with_call(&tail(&[0xff, 0xd0])), "call *%rax");
        assert!(ends_with_call(&tail(&[0x41, 0xff, 0xd4])), "call *%r12");
        assert!(ends_with_call(&tail(&[0xff, 0x15, 1, 2, 3, 4])), "call *disp32(%rip)");
        assert!(ends_with_call(&tail(&[0xff, 0x50, 0x08])), "call *8(%rax)");
        assert!(ends_with_call(&tail(&[0xff, 0x54, 0x24, 0x08])), "call *8(%rsp) (SIB)");
        assert!(ends_with_call(&tail(&[0x3e, 0xff, 0xd0])), "notrack call *%rax");
        assert!(ends_with_call(&tail(&[0xff, 0x90, 1, 2, 3, 4])), "call *disp32(%rax)");
        assert!(!ends_with_call(&[0x90; 9]), "nops");
        assert!(!ends_with_call(&tail(&[0xff, 0xe0])), "jmp *%rax is not a call");
        assert!(!ends_with_call(&tail(&[0xff, 0x15, 1, 2])), "a call cut short");
        assert!(!ends_with_call(&tail(&[0x48, 0x89, 0xc7])), "mov");
    }

    /// One path, one signature; another block size or frame, another.
    #[test]
    fn signatures_cover_frames_and_block() {
        let frames = [Frame { module: 7, offset: 0x1234 }, Frame { module: 9, offset: 0x40 }];
        assert_eq!(signature([256, 1, 1], &frames), signature([256, 1, 1], &frames));
        assert_ne!(signature([256, 1, 1], &frames), signature([128, 1, 1], &frames));
        assert_ne!(signature([256, 1, 1], &frames), signature([256, 1, 1], &frames[..1]));
        let moved = [frames[0], Frame { module: 9, offset: 0x44 }];
        assert_ne!(signature([256, 1, 1], &frames), signature([256, 1, 1], &moved));
        assert_ne!(signature([0; 3], &[]), 0);
    }

    /// A site's keys: the launch call alone, then with each further frame.
    #[test]
    fn keys_pair_the_launch_call_with_each_frame() {
        let frames =
            [Frame { module: 7, offset: 0x10 }, Frame { module: 9, offset: 0x20 }, Frame { module: 9, offset: 0x30 }];
        let keys = site_keys([256, 1, 1], &frames);
        assert_eq!(
            keys,
            [
                signature([256, 1, 1], &frames[..1]),
                signature([256, 1, 1], &frames[..2]),
                signature([256, 1, 1], &[frames[0], frames[2]]),
            ]
        );
        assert!(site_keys([256, 1, 1], &[]).is_empty());
    }
}
