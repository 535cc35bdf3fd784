//! Fair use around the sessions: each client held to its limits (its own
//! from the registry, or the gateway's defaults) in the datapath from the
//! moment it attaches, and again whenever the registry changes them.

use std::{collections::HashMap, net::Ipv4Addr};

use tracing::warn;

use super::Shared;
use veil_common::ratelimit::Direction;

use crate::{
    control::ClientStatus, net::monotonic_ns, ratelimit::ClientLimits, state::ClientRecord,
};

impl Shared {
    /// Writes the limits of `record`'s client, as the registry holds them
    /// now, for `vip` into the datapath. The registry is read under the
    /// limits' lock: a session attaching while a reload applies a change
    /// (`reapply_limits`) cannot write an older reading after it.
    pub(super) fn hold_to_limits(&self, record: &ClientRecord, vip: Ipv4Addr) {
        let mut map = self.rate_limits.lock().expect("rate limits lock");
        let own = self.current_limits(record);
        if let Err(e) = map.apply(vip, self.cfg.fair_use.for_client(&own)) {
            warn!(client = %record.name, "setting its rate limit: {e}");
        }
    }

    /// `record` with the limits the registry holds for it now.
    pub(super) fn with_current_limits(&self, mut record: ClientRecord) -> ClientRecord {
        record.limits = self.current_limits(&record);
        record
    }

    /// The limits the registry holds for `record`'s certificate now; its
    /// own if the registry no longer has it.
    fn current_limits(&self, record: &ClientRecord) -> ClientLimits {
        self.registry
            .read()
            .expect("registry lock")
            .get(&record.fingerprint)
            .map_or(record.limits, |current| current.limits)
    }

    /// Whether `record`'s session may carry offload (GSO) packets: not
    /// with a rate limit, which the datapath polices per packet. A 64 KiB
    /// GSO packet dropped whole would lose some 45 TCP segments at once,
    /// and TCP would back off far below the rate (measured: 19 Mbit/s
    /// under a 50 Mbit/s limit); MTU-sized packets lose one segment each.
    pub(super) fn offload_for(&self, record: &ClientRecord) -> bool {
        self.cfg.fair_use.for_client(&record.limits).rate.is_none()
    }

    /// Applies the registry's limits to every live client (a change made
    /// with `client limit` takes effect within a second).
    pub(super) fn reapply_limits(&self) {
        let live: Vec<(String, Ipv4Addr)> = self
            .clients
            .lock()
            .expect("clients lock")
            .status()
            .into_iter()
            .map(|c| (c.name, c.vip))
            .collect();
        let records: Vec<(ClientRecord, Ipv4Addr)> = {
            let registry = self.registry.read().expect("registry lock");
            let current: HashMap<&str, &ClientRecord> = registry
                .values()
                .filter(|r| r.revoked.is_none())
                .map(|r| (r.name.as_str(), r))
                .collect();
            live.iter()
                .filter_map(|(name, vip)| Some(((*current.get(name.as_str())?).clone(), *vip)))
                .collect()
        };
        for (record, vip) in records {
            self.hold_to_limits(&record, vip);
        }
    }

    /// Whether client `vip`'s limits let `len` bytes the datapath never
    /// sees go `dir` (the gateway's DNS service, another client): counted
    /// in its quota and bucket as if they had crossed it. A quota used up
    /// stops every packet of the client, these too.
    pub(super) fn fair(&self, vip: Ipv4Addr, dir: Direction, len: usize) -> bool {
        // No lock while no client is limited (the common case).
        if !self
            .anyone_limited
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return true;
        }
        let mut map = self.rate_limits.lock().expect("rate limits lock");
        map.charge(vip, dir, len as u64, monotonic_ns()).is_ok()
    }

    /// Fills in each client's limits and what the datapath counted of them.
    pub(super) fn limits_status(&self, clients: &mut [ClientStatus]) {
        let map = self.rate_limits.lock().expect("rate limits lock");
        for c in clients {
            if let Some(l) = map.get(c.vip) {
                c.rate_limit = (l.rate != 0).then(|| {
                    crate::ratelimit::Rate {
                        bytes_per_sec: l.rate,
                    }
                    .to_string()
                });
                c.quota = (l.quota != 0).then_some(l.quota);
                c.quota_used = l.used;
                c.rate_dropped = l.rate_dropped;
                c.quota_dropped = l.quota_dropped;
            }
        }
    }
}
