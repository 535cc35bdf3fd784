//! The client registry (`clients/*.toml` in the state directory), polled
//! every second: revocations close live sessions within a second. A poll
//! parses only the records that changed (`StateDir::client_records`), and
//! rebuilds the registry only when one did.

use std::{collections::HashSet, sync::Arc};

use anyhow::Result;
use tracing::{info, warn};

use super::{Shared, REGISTRY_INTERVAL};

impl Shared {
    /// Re-reads the client registry from the state directory. A record
    /// that does not read is left out and every other one applies: one bad
    /// file must not freeze the registry (and with it later revocations).
    /// Its client fails closed: refused as unknown from the next handshake,
    /// its live session closed now.
    /// Whether the registry changed.
    pub(super) fn reload_registry(&self) -> Result<bool> {
        let found = self.state.client_records()?;
        let changed = found.changed();
        for bad in found.unreadable.iter().filter(|u| u.new) {
            warn!("reading the client registry: {bad}");
        }
        if let Some(records) = found.records {
            // A name issued again after a revocation keeps its earlier
            // certificates' fingerprints: each is known, and revoked.
            *self.registry.write().expect("registry lock") = records
                .into_iter()
                .flat_map(|r| r.with_retired())
                .map(|r| (r.fingerprint.clone(), r))
                .collect();
        }
        let unreadable: HashSet<String> = found
            .unreadable
            .iter()
            .filter_map(|u| u.name.clone())
            .collect();
        let clients = self.clients.lock().expect("clients lock");
        for name in clients.close(&unreadable, "client record unreadable") {
            info!(client = %name, "record unreadable: closing its session");
        }
        Ok(changed)
    }

    /// Closes every live session whose certificate is revoked (by its
    /// fingerprint: a name issued again keeps its new session), or no
    /// longer known at all (its record deleted, and not a client of
    /// another host let in by the revocation list).
    pub(super) fn close_revoked(&self) {
        let mut revoked: HashSet<String> = self
            .registry
            .read()
            .expect("registry lock")
            .values()
            .filter(|r| r.revoked.is_some())
            .map(|r| r.fingerprint.clone())
            .collect();
        revoked.extend(self.revoked_by_list());
        let clients = self.clients.lock().expect("clients lock");
        for name in clients.close_certificates(&revoked, "client revoked") {
            info!(client = %name, "revoked: closing its session");
        }
        let live = clients.certificates();
        drop(clients);
        // A record deleted (the obvious way to remove a client): its
        // certificate is no longer known, and its session does not go on
        // as if it were. The file is looked for too: a client added since
        // the registry was read is let in from its file.
        let gone: HashSet<String> = {
            let registry = self.registry.read().expect("registry lock");
            live.into_iter()
                .filter(|(_, f)| !registry.contains_key(f) && !self.admitted_elsewhere(f))
                .filter(|(name, _)| !self.state.has_record(name))
                .map(|(_, f)| f)
                .collect()
        };
        if gone.is_empty() {
            return;
        }
        let clients = self.clients.lock().expect("clients lock");
        for name in clients.close_certificates(&gone, "client record removed") {
            info!(client = %name, "record removed: closing its session");
        }
    }
}

/// Closes the sessions of clients revoked while connected, and applies
/// changed limits.
pub(super) async fn watch(shared: Arc<Shared>) -> Result<()> {
    let mut tick = tokio::time::interval(REGISTRY_INTERVAL);
    let mut changed_before = true;
    loop {
        tick.tick().await;
        match shared.reload_registry() {
            Ok(changed) => {
                // Every poll: a session that authenticated against the
                // registry just before it changed may attach just after.
                shared.close_revoked();
                // On a change, and once more a poll later for the same
                // reason; with 10,000 clients, writing each one's limits
                // every second was a system call each.
                if changed || changed_before {
                    shared.reapply_limits();
                }
                changed_before = changed;
            }
            Err(e) => warn!("reloading the client registry: {e:#}"),
        }
    }
}
