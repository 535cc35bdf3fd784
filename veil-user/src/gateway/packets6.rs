//! IPv6 packets between the sessions and the datapath (NAT66), beside
//! [`super::packets`] which dispatches here on the IP version.
//!
//! A client's IPv6 address is its IPv4 lease in the low 32 bits of the
//! `--pool6` prefix ([`crate::pool6::Pool6::address_for`]), so neither
//! direction needs a registry of its own: a client's packet is checked
//! against the address its session's IPv4 address gives, and a reply read
//! from the TUN device goes to the session whose IPv4 address is its
//! destination's low 32 bits. Nothing for the session code to call.
//!
//! Public API (crate): [`V6::setup`] at start-up; [`Shared::client_packet6`]
//! and [`Shared::reply6_client`] from `packets`; [`Shared::v6_flows_gc`],
//! [`Shared::v6_delete_client`] and [`Shared::v6_flow_count`] from the
//! sweeper, the session's end and the status.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Mutex,
    },
};

use anyhow::{Context, Result};
use tracing::{debug, info, warn};
use veil_common::FlowKey6;
use veil_proto::gso::VnetHdr;

use super::{
    check6::{Checks6, Dropped6, Verdict6},
    GatewayConfig, Shared,
};
use crate::{
    datapath::Datapath,
    flows::KnownFlows,
    flows6::{Flow6Error, FlowTable6},
    net::monotonic_ns,
    policy::EgressPolicy,
    policy6::EgressPolicy6,
    pool6::Pool6,
};

/// Why clients' IPv6 packets went no further, for `status`.
#[derive(Default)]
pub struct Counters6 {
    pub forged_source: AtomicU64,
    pub policy_refused: AtomicU64,
    pub hop_limit_exceeded: AtomicU64,
    pub extension_header: AtomicU64,
    pub untranslatable: AtomicU64,
    pub malformed: AtomicU64,
    pub flow_errors: AtomicU64,
    /// IPv6 packets while the gateway carries no IPv6 (`--pool6 none`, or
    /// no public IPv6 address).
    pub not_carried: AtomicU64,
}

/// The gateway's IPv6 side, when it carries IPv6.
pub struct V6 {
    pub pool: Pool6,
    pub checks: Checks6,
    pub flows: Mutex<FlowTable6>,
    /// The flows that exist, read without `flows`' lock (as for IPv4).
    pub known: KnownFlows<FlowKey6>,
}

impl V6 {
    /// Turns NAT66 on when there is a client prefix (`--pool6`) and a
    /// public IPv6 address (`--public6`, or the WAN interface's first
    /// global one); `None`, said in the log, otherwise. Call after the maps
    /// are pinned (it takes the IPv6 flow maps).
    pub fn setup(
        cfg: &GatewayConfig,
        datapath: &mut Datapath,
        inner: Ipv4Addr,
        ipv4: &EgressPolicy,
    ) -> Result<Option<V6>> {
        let Pool6::Prefix { addr, len } = cfg.pool6 else {
            return Ok(None);
        };
        let public = match cfg.public6 {
            Some(p) => p,
            None => match crate::net::iface_global_ipv6(&cfg.iface)
                .with_context(|| format!("reading the addresses of {}", cfg.iface))?
            {
                Some(p) => p,
                None => {
                    warn!(iface = %cfg.iface, "no global IPv6 address on the WAN interface and no --public6: IPv6 is not carried through the tunnel");
                    return Ok(None);
                }
            },
        };
        let net = ipnet::Ipv6Net::new(addr, len).context("the --pool6 prefix")?;
        datapath.configure6(public, net)?;
        let flows = datapath
            .flow_table6(cfg.nat_ports, cfg.timeouts)?
            .with_client_limit(client_limit6(cfg.max_flows_per_client, cfg.max_flows))
            .with_mapping(cfg.mapping);
        let flows = match cfg.max_ports_per_endpoint {
            Some(share) => flows.with_port_share(share.get()),
            None => flows,
        };
        let gateway = cfg
            .pool6
            .address_for(inner)
            .context("the gateway's IPv6 address")?;
        let policy = EgressPolicy6::new(
            vec![public, gateway],
            Some(net),
            cfg.allow6.clone(),
            cfg.deny6.clone(),
        );
        info!(%public, pool6 = %cfg.pool6, "NAT66 on");
        Ok(Some(V6 {
            pool: cfg.pool6,
            checks: Checks6 {
                policy,
                ipv4: ipv4.clone(),
                gateway,
            },
            known: flows.known(),
            flows: Mutex::new(flows),
        }))
    }

    /// The session (IPv4 address) an IPv6 address in the pool belongs to.
    pub fn vip_of(&self, addr: Ipv6Addr) -> Option<Ipv4Addr> {
        self.pool
            .contains(addr)
            .then(|| Ipv4Addr::from_bits(addr.to_bits() as u32))
    }
}

