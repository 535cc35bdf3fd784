//! What `veil-user status` and the metrics show: clients, flows, counters.

use std::sync::atomic::Ordering::Relaxed;

use super::{Shared, GC_SLICE};
use crate::{
    control::{self, FlowCounts, PacketCount, Status},
    net::monotonic_ns,
};

impl Shared {
    /// The IPv6 address of the client at `vip`, when the gateway carries
    /// IPv6 (`--pool6` and a public IPv6 address): a client is never given
    /// an address whose traffic the datapath would not carry.
    pub(super) fn vip6_of(&self, vip: std::net::Ipv4Addr) -> Option<std::net::Ipv6Addr> {
        self.v6.as_ref()?;
        self.cfg.pool6.address_for(vip)
    }

    pub(super) fn status(&self) -> Status {
        let mut clients = self.clients.lock().expect("clients lock").status();
        {
            let sessions = self.sessions.read().expect("sessions lock");
            for c in &mut clients {
                c.vip6 = self.vip6_of(c.vip);
                c.replies_queued = sessions.get(&c.vip).map_or(0, |tx| tx.queued() as u64);
            }
        }
        self.limits_status(&mut clients);
        let mut flows = self.flow_counts();
        flows.ipv6 = self.v6_flow_count();
        let c = &self.counters;
        let counters = [
            ("forged_source", &c.forged_source),
            ("policy_refused", &c.policy_refused),
            ("ttl_expired", &c.ttl_expired),
            ("untranslatable", &c.untranslatable),
            ("malformed", &c.malformed),
            ("not_ipv4", &c.not_ipv4),
            ("flow_errors", &c.flow_errors),
            ("port_share_exceeded", &c.port_share_exceeded),
            ("client_queue_full", &c.client_queue_full),
            ("datagram_queue_full", &c.datagrams.queue_full),
            ("datagram_too_large", &c.datagrams.too_large),
            ("no_session", &c.no_session),
            ("tun_write_failed", &c.tun_write_failed),
            ("client_to_client", &c.client_to_client),
            ("dns_queries", &c.dns_queries),
            ("dns_answered", &c.dns_answered),
            ("dns_failed", &c.dns_failed),
            ("dns_refused", &c.dns_refused),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.load(Relaxed)))
        .chain(
            self.v6_counters()
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v)),
        )
        // Replies the kernel dropped before our reads took them (the TUN
        // device's queue full): counted by the kernel, shown beside ours.
        .chain([("tun_queue_full".to_owned(), self.tun.queue_drops())])
        // Likewise the GRO stage's ring, if there is one.
        .chain([(
            "gro_stage_full".to_owned(),
            self.stage.as_ref().map_or(0, |s| s.drops()),
        )])
        .collect();
        let datapath = self
            .datapath
            .lock()
            .expect("datapath lock")
            .as_ref()
            .and_then(|dp| dp.stats().ok())
            .unwrap_or_default()
            .into_iter()
            .map(|(reason, c)| {
                let count = PacketCount {
                    packets: c.packets,
                    bytes: c.bytes,
                };
                (reason.name().to_owned(), count)
            })
            .collect();
        let refused = self
            .counters
            .refusals
            .lock()
            .expect("refusals lock")
            .iter()
            .map(|(k, v)| ((*k).to_owned(), *v))
            .collect();
        let (forwards, forward_problems) = self.forward_status();
        Status {
            clients,
            flows,
            refused,
            counters,
            datapath,
            forwards,
            forward_problems,
            gro_stage: self.stage.as_ref().map(|s| s.state()),
        }
    }

    fn forward_status(&self) -> (Vec<control::ForwardStatus>, Vec<String>) {
        let Some(fwd) = &self.forwarding else {
            return Default::default();
        };
        let rules = fwd.forwarder.lock().expect("forwarder lock").status();
        let rules = rules
            .into_iter()
            .map(|r| control::ForwardStatus {
                rule: r.rule,
                target: r.target,
                connections: r.counters.connections,
                packets: r.counters.packets,
                bytes: r.counters.bytes,
                evicted: r.counters.evicted,
                open: r.open,
            })
            .collect();
        (rules, fwd.problems.lock().expect("problems lock").clone())
    }

    fn flow_counts(&self) -> FlowCounts {
        let (mut counts, keys) = {
            let table = self.flows.lock().expect("flows lock");
            let counts = FlowCounts {
                nat_ports: table.ports().to_string(),
                nat_ports_in_use: table.nat_ports_in_use(),
                ..Default::default()
            };
            (counts, table.keys().copied().collect::<Vec<_>>())
        };
        // Two map lookups per flow, in slices: sessions creating flows wait
        // for one slice at most, not for the whole table.
        let mut list = Vec::with_capacity(keys.len());
        for slice in keys.chunks(GC_SLICE) {
            let table = self.flows.lock().expect("flows lock");
            list.extend(table.list_some(slice).unwrap_or_default());
        }
        let now = monotonic_ns();
        let brief = |f: &crate::flows::Flow| control::FlowBrief {
            flow: f.to_string(),
            age_secs: now.saturating_sub(f.created_ns) / 1_000_000_000,
            packets: f.egress.packets + f.reverse.packets,
            bytes: f.egress.bytes + f.reverse.bytes,
        };
        for f in &list {
            counts.total += 1;
            match f.key.proto {
                veil_common::proto::TCP => counts.tcp += 1,
                veil_common::proto::UDP => counts.udp += 1,
                _ => counts.icmp += 1,
            }
        }
        counts.oldest = list.iter().min_by_key(|f| f.created_ns).map(brief);
        let mut by_packets: Vec<_> = list.iter().collect();
        by_packets.sort_by_key(|f| std::cmp::Reverse(f.egress.packets + f.reverse.packets));
        counts.busiest = by_packets.into_iter().take(3).map(brief).collect();
        counts
    }
}
