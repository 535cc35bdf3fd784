//! The client records as last read, so that a poll of `clients/` parses
//! only the files that changed since: with 10,000 clients, parsing every
//! record each second was the idle gateway's largest cost.
//!
//! A file is known by its stamp (device, inode, size, modification and
//! change times). Timestamps are coarse (a clock tick), so a file changed
//! twice within one tick, once before and once after a read, could keep
//! its stamp: a record whose change time is less than [`SETTLE`] before
//! the read is parsed again at every poll until it is older.

use std::{
    collections::HashMap,
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use super::ClientRecord;

/// How long after its last change a file's stamp is trusted: far above a
/// clock tick, and what a change costs is a few more parses.
const SETTLE: Duration = Duration::from_secs(2);

/// What identifies one version of a file without reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl Stamp {
    pub(super) fn of(meta: &fs::Metadata) -> Self {
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        Stamp {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
            ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
        }
    }

    /// Whether the file last changed at least [`SETTLE`] before `now`
    /// (nanoseconds since the epoch): no later change can keep this stamp.
    fn settled(&self, now: i128) -> bool {
        self.ctime_ns.max(self.mtime_ns) + SETTLE.as_nanos() as i128 <= now
    }
}

struct Entry {
    stamp: Stamp,
    settled: bool,
    record: ClientRecord,
    /// The last sweep that saw the file.
    sweep: u64,
}

/// The parsed records by path, and a count of the changes seen.
#[derive(Default)]
pub(super) struct RecordCache {
    files: HashMap<PathBuf, Entry>,
    /// One more whenever a read found a file added, changed or gone.
    generation: u64,
    /// Sweeps begun.
    sweeps: u64,
}

impl RecordCache {
    /// Whether `path`'s stamp says it did not change since it was read; if
    /// so, `sweep` has seen it. Copies nothing: the poll of an unchanged
    /// directory costs a `stat` per file.
    pub(super) fn unchanged(&mut self, sweep: &mut Sweep, path: &Path, stamp: &Stamp) -> bool {
        let Some(entry) = self
            .files
            .get_mut(path)
            .filter(|e| e.settled && e.stamp == *stamp)
        else {
            return false;
        };
        entry.sweep = sweep.number;
        sweep.seen += 1;
        true
    }

    /// Starts a read of the directory: what it finds goes through
    /// [`Self::unchanged`] or [`Self::found`], then [`Self::finish`]
    /// drops the files not seen.
    pub(super) fn begin(&mut self) -> Sweep {
        self.sweeps += 1;
        Sweep {
            now: now_ns(),
            number: self.sweeps,
            seen: 0,
            changed: false,
        }
    }

    /// A record read during `sweep`.
    pub(super) fn found(
        &mut self,
        sweep: &mut Sweep,
        path: PathBuf,
        stamp: Stamp,
        record: ClientRecord,
    ) {
        let settled = stamp.settled(sweep.now);
        let same = self
            .files
            .get(&path)
            .is_some_and(|e| e.stamp == stamp && e.record == record);
        if !same {
            sweep.changed = true;
        }
        sweep.seen += 1;
        self.files.insert(
            path,
            Entry {
                stamp,
                settled,
                record,
                sweep: sweep.number,
            },
        );
    }

    /// Ends `sweep`: files not seen are gone (or unreadable now). The
    /// generation: one more than before if anything changed.
    pub(super) fn finish(&mut self, sweep: Sweep) -> u64 {
        let mut changed = sweep.changed;
        if sweep.seen != self.files.len() {
            self.files.retain(|_, e| e.sweep == sweep.number);
            changed = true;
        }
        if changed {
            self.generation += 1;
        }
        self.generation
    }

    /// Every record the last sweep found, by name.
    pub(super) fn records(&self) -> Vec<ClientRecord> {
        let mut all: Vec<ClientRecord> = self.files.values().map(|e| e.record.clone()).collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }
}

/// One read of the directory in progress.
pub(super) struct Sweep {
    now: i128,
    number: u64,
    /// Files seen, readable.
    seen: usize,
    changed: bool,
}

fn now_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128)
}
