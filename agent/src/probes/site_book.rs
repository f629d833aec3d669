//! The launch-site book: which site keys (`launch_sites`) stand for one
//! kernel, learned from the handles the identity probes named, and used to
//! name the handles they did not see created.
//!
//! A key is booked with a kernel while every named handle seen with it had
//! that kernel's identity; a key seen with two is generic (the CUDA
//! runtime's launch call, a launcher shared by many kernels, a stale word
//! every lazy load leaves) and names nothing, for good. A handle without a
//! name takes the kernel its keys name when at least one of them names one
//! and none names another. Only keys that no other handle of its process
//! has count: a path that launches two handles in one process cannot say
//! which is which.
//!
//! What this cannot know: a code path that launches kernel A in every
//! process the probes saw named and kernel B in one they did not (a
//! launcher whose kernel comes from data, used for one kernel per
//! process). The block size in the keys tells most such kernels apart;
//! where it does not, B shares A's cost until a named process launches B
//! from that path too. The book is kept in a file beside the cost catalog,
//! so that what was learned before an agent restart names the handles of
//! the processes that outlive it.
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

/// Sites kept (the least recently seen go first).
pub const MAX_SITES: usize = 16_384;

/// What a site is known to launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BookedSite {
    /// The site's signature.
    pub site: u64,
    /// The one kernel identity launched from it (`None`: several).
    pub kernel: Option<u64>,
    /// Unix time it was last seen.
    pub seen_unix: u64,
}

/// The book as stored.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
struct Stored {
    version: u32,
    sites: Vec<BookedSite>,
}

/// Why the book could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum BookError {
    /// Reading or writing failed.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a launch-site book.
    #[error("{path}: not a launch-site book: {reason}")]
    Format {
        /// File.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
}

/// Sites and what they launch.
#[derive(Debug, Default)]
pub struct SiteBook {
    sites: HashMap<u64, BookedSite>,
    changed: bool,
}

impl SiteBook {
    /// Reads the book at `path`; an absent file is an empty book.
    pub fn load(path: &Path) -> Result<Self, BookError> {
        let text =
            crate::files::read_if_present(path).map_err(|source| BookError::Io { path: path.to_path_buf(), source })?;
        let Some(text) = text else { return Ok(Self::default()) };
        let stored: Stored = serde_json::from_str(&text)
            .map_err(|err| BookError::Format { path: path.to_path_buf(), reason: err.to_string() })?;
        if stored.version != 1 {
            let reason = format!("version {} (this agent writes 1)", stored.version);
            return Err(BookError::Format { path: path.to_path_buf(), reason });
        }
        let mut book = Self { sites: stored.sites.into_iter().map(|s| (s.site, s)).collect(), changed: false };
        book.bound();
        Ok(book)
    }

    /// Reads `path`, or starts empty (a malformed file is moved aside to
    /// `PATH.bad`, not overwritten). Says what happened.
    pub fn load_or_empty(path: &Path) -> Self {
        match Self::load(path) {
            Ok(book) => {
                tracing::info!(path = %path.display(), sites = book.sites.len(), "launch-site book loaded");
                book
            }
            Err(err) => {
                crate::files::move_aside(path, "launch-site book", &err);
                Self::default()
            }
        }
    }

    /// Writes the book atomically if it changed since the last save.
    pub fn save(&mut self, path: &Path) -> Result<(), BookError> {
        if !self.changed {
            return Ok(());
        }
        let io = |source| BookError::Io { path: path.to_path_buf(), source };
        let mut sites: Vec<BookedSite> = self.sites.values().copied().collect();
        sites.sort_by_key(|s| s.site);
        let json = serde_json::to_vec(&Stored { version: 1, sites }).map_err(|err| io(std::io::Error::other(err)))?;
        crate::files::write_atomically(path, &json).map_err(io)?;
        self.changed = false;
        Ok(())
    }

    /// The kernel booked for `site`, if it has exactly one.
    pub fn kernel(&self, site: u64) -> Option<u64> {
        self.sites.get(&site)?.kernel
    }

    /// Books `kernel` as launched from `site` at `now_unix`.
    pub fn learn(&mut self, site: u64, kernel: u64, now_unix: u64) {
        let booked = self.sites.entry(site).or_insert_with(|| {
            self.changed = true;
            BookedSite { site, kernel: Some(kernel), seen_unix: now_unix }
        });
        if booked.kernel.is_some_and(|known| known != kernel) {
            booked.kernel = None;
            self.changed = true;
        }
        // The time is refreshed in memory; a save for it alone can wait.
        booked.seen_unix = now_unix;
        if self.sites.len() > MAX_SITES + MAX_SITES / 8 {
            self.bound();
        }
    }

    /// Keeps the `MAX_SITES` most recently seen.
    fn bound(&mut self) {
        if self.sites.len() <= MAX_SITES {
            return;
        }
        let mut seen: Vec<(u64, u64)> = self.sites.values().map(|s| (s.seen_unix, s.site)).collect();
        seen.sort_unstable_by(|a, b| b.cmp(a));
        let keep: HashSet<u64> = seen.into_iter().take(MAX_SITES).map(|(_, site)| site).collect();
        self.sites.retain(|site, _| keep.contains(site));
        self.changed = true;
    }

    /// Sites booked.
    pub fn len(&self) -> usize {
        self.sites.len()
    }

    /// Whether nothing is booked.
    pub fn is_empty(&self) -> bool {
        self.sites.is_empty()
    }

