//! The maps, named as user space and `bpftool` see them.

use aya_ebpf::{
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use veil_common::{
    reason::REASON_SLOTS, Config, Counter, EgressFlow, FlowKey, FragEntry, FragKey, FwdCounters,
    FwdFlow, FwdKey, FwdOpening, FwdRule, FwdRuleKey, Reason, ReverseFlow, ReverseKey,
    FWD_OPENING_SLOTS, MAX_FLOWS, MAX_FRAGS, MAX_FWD_FLOWS, MAX_FWD_RULES, MAX_FWD_SOURCES,
};
use veil_common::{
    Config6, EgressFlow6, FlowKey6, FragEntry6, FragKey6, ReverseFlow6, ReverseKey6, MAX_FLOWS6,
};

#[btf_map]
pub static VEIL_EGRESS: HashMap<FlowKey, EgressFlow, { MAX_FLOWS as usize }> = HashMap::new();

#[btf_map]
pub static VEIL_REVERSE: HashMap<ReverseKey, ReverseFlow, { MAX_FLOWS as usize }> = HashMap::new();

#[btf_map]
pub static VEIL_CONFIG: Array<Config, 1> = Array::new();

#[btf_map]
pub static VEIL_STATS: PerCpuArray<Counter, { REASON_SLOTS as usize }> = PerCpuArray::new();

/// LRU, unlike the flow maps: its entries are the datapath's alone, short
/// lived, and an evicted one costs one datagram at most.
#[btf_map]
pub static VEIL_FRAGS: LruHashMap<FragKey, FragEntry, { MAX_FRAGS as usize }> = LruHashMap::new();

/// Port forwarding (`forward`): the rules, their connections, their counters.
#[btf_map]
pub static VEIL_FWD_RULES: HashMap<FwdRuleKey, FwdRule, { MAX_FWD_RULES as usize }> =
    HashMap::new();

#[btf_map]
pub static VEIL_FWD_FLOWS: HashMap<FwdKey, FwdFlow, { MAX_FWD_FLOWS as usize }> = HashMap::new();

#[btf_map]
pub static VEIL_FWD_OPENING: Array<FwdOpening, { FWD_OPENING_SLOTS as usize }> = Array::new();

/// Connections per remote address (`sources`). Only hosts that finished
/// a handshake make entries; LRU all the same, as an evicted count can
/// only let its host in more, never keep it out.
#[btf_map]
pub static VEIL_FWD_SOURCES: LruHashMap<u32, u64, { MAX_FWD_SOURCES as usize }> = LruHashMap::new();

#[btf_map]
pub static VEIL_FWD_STATS: HashMap<FwdRuleKey, FwdCounters, { MAX_FWD_RULES as usize }> =
    HashMap::new();

/// The daemon's configuration; without it nothing is translated. An array
/// slot always exists, zeroed until written: no public address means the
/// daemon has not configured the datapath.
#[inline(always)]
pub fn config() -> Result<&'static Config, Reason> {
    match VEIL_CONFIG.get(0) {
        Some(cfg) if cfg.public_count != 0 => Ok(cfg),
        _ => Err(Reason::DropNotConfigured),
    }
}

/// IPv6 (NAT66): flows both ways and the IPv6 configuration
/// (`veil_common::maps6`).
#[btf_map]
pub static VEIL_EGRESS6: HashMap<FlowKey6, EgressFlow6, { MAX_FLOWS6 as usize }> = HashMap::new();

#[btf_map]
pub static VEIL_REVERSE6: HashMap<ReverseKey6, ReverseFlow6, { MAX_FLOWS6 as usize }> =
    HashMap::new();

#[btf_map]
pub static VEIL_CONFIG6: Array<Config6, 1> = Array::new();

/// IPv6 fragments (`frag6`): LRU like `VEIL_FRAGS`, for the same reasons.
#[btf_map]
pub static VEIL_FRAGS6: LruHashMap<FragKey6, FragEntry6, { MAX_FRAGS as usize }> =
    LruHashMap::new();

/// The IPv6 configuration, if the daemon enabled IPv6.
#[inline(always)]
pub fn config6() -> Option<&'static Config6> {
    match VEIL_CONFIG6.get(0) {
        Some(cfg) if cfg.enabled != 0 => Some(cfg),
        _ => None,
    }
}