impl Shared {
    /// An IPv6 packet from the client at `vip`: into the datapath once its
    /// flow exists, or refused. Returns the ICMPv6 error the client gets,
    /// if any.
    pub(super) fn client_packet6(
        &self,
        vip: Ipv4Addr,
        hdr: &VnetHdr,
        pkt: &[u8],
    ) -> Option<Vec<u8>> {
        let c = &self.counters6;
        let Some(v6) = &self.v6 else {
            c.not_carried.fetch_add(1, Relaxed);
            return None;
        };
        let leased = v6.pool.address_for(vip)?;
        match v6.checks.check(leased, pkt) {
            Verdict6::Datapath { flow } => {
                let created = match flow {
                    // Known: no lock (see `packets::ensure_flow`).
                    Some(flow) if v6.known.contains(&flow) => Ok(0),
                    Some(flow) => {
                        let mut flows = v6.flows.lock().expect("flows6 lock");
                        match flows.get(&flow) {
                            Some(_) => Ok(0),
                            None => flows.create(flow, vip, monotonic_ns()),
                        }
                    }
                    // A later fragment: its first fragment's flow.
                    None => Ok(0),
                };
                if let Err(e) = created {
                    c.flow_errors.fetch_add(1, Relaxed);
                    match e {
                        Flow6Error::Flow(crate::flows::FlowError::Map { .. }) => {
                            warn!(%vip, "creating an IPv6 flow: {e:#}")
                        }
                        e => debug!(%vip, "dropped: {e}"),
                    }
                    return None;
                }
                self.to_tun(vip, hdr, pkt);
                None
            }
            Verdict6::Dropped { why, answer } => {
                let counter = match why {
                    Dropped6::Malformed(_) => &c.malformed,
                    Dropped6::ForgedSource(_) => &c.forged_source,
                    Dropped6::Policy(_) => &c.policy_refused,
                    Dropped6::HopLimitExceeded => &c.hop_limit_exceeded,
                    Dropped6::ExtensionHeader(_) => &c.extension_header,
                    Dropped6::Untranslatable { .. } => &c.untranslatable,
                };
                counter.fetch_add(1, Relaxed);
                debug!(%vip, "dropped a client's IPv6 packet: {why:?}");
                answer
            }
        }
    }

    /// The client an IPv6 reply from the datapath goes to; `None` (and
    /// counted) if it is malformed or no client holds its address.
    pub(super) fn reply6_client(&self, pkt: &[u8]) -> Option<Ipv4Addr> {
        let (Some(v6), Some(dst)) = (&self.v6, pkt.get(24..40)) else {
            // Too short for an IPv6 header, or IPv6 while none is carried.
            self.counters.malformed.fetch_add(1, Relaxed);
            return None;
        };
        let dst = Ipv6Addr::from(<[u8; 16]>::try_from(dst).expect("16 bytes"));
        let vip = v6.vip_of(dst);
        if vip.is_none() {
            self.counters.no_session.fetch_add(1, Relaxed);
        }
        vip
    }

    /// Expires idle IPv6 flows, in slices as for IPv4 (sessions making
    /// flows wait for one slice at most); how many went.
    pub(super) fn v6_flows_gc(&self, now_ns: u64) -> Result<usize, crate::flows::FlowError> {
        let Some(v6) = &self.v6 else {
            return Ok(0);
        };
        let keys = v6.flows.lock().expect("flows6 lock").keys();
        let mut expired = 0;
        for slice in keys.chunks(super::GC_SLICE) {
            expired += v6
                .flows
                .lock()
                .expect("flows6 lock")
                .expire(slice, now_ns)?
                .len();
        }
        Ok(expired)
    }

    /// Removes the IPv6 flows of the client at `vip` (its grace period is
    /// over).
    pub(super) fn v6_delete_client(&self, vip: Ipv4Addr) {
        let Some(v6) = &self.v6 else {
            return;
        };
        let keys = v6.flows.lock().expect("flows6 lock").client_keys(vip);
        if let Err(e) = super::delete_in_slices(&v6.flows, &keys, FlowTable6::delete) {
            warn!(%vip, "removing IPv6 flows: {e:#}");
        }
    }

    /// IPv6 flows now.
    pub(super) fn v6_flow_count(&self) -> usize {
        self.v6
            .as_ref()
            .map_or(0, |v6| v6.flows.lock().expect("flows6 lock").len())
    }

    /// The IPv6 counters for `status`, by name.
    pub(super) fn v6_counters(&self) -> Vec<(&'static str, u64)> {
        let c = &self.counters6;
        [
            ("ipv6_forged_source", &c.forged_source),
            ("ipv6_policy_refused", &c.policy_refused),
            ("ipv6_hop_limit_exceeded", &c.hop_limit_exceeded),
            ("ipv6_extension_header", &c.extension_header),
            ("ipv6_untranslatable", &c.untranslatable),
            ("ipv6_malformed", &c.malformed),
            ("ipv6_flow_errors", &c.flow_errors),
            ("ipv6_not_carried", &c.not_carried),
        ]
        .into_iter()
        .map(|(k, v)| (k, v.load(Relaxed)))
        .collect()
    }
}

/// The IPv6 flows one client may hold: the same share of the IPv6 table
/// (its fixed [`veil_common::MAX_FLOWS6`]) as `per_client` is of the IPv4
/// one (`max_flows`), so that as many clients are needed to fill either
/// (the IPv4 cap as it stands let two fill the IPv6 table).
fn client_limit6(per_client: usize, max_flows: usize) -> usize {
    let table = veil_common::MAX_FLOWS6 as usize;
    (per_client.saturating_mul(table) / max_flows.max(1)).clamp(1, per_client.min(table))
}

#[cfg(test)]
mod tests {
    use super::client_limit6;

    #[test]
    fn a_client_holds_the_same_share_of_either_table() {
        // The defaults: 32,768 of 262,144 IPv4 flows, an eighth.
        assert_eq!(client_limit6(32_768, 262_144), 8_192);
        // A small IPv4 table: the IPv6 cap is never above the IPv4 one.
        assert_eq!(client_limit6(1_000, 2_000), 1_000);
        assert_eq!(client_limit6(1, 1 << 20), 1, "never none");
    }
}