    /// Learns from the named handles among `sites` (handle -> its site's
    /// keys), then names the others where the book and their process
    /// allow: returns the identities so recovered, by (process, handle).
    pub fn recover(
        &mut self,
        sites: &HashMap<(u32, u64), &[u64]>,
        named: &HashMap<(u32, u64), u64>,
        now_unix: u64,
    ) -> HashMap<(u32, u64), u64> {
        let mut handles_per_key: HashMap<(u32, u64), usize> = HashMap::new();
        for (&(pid, handle), keys) in sites {
            let distinct: HashSet<u64> = keys.iter().copied().collect();
            for key in distinct {
                *handles_per_key.entry((pid, key)).or_default() += 1;
            }
            if let Some(&kernel) = named.get(&(pid, handle)) {
                for &key in keys.iter() {
                    self.learn(key, kernel, now_unix);
                }
            }
        }
        let mut recovered = HashMap::new();
        for (&(pid, handle), keys) in sites.iter().filter(|(handle, _)| !named.contains_key(handle)) {
            let mut kernels =
                keys.iter().filter(|key| handles_per_key[&(pid, **key)] == 1).filter_map(|key| self.kernel(*key));
            let Some(first) = kernels.next() else { continue };
            if kernels.all(|kernel| kernel == first) {
                recovered.insert((pid, handle), first);
            }
        }
        recovered
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A key named by one kernel names an unnamed handle that has it in
    /// another process; a key seen with two kernels names nothing, and
    /// neither does a key two handles of one process share. Behind a
    /// runtime, the launch call's own key is generic and a stale word's
    /// too, but the host stub's frame decides; keys naming two different
    /// kernels decide nothing.
    #[test]
    fn keys_name_handles_only_where_they_stand_for_one_kernel() {
        let mut book = SiteBook::default();
        let (gemm, add, mul) = (0x6e11, 0xadd, 0x5ca1e);
        // Keys: 0x51 a direct caller's launch call; 0x52 a runtime's launch
        // call, 0x61/0x62 its two kernels' stubs, 0x6f a stale word; 0x53
        // a launcher shared by two kernels in one process.
        let keys: HashMap<(u32, u64), Vec<u64>> = [
            ((1, 0xa), vec![0x51]),
            ((2, 0xb), vec![0x51]),
            ((1, 0xc), vec![0x52, 0x6f, 0x61]),
            ((1, 0xd), vec![0x52, 0x6f, 0x62]),
            ((3, 0xe), vec![0x52, 0x61]),
            ((3, 0xf), vec![0x52, 0x62]),
            ((4, 0x10), vec![0x53]),
            ((4, 0x11), vec![0x53]),
            ((5, 0x12), vec![0x53]),
            ((6, 0x13), vec![0x52, 0x61, 0x62]),
        ]
        .into();
        let sites: HashMap<(u32, u64), &[u64]> = keys.iter().map(|(h, k)| (*h, k.as_slice())).collect();
        let named: HashMap<(u32, u64), u64> =
            [((1, 0xa), gemm), ((1, 0xc), gemm), ((1, 0xd), add), ((4, 0x10), add), ((4, 0x11), mul)].into();
        let recovered = book.recover(&sites, &named, 100);
        assert_eq!(recovered.get(&(2, 0xb)), Some(&gemm), "the replica takes its site's kernel");
        assert_eq!(recovered.get(&(3, 0xe)), Some(&gemm), "behind a runtime, the stub's frame decides");
        assert_eq!(recovered.get(&(3, 0xf)), Some(&add));
        assert_eq!(book.kernel(0x52), None, "the runtime's launch call names nothing");
        assert_eq!(book.kernel(0x6f), None, "nor does a stale word both kernels had");
        assert_eq!(recovered.get(&(5, 0x12)), None, "a launcher of two kernels names nothing");
        assert_eq!(recovered.get(&(6, 0x13)), None, "keys naming two kernels decide nothing");
        assert!(!recovered.contains_key(&(1, 0xa)), "named handles keep their names");
        // Once generic, always: one more sighting of one kernel does not undo it.
        book.learn(0x52, gemm, 101);
        assert_eq!(book.kernel(0x52), None);
        // Two handles of one process sharing a key: that key cannot decide.
        let shared: HashMap<(u32, u64), &[u64]> = [((7, 0x20), &[0x51][..]), ((7, 0x21), &[0x51][..])].into();
        assert!(book.recover(&shared, &HashMap::new(), 102).is_empty());
    }

    /// What was learned survives a restart through the file, and the file
    /// stays bounded; a bad file is moved aside.
    #[test]
    fn the_book_survives_restarts_and_stays_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("launch-sites.json");
        let mut book = SiteBook::default();
        book.learn(1, 0x6e11, 10);
        book.learn(2, 0xadd, 10);
        book.learn(2, 0x5ca1e, 11);
        book.save(&path).unwrap();
        let loaded = SiteBook::load(&path).unwrap();
        assert_eq!(loaded.kernel(1), Some(0x6e11));
        assert_eq!(loaded.kernel(2), None);
        assert_eq!(loaded.len(), 2);
        let mut big = SiteBook::default();
        for site in 0..(MAX_SITES as u64 + MAX_SITES as u64 / 8 + 1) {
            big.learn(site + 1, 5, site);
        }
        assert!(big.len() <= MAX_SITES + MAX_SITES / 8, "{}", big.len());
        assert!(big.kernel(1).is_none(), "the oldest went first");
        std::fs::write(&path, b"{not json").unwrap();
        assert!(SiteBook::load_or_empty(&path).is_empty());
        assert!(path.with_extension("bad").exists(), "kept for a person to read");
    }
}
