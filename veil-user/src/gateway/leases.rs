//! New leases reach `leases.toml` before they are used, in groups: one
//! writer rewrites the file for every lease made since its last write, and
//! each session waits for the write that holds its own. A thousand clients
//! arriving at once cost a few writes, not a thousand rewrites of a file
//! that grows with every client (and a thousand fsyncs on the workers).

use std::{
    net::Ipv4Addr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use anyhow::{bail, Result};
use tokio::sync::{watch, Notify};
use tracing::warn;

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
    /// The version of the newest lease (one more per new lease).
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
            let (vip, new) = clients.lease(name, self.cfg.pool, self.checks.gateway)?;
            // Counted under the clients lock: a snapshot taken under it
            // after reading `made` holds every lease up to that version.
            (
                vip,
                new.then(|| writer.made.fetch_add(1, Ordering::SeqCst) + 1),
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

/// Writes the leases whenever new ones were made, one write for all those
/// made meanwhile.
pub(super) async fn writer(shared: Arc<Shared>) -> Result<()> {
    let writer = &shared.lease_writer;
    loop {
        writer.wake.notified().await;
        loop {
            let (version, leases) = {
                let clients = shared.clients.lock().expect("clients lock");
                (writer.made.load(Ordering::SeqCst), clients.leases().clone())
            };
            if version <= writer.saved.borrow().version {
                break;
            }
            let s = shared.clone();
            let written = tokio::task::spawn_blocking(move || s.state.save_leases(&leases)).await?;
            if let Err(e) = &written {
                warn!("saving the leases: {e:#}");
            }
            writer.saved.send_replace(Saved {
                version,
                failed: written.is_err(),
            });
        }
    }
}
