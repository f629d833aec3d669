//! Where to put a uprobe in a shared library: the file offset of an
//! exported function, and of the PLT stub through which the library calls
//! a function of another library (libcuda's calls into libc's `ioctl`).
//!
//! A PLT stub is the one instruction every call from the library to that
//! function passes through, and it is the library's own code: a uprobe on
//! it fires for that library's calls only. It is found from the ELF, not
//! from a disassembler: the `JUMP_SLOT` relocation names the GOT slot of
//! the function, and the stub is the PLT entry whose indirect jump reads
//! that slot. A library linked with `-fno-plt` calls through the GOT with
//! no stub; it has no `JUMP_SLOT` for the function and gets none here.
use std::collections::HashMap;

use object::{Object, ObjectSection, ObjectSymbol, ObjectSymbolTable, RelocationFlags, RelocationTarget};

/// `R_X86_64_JUMP_SLOT`: a GOT slot that a PLT stub jumps through.
const R_X86_64_JUMP_SLOT: u32 = 7;
/// PLT entries are 16 bytes on x86-64, in `.plt` and in `.plt.sec` (IBT).
const PLT_ENTRY_BYTES: usize = 16;
/// `jmp *disp32(%rip)`.
const JMP_GOT: [u8; 2] = [0xff, 0x25];
/// `endbr64`, which IBT puts first in every entry.
const ENDBR64: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];
/// The `bnd` prefix (MPX PLTs).
const BND: u8 = 0xf2;

/// A symbol's address translated to a file offset (what a uprobe takes):
/// its offset within its section plus the section's file offset.
pub fn file_offset<'data, R: object::ReadRef<'data>>(elf: &object::File<'data, R>, symbol: &str) -> Option<u64> {
    let found = elf.dynamic_symbols().chain(elf.symbols()).find(|s| s.name() == Ok(symbol) && s.is_definition())?;
    let section = elf.section_by_index(found.section_index()?).ok()?;
    let (section_offset, _) = section.file_range()?;
    Some(found.address() - section.address() + section_offset)
}

/// File offset of `file`'s entry point (`_start`: run once, at exec).
pub fn entry_offset(file: &std::fs::File) -> std::io::Result<u64> {
    let cache = object::ReadCache::new(file);
    let elf = object::File::parse(&cache).map_err(std::io::Error::other)?;
    let entry = elf.entry();
    elf.sections()
        .find(|section| (section.address()..section.address() + section.size()).contains(&entry))
        .and_then(|section| Some(entry - section.address() + section.file_range()?.0))
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no section holds the entry point"))
}

/// File offsets of the PLT stubs through which `file` calls each of
/// `imports`, by name; an import without a stub is absent. Only x86-64
/// PLTs are read (other machines get none).
pub fn plt_stubs(file: &std::fs::File, imports: &[&str]) -> std::io::Result<HashMap<String, u64>> {
    let cache = object::ReadCache::new(file);
    let elf = object::File::parse(&cache).map_err(std::io::Error::other)?;
    Ok(plt_stubs_of(&elf, imports))
}

fn plt_stubs_of<'data, R: object::ReadRef<'data>>(
    elf: &object::File<'data, R>,
    imports: &[&str],
) -> HashMap<String, u64> {
    let mut stubs = HashMap::new();
    if elf.architecture() != object::Architecture::X86_64 {
        return stubs;
    }
    // GOT slot address -> import name.
    let mut slots = HashMap::new();
    for (slot, relocation) in elf.dynamic_relocations().into_iter().flatten() {
        let RelocationFlags::Elf { r_type: R_X86_64_JUMP_SLOT } = relocation.flags() else { continue };
        let RelocationTarget::Symbol(index) = relocation.target() else { continue };
        let Some(symbol) = elf.dynamic_symbol_table().and_then(|table| table.symbol_by_index(index).ok()) else {
            continue;
        };
        if let Some(name) = symbol.name().ok().filter(|name| imports.contains(name)) {
            slots.insert(slot, name.to_string());
        }
    }
    for section in elf.sections().filter(|s| matches!(s.name(), Ok(".plt" | ".plt.sec"))) {
        let (Ok(data), Some((file_start, _))) = (section.data(), section.file_range()) else { continue };
        for (index, entry) in data.chunks_exact(PLT_ENTRY_BYTES).enumerate() {
            let at = index * PLT_ENTRY_BYTES;
            let Some(slot) = got_slot_of(entry, section.address() + at as u64) else { continue };
            if let Some(name) = slots.get(&slot) {
                stubs.entry(name.clone()).or_insert(file_start + at as u64);
            }
        }
    }
    stubs
}

