//! New leases reach the disk before they are used, in groups: one writer
//! appends every lease made since its last write to the lease log
//! (`StateDir::append_leases`), and each session waits for the write that
//! holds its own. A thousand clients arriving at once cost a few appends
//! and fsyncs, not a thousand rewrites of a file that grows with every
//! client. Once the log holds more lines than there are leases, the
//! writer folds it into `leases.toml` (`StateDir::save_leases`): each
//! lease is written a bounded number of times, however many clients.

use std::{
    net::Ipv4Addr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{bail, Result};
use tokio::sync::{watch, Notify};
use tracing::{debug, info, warn};

use super::Shared;

/// What the file holds: every lease up to `version`, unless the write
/// failed.
#[derive(Clone, Copy, Debug, Default)]
struct Saved {
    version: u64,
    failed: bool,
}

#[derive(Default)]
pub(super) struct LeaseWriter {
    /// The version of the newest lease to save (one more per lease made,
    /// and per lease a client waits on again after a failed write).
    made: AtomicU64,
    wake: Notify,
    saved: watch::Sender<Saved>,
}

impl Shared {
    /// The client's address: the one it had before, or the next free one,
    /// saved before it is used.
    pub(super) async fn lease(&self, name: &str) -> Result<Ipv4Addr> {
        let writer = &self.lease_writer;
        let (vip, version) = {
            let mut clients = self.clients.lock().expect("clients lock");
            let (vip, unsaved) = clients.lease(name, self.cfg.pool, self.checks.gateway)?;
            // Counted under the clients lock: a snapshot taken under it
            // after reading `made` holds every lease up to that version.
            (
                vip,
                unsaved.then(|| writer.made.fetch_add(1, Ordering::SeqCst) + 1),
            )
        };
        let Some(version) = version else {
            return Ok(vip);
        };
        let mut saved = writer.saved.subscribe();
        writer.wake.notify_one();
        let saved = *saved.wait_for(|s| s.version >= version).await?;
        if saved.failed {
            bail!("saving the leases failed (see the log)");
        }
        Ok(vip)
    }
}

/// Lines the lease log may hold (or as many as there are leases, if more)
/// before it is folded into `leases.toml`.
const COMPACT_AFTER: usize = 4096;

/// Folds the lease log into `leases.toml`. A failure loses nothing: the
/// log still holds every lease, and the next group tries again.
fn compact(shared: &Shared) {
    let leases = shared
        .clients
        .lock()
        .expect("clients lock")
        .leases()
        .clone();
    if let Err(e) = shared.state.save_leases(&leases) {
        warn!("folding the lease log into leases.toml: {e:#}");
    }
}

/// How soon leases whose write failed are written again when no new
/// lease comes to wake the writer.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Failed writes in a row: a disk that stays full or read-only is
/// reported when it starts failing and when it works again, not at every
/// retry.
#[derive(Debug, Default)]
struct Failures(u64);

impl Failures {
    /// Notes a failed write; whether it starts a run (worth a warning).
    fn failed(&mut self) -> bool {
        self.0 += 1;
        self.0 == 1
    }

    /// Notes a write that worked; how many failed before it, if any did.
    fn succeeded(&mut self) -> Option<u64> {
        (self.0 > 0).then(|| std::mem::take(&mut self.0))
    }
}

/// Writes the leases whenever new ones were made, one write for all those
/// made meanwhile; after a failed write, again within [`RETRY_AFTER`].
pub(super) async fn writer(shared: Arc<Shared>) -> Result<()> {
    let writer = &shared.lease_writer;
    let mut failed = false;
    let mut failures = Failures::default();
    loop {
        if failed {
            tokio::select! {
                () = writer.wake.notified() => {}
                () = tokio::time::sleep(RETRY_AFTER) => {}
            }
        } else {
            writer.wake.notified().await;
        }
        loop {
            let (version, new, leased) = {
                let mut clients = shared.clients.lock().expect("clients lock");
                let version = writer.made.load(Ordering::SeqCst);
                (version, clients.take_unsaved(), clients.leases().len())
            };
            if version <= writer.saved.borrow().version && new.is_empty() {
                break;
            }
            let s = shared.clone();
            let written = tokio::task::spawn_blocking(move || {
                s.state.append_leases(&new).map_err(|e| (e, new))
            })
            .await?;
            let written = written.map_err(|(e, new)| {
                if failures.failed() {
                    warn!("saving the leases: {e:#} (tried again every second, logged again once it works)");
                } else {
                    debug!("saving the leases: {e:#}");
                }
                // Written again with the next group: none is lost.
                shared
                    .clients
                    .lock()
                    .expect("clients lock")
                    .unsaved_again(new);
            });
            let lines = written.as_ref().ok().copied();
            failed = written.is_err();
            if let Some(failed_writes) = lines.and_then(|_| failures.succeeded()) {
                info!(failed_writes, "saving the leases works again");
            }
            // The waiting sessions' leases are on disk: they go on now,
            // not after the fold, which this task still does before the
            // next append.
            writer.saved.send_replace(Saved { version, failed });
            if failed {
                // Not again at once: a full or read-only disk stays so
                // for a while.
                break;
            }
            if lines.is_some_and(|lines| lines > COMPACT_AFTER.max(leased)) {
                let s = shared.clone();
                tokio::task::spawn_blocking(move || compact(&s)).await?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_of_failed_writes_is_reported_once_and_its_end_once() {
        let mut failures = Failures::default();
        assert_eq!(failures.succeeded(), None, "nothing to report");
        assert!(failures.failed(), "the first failure: a warning");
        assert!(
            !failures.failed() && !failures.failed(),
            "the retries: quiet"
        );
        assert_eq!(failures.succeeded(), Some(3), "works again, after 3");
        assert_eq!(failures.succeeded(), None);
        assert!(failures.failed(), "a new run: a warning again");
    }
}