/// The GOT slot a PLT entry at `address` jumps through, if it starts
/// with one of the indirect jumps linkers emit there (optionally after
/// `endbr64` and with `bnd`).
fn got_slot_of(entry: &[u8], address: u64) -> Option<u64> {
    let mut at = 0;
    if entry.starts_with(&ENDBR64) {
        at += ENDBR64.len();
    }
    if entry.get(at) == Some(&BND) {
        at += 1;
    }
    if entry.get(at..at + 2)? != JMP_GOT {
        return None;
    }
    let displacement = i32::from_le_bytes(entry.get(at + 2..at + 6)?.try_into().ok()?);
    let next_instruction = address + (at + 6) as u64;
    Some(next_instruction.wrapping_add_signed(i64::from(displacement)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_is_read_in_every_linker_form() {
        let displacement = 0x1000i32.to_le_bytes();
        let plain = [&JMP_GOT[..], &displacement, &[0x68, 0, 0, 0, 0, 0xe9, 0, 0, 0, 0]].concat();
        assert_eq!(got_slot_of(&plain, 0x500), Some(0x500 + 6 + 0x1000));
        let ibt = [&ENDBR64[..], &[BND], &JMP_GOT, &displacement, &[0x0f, 0x1f, 0x44, 0x00, 0x00]].concat();
        assert_eq!(got_slot_of(&ibt, 0x500), Some(0x500 + 11 + 0x1000));
        let ibt_without_bnd = [&ENDBR64[..], &JMP_GOT, &displacement, &[0x66, 0x0f, 0x1f, 0x44, 0x00, 0x00]].concat();
        assert_eq!(got_slot_of(&ibt_without_bnd, 0x500), Some(0x500 + 10 + 0x1000));
        let negative = [&JMP_GOT[..], &(-0x20i32).to_le_bytes(), &[0u8; 10]].concat();
        assert_eq!(got_slot_of(&negative, 0x500), Some(0x500 + 6 - 0x20));
        // `.plt`'s first entry (push; jmp *GOT+16) and an IBT `.plt` entry
        // (endbr64; push; bnd jmp .plt) jump through no slot of their own.
        let header =
            [&[0xff, 0x35][..], &displacement, &[0xf2, 0xff, 0x25], &displacement, &[0x0f, 0x1f, 0x00]].concat();
        assert_eq!(got_slot_of(&header, 0x500), None);
        let lazy = [&ENDBR64[..], &[0x68, 1, 0, 0, 0], &[0xf2, 0xe9, 0, 0, 0, 0], &[0x90]].concat();
        assert_eq!(got_slot_of(&lazy, 0x500), None);
    }

    /// Builds a library that calls `ioctl` and `close` with the flags
    /// given, and checks the stubs found against where `objdump` puts
    /// `ioctl@plt` / `close@plt`.
    fn stubs_match_objdump(flags: &[&str]) -> HashMap<String, u64> {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("calls.c");
        std::fs::write(
            &source,
            "#include <sys/ioctl.h>\n#include <unistd.h>\n\
             int driver_ioctl(int fd, unsigned long request, void *arg) { return ioctl(fd, request, arg); }\n\
             int driver_close(int fd) { return close(fd); }\n",
        )
        .unwrap();
        let library = dir.path().join("libcalls.so");
        let built = std::process::Command::new("cc")
            .args(["-shared", "-fPIC", "-O2", "-o"])
            .arg(&library)
            .arg(&source)
            .args(flags)
            .status()
            .expect("cc runs");
        assert!(built.success(), "cc {flags:?}");
        let stubs = plt_stubs(&std::fs::File::open(&library).unwrap(), &["ioctl", "close", "absent"]).unwrap();
        assert!(!stubs.contains_key("absent"));
        let listing =
            std::process::Command::new("objdump").args(["-d", "-w"]).arg(&library).output().expect("objdump runs");
        let listing = String::from_utf8_lossy(&listing.stdout);
        let sections = std::process::Command::new("objdump").args(["-h", "-w"]).arg(&library).output().unwrap();
        let sections = String::from_utf8_lossy(&sections.stdout);
        for import in ["ioctl", "close"] {
            // `0000000000001030 <ioctl@plt>:` -> its address, then the
            // file offset through the section that holds it.
            let label = format!("<{import}@plt>:");
            let Some(address) = listing
                .lines()
                .find(|line| line.ends_with(&label))
                .and_then(|line| u64::from_str_radix(line.split_whitespace().next()?, 16).ok())
            else {
                assert!(!stubs.contains_key(import), "{flags:?}: a stub for {import} objdump does not show");
                continue;
            };
            let offset = sections
                .lines()
                .filter_map(|line| {
                    let fields: Vec<&str> = line.split_whitespace().collect();
                    let (size, vma, file_offset) = (
                        u64::from_str_radix(fields.get(2)?, 16).ok()?,
                        u64::from_str_radix(fields.get(3)?, 16).ok()?,
                        u64::from_str_radix(fields.get(5)?, 16).ok()?,
                    );
                    (vma..vma + size).contains(&address).then(|| address - vma + file_offset)
                })
                .next()
                .expect("a section holds the stub");
            assert_eq!(stubs.get(import), Some(&offset), "{flags:?}: {import}");
        }
        stubs
    }

    #[test]
    fn stubs_are_where_objdump_puts_them() {
        assert_eq!(stubs_match_objdump(&[]).len(), 2);
        assert_eq!(stubs_match_objdump(&["-Wl,-z,now"]).len(), 2);
        assert_eq!(stubs_match_objdump(&["-fcf-protection", "-Wl,-z,ibtplt"]).len(), 2);
        // Calls through the GOT have no stub to probe.
        assert!(stubs_match_objdump(&["-fno-plt"]).is_empty());
    }
}
