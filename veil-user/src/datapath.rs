//! Loads veil's eBPF object, configures it, pins its maps and attaches its
//! programs. Dropping the [`Datapath`] detaches the XDP and TC programs
//! (they are held by bpf_link file descriptors) and removes the pins it
//! made. The TUN device's steering program is the device's own once
//! given to it (the kernel holds a reference): it goes with the device.

use std::{
    fs, io,
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::{AsFd, BorrowedFd},
    path::{Path, PathBuf},
};

use aya::{
    maps::{Array, HashMap, MapData, MapError, PerCpuArray},
    programs::{
        links::LinkOrder, tc::TcAttachOptions, ProgramError, SchedClassifier, SocketFilter,
        TcAttachType, Xdp, XdpMode,
    },
    Ebpf, EbpfError,
};
use tracing::{debug, info};
use veil_common::{
    reason::REASON_SLOTS, Config, Counter, FragEntry, FragKey, Reason, CONFIG_MAP, EGRESS_MAP,
    FRAG_MAP, FWD_FLOWS_MAP, FWD_RULES_MAP, FWD_STATS_MAP, LAYOUT_VERSION, PROG_FWD_TC,
    PROG_GRO_TC, PROG_TUN_STEER, PROG_TUN_TC, PROG_WAN_TC, PROG_WAN_XDP, REVERSE_MAP, STATS_MAP,
};

use crate::{
    flows::{FlowTable, PortRange, Timeouts},
    flows6::FlowTable6,
    forward::Forwarder,
    nat::{check_public_addrs, PublicAddrError},
    net::Ipv4Net,
};

/// The eBPF object, built by `cargo xtask build-ebpf` and embedded by
/// build.rs; empty in a debug build made without it (see build.rs).
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/veil.bpf.o"));

/// Where the daemon pins its maps by default; the layout version is a
/// subdirectory, so `bpftool map dump pinned /sys/fs/bpf/veil/v2/egress`.
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/veil";

/// File names of the pinned maps, in the pin directory.
pub const PINS: [(&str, &str); 15] = [
    (EGRESS_MAP, "egress"),
    (REVERSE_MAP, "reverse"),
    (CONFIG_MAP, "config"),
    (STATS_MAP, "stats"),
    (FRAG_MAP, "fragments"),
    (FWD_RULES_MAP, "forward_rules"),
    (FWD_FLOWS_MAP, "forward_flows"),
    (FWD_STATS_MAP, "forward_stats"),
    (veil_common::FWD_OPENING_MAP, "forward_opening"),
    (veil_common::FWD_SOURCES_MAP, "forward_sources"),
    (veil_common::ratelimit::RATE_MAP, "ratelimit"),
    (veil_common::EGRESS6_MAP, "egress6"),
    (veil_common::REVERSE6_MAP, "reverse6"),
    (veil_common::CONFIG6_MAP, "config6"),
    (veil_common::FRAG6_MAP, "fragments6"),
];

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("this veil-user was built without its eBPF object: run `cargo xtask build-ebpf`, then build again")]
    NoObject,
    #[error("loading the eBPF object into the kernel (needs root or CAP_BPF+CAP_NET_ADMIN)")]
    Load(#[source] EbpfError),
    #[error("the eBPF object has no program `{0}`: rebuild it with `cargo xtask build-ebpf`")]
    MissingProgram(&'static str),
    #[error("the eBPF object has no map `{0}`: rebuild it with `cargo xtask build-ebpf`")]
    MissingMap(&'static str),
    #[error("program `{name}`")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("attaching `{program}` to interface `{iface}`")]
    Attach {
        program: &'static str,
        iface: String,
        #[source]
        source: ProgramError,
    },
    #[error("map `{name}`")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("the public addresses")]
    PublicAddrs(#[source] PublicAddrError),
    #[error("the datapath is not configured yet: call `configure` before `flow_table`")]
    NotConfigured,
    #[error("the datapath's log map: {0}")]
    Logger(String),
    #[error("pinning maps under {path}")]
    Pin {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What the datapath needs to know about the gateway.
#[derive(Clone, Debug)]
pub struct DatapathConfig {
    /// The WAN addresses remote hosts see: 1 to
    /// [`veil_common::MAX_PUBLIC_ADDRS`] of them, each client's flows on
    /// one ([`crate::nat::public_addr_for`]).
    pub public_addrs: Vec<Ipv4Addr>,
    /// The clients' virtual addresses.
    pub vip_pool: Ipv4Net,
    pub nat_ports: PortRange,
    pub wan_ifindex: u32,
    pub tun_ifindex: u32,
    /// 0 for a TUN device; 14 where frames carry an Ethernet header (TAP,
    /// BPF_PROG_TEST_RUN).
    pub tun_l2_len: u32,
    pub wan_filter: WanFilter,
    /// The near end of the GRO stage ([`crate::gro_stage`]), if replies go
    /// through one on their way to `tun_ifindex`.
    pub gro_stage: Option<u32>,
    /// Established forwarded TCP connections one remote address may hold
    /// at once; 0: no limit.
    pub fwd_per_source: u32,
}

/// Where the WAN's admission checks run (dropping what has no flow, the
/// download rate limit, fragment notes) before TC translates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WanFilter {
    /// In an XDP program, per packet on the wire, before the kernel builds
    /// an skb: the cheapest drop.
    Xdp,
    /// At the start of TC, after GRO: for a WAN interface where a native
    /// XDP program costs offloads (a veth takes TSO from its peer, and
    /// virtio-net turns off the host's receive offloads).
    Tc,
}

impl WanFilter {
    /// The filter for a WAN interface whose driver is `driver`, when the
    /// operator named none: TC on a veth, XDP on anything else.
    ///
    /// On a veth XDP runs on skbs its peer already built (converted, at
    /// times copied, into an XDP buffer), so it saves no allocation; and it
    /// takes TSO from the peer, whose packets then cross one MTU at a time
    /// through a 256-packet ring that drops bursts. Measured: downloads
    /// 1.25–1.6× faster with TC, no ring drops (docs/performance.md).
    /// virtio-net also loses receive offloads to XDP, but there XDP does
    /// drop before an skb exists: the operator chooses (docs/operations.md).
    pub fn for_driver(driver: &str) -> WanFilter {
        match driver {
            "veth" => WanFilter::Tc,
            _ => WanFilter::Xdp,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("`{0}` is not a WAN filter: expected xdp or tc")]
pub struct WanFilterError(String);

impl std::str::FromStr for WanFilter {
    type Err = WanFilterError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "xdp" => Ok(Self::Xdp),
            "tc" => Ok(Self::Tc),
            other => Err(WanFilterError(other.to_owned())),
        }
    }
}

impl std::fmt::Display for WanFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Xdp => "xdp",
            Self::Tc => "tc",
        })
    }
}

impl DatapathConfig {
    fn to_map_value(&self) -> Result<Config, PublicAddrError> {
        check_public_addrs(&self.public_addrs)?;
        let mut public_addrs = [[0; 4]; veil_common::MAX_PUBLIC_ADDRS];
        for (slot, addr) in public_addrs.iter_mut().zip(&self.public_addrs) {
            *slot = addr.octets();
        }
        Ok(Config {
            public_count: self.public_addrs.len() as u32,
            public_addrs,
            vip_net: self.vip_pool.addr().octets(),
            vip_mask: self.vip_pool.mask().octets(),
            wan_ifindex: self.wan_ifindex,
            tun_ifindex: self.tun_ifindex,
            reply_ifindex: self.gro_stage.unwrap_or(self.tun_ifindex),
            nat_port_min: self.nat_ports.min,
            nat_port_max: self.nat_ports.max,
            tun_l2_len: self.tun_l2_len,
            flags: match self.wan_filter {
                WanFilter::Xdp => 0,
                WanFilter::Tc => Config::WAN_FILTER_IN_TC,
            },
            fwd_per_source: self.fwd_per_source,
        })
    }
}

pub struct Datapath {
    ebpf: Ebpf,
    pin_dir: Option<PathBuf>,
    /// The public addresses written by [`Self::configure`], for the flow
    /// table.
    public_addrs: Vec<Ipv4Addr>,
    /// The public IPv6 address written by [`Self::configure6`], if any.
    public6: Option<Ipv6Addr>,
    /// As [`Self::configure`] was told: whether [`Self::attach`] attaches
    /// XDP.
    wan_filter: WanFilter,
}

impl Datapath {
    /// Loads the embedded object and verifies every program. Nothing is
    /// attached yet.
    pub fn load() -> Result<Self, DatapathError> {
        Self::load_sized(veil_common::MAX_FLOWS)
    }

    /// [`Self::load`] with flow maps of `flows` entries each
    /// (`--max-flows`). The kernel allocates them whole at load, so this is
    /// what they cost used or not (docs/operations.md, "Sizing").
    pub fn load_sized(flows: u32) -> Result<Self, DatapathError> {
        if OBJECT.is_empty() {
            return Err(DatapathError::NoObject);
        }
        let mut ebpf = aya::EbpfLoader::new()
            .map_max_entries(EGRESS_MAP, flows)
            .map_max_entries(REVERSE_MAP, flows)
            .load(OBJECT)
            .map_err(DatapathError::Load)?;
        // The steering program is loaded when a device with several
        // queues asks for it (`tun_steering`).
        for name in [
            PROG_WAN_XDP,
            PROG_WAN_TC,
            PROG_TUN_TC,
            PROG_FWD_TC,
            PROG_GRO_TC,
        ] {
            let prog = ebpf
                .program_mut(name)
                .ok_or(DatapathError::MissingProgram(name))?;
            let loaded = match prog {
                aya::programs::Program::Xdp(p) => p.load(),
                aya::programs::Program::SchedClassifier(p) => p.load(),
                _ => return Err(DatapathError::MissingProgram(name)),
            };
            loaded.map_err(|source| DatapathError::Program { name, source })?;
        }
        Ok(Self {
            ebpf,
            pin_dir: None,
            public_addrs: Vec::new(),
            public6: None,
            wan_filter: WanFilter::Xdp,
        })
    }

    /// Writes the configuration the programs read on every packet.
    pub fn configure(&mut self, cfg: &DatapathConfig) -> Result<(), DatapathError> {
        let value = cfg.to_map_value().map_err(DatapathError::PublicAddrs)?;
        self.config_map()?
            .set(0, value, 0)
            .map_err(config_map_error)?;
        self.public_addrs = cfg.public_addrs.clone();
        self.wan_filter = cfg.wan_filter;
        Ok(())
    }

    /// Sends translated replies straight to the TUN device from now on,
    /// around a GRO stage that was lost, the rest of the configuration
    /// kept.
    pub fn bypass_gro_stage(&mut self) -> Result<(), DatapathError> {
        let mut config = self.config_map()?;
        let mut value = config.get(&0, 0).map_err(config_map_error)?;
        value.reply_ifindex = value.tun_ifindex;
        config.set(0, value, 0).map_err(config_map_error)
    }

    /// `VEIL_CONFIG`, whose one entry the programs read on every packet.
    fn config_map(&mut self) -> Result<Array<&mut MapData, Config>, DatapathError> {
        let map = self
            .ebpf
            .map_mut(CONFIG_MAP)
            .ok_or(DatapathError::MissingMap(CONFIG_MAP))?;
        Array::try_from(map).map_err(config_map_error)
    }

    /// Writes the IPv6 configuration (NAT66 to `public`, clients in
    /// `pool`); without it IPv6 from the tunnel is dropped and IPv6 on the
    /// WAN left to the host. Call before [`Self::flow_table6`].
    pub fn configure6(
        &mut self,
        public: Ipv6Addr,
        pool: ipnet::Ipv6Net,
    ) -> Result<(), DatapathError> {
        let name = veil_common::CONFIG6_MAP;
        let map_err = |source| DatapathError::Map { name, source };
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(DatapathError::MissingMap(name))?;
        let value = veil_common::Config6 {
            public_addr: public.octets(),
            client_net: pool.network().octets(),
            client_mask: pool.netmask().octets(),
            enabled: 1,
            _pad: 0,
        };
        let mut config: Array<_, veil_common::Config6> = Array::try_from(map).map_err(map_err)?;
        config.set(0, value, 0).map_err(map_err)?;
        self.public6 = Some(public);
        Ok(())
    }

    /// Hands the IPv6 flow maps to a [`FlowTable6`]; call once, after
    /// [`Self::configure6`].
    pub fn flow_table6(
        &mut self,
        ports: PortRange,
        timeouts: Timeouts,
    ) -> Result<FlowTable6, DatapathError> {
        let public = self.public6.ok_or(DatapathError::NotConfigured)?;
        let egress = self.take_hash(veil_common::EGRESS6_MAP)?;
        let reverse = self.take_hash(veil_common::REVERSE6_MAP)?;
        Ok(FlowTable6::new(egress, reverse, public, ports, timeouts))
    }

    /// The TUN device's steering program, loaded on the first call, for
    /// `Tun::set_steering_program` (see `veil_common::steer`).
    pub fn tun_steering(&mut self) -> Result<BorrowedFd<'_>, DatapathError> {
        let name = PROG_TUN_STEER;
        let prog: &mut SocketFilter = self.program(name)?;
        if prog.fd().is_err() {
            prog.load()
                .map_err(|source| DatapathError::Program { name, source })?;
        }
        let fd = prog
            .fd()
            .map_err(|source| DatapathError::Program { name, source })?;
        Ok(fd.as_fd())
    }

    /// Attaches XDP (unless the WAN filter is in TC) and TC to the WAN
    /// interface and TC to the tunnel device.
    pub fn attach(&mut self, wan: &str, tun: &str) -> Result<(), DatapathError> {
        if self.wan_filter == WanFilter::Xdp {
            let xdp: &mut Xdp = self.program(PROG_WAN_XDP)?;
            xdp.attach(wan, XdpMode::Default)
                .map_err(|source| attach_error(PROG_WAN_XDP, wan, source))?;
        }
        for (name, iface) in [(PROG_WAN_TC, wan), (PROG_TUN_TC, tun)] {
            // With the WAN filter in TC, veil's program goes first on the
            // WAN: a program ahead of it that passes a packet would end
            // the chain before veil's checks (the default puts it last).
            let first = name == PROG_WAN_TC && self.wan_filter == WanFilter::Tc;
            let tc: &mut SchedClassifier = self.program(name)?;
            let attached = if first {
                let order = TcAttachOptions::TcxOrder(LinkOrder::first());
                tc.attach_with_options(iface, TcAttachType::Ingress, order)
            } else {
                tc.attach(iface, TcAttachType::Ingress)
            };
            attached.map_err(|source| attach_error(name, iface, source))?;
        }
        info!(wan, tun, "datapath attached");
        Ok(())
    }

    /// Attaches the GRO stage's program (TC ingress) to the stage's far
    /// end, `iface`: what comes out of it goes into the TUN device.
    pub fn attach_gro_stage(&mut self, iface: &str) -> Result<(), DatapathError> {
        let tc: &mut SchedClassifier = self.program(PROG_GRO_TC)?;
        tc.attach(iface, TcAttachType::Ingress)
            .map_err(|source| attach_error(PROG_GRO_TC, iface, source))?;
        Ok(())
    }

    /// Pins the maps under `root/v{LAYOUT_VERSION}/`, replacing pins a
    /// previous run left behind. They are removed again on drop.
    pub fn pin(&mut self, root: &Path) -> Result<PathBuf, DatapathError> {
        let dir = root.join(format!("v{LAYOUT_VERSION}"));
        let pin_err = |source| DatapathError::Pin {
            path: dir.clone(),
            source,
        };
        ensure_bpffs(root).map_err(pin_err)?;
        fs::create_dir_all(&dir).map_err(pin_err)?;
        for (map, file) in PINS {
            let path = dir.join(file);
            match fs::remove_file(&path) {
                Ok(()) => debug!(path = %path.display(), "removed a stale pin"),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(pin_err(e)),
            }
            self.ebpf
                .map(map)
                .ok_or(DatapathError::MissingMap(map))?
                .pin(&path)
                .map_err(|e| pin_err(io::Error::other(e)))?;
        }
        self.pin_dir = Some(dir.clone());
        Ok(dir)
    }

    /// Hands the flow maps to a [`FlowTable`] translating to the public
    /// addresses [`Self::configure`] wrote; call once, after it.
    pub fn flow_table(
        &mut self,
        ports: PortRange,
        timeouts: Timeouts,
    ) -> Result<FlowTable, DatapathError> {
        if self.public_addrs.is_empty() {
            return Err(DatapathError::NotConfigured);
        }
        let egress = self.take_hash(EGRESS_MAP)?;
        let reverse = self.take_hash(REVERSE_MAP)?;
        let forwarded = self.share_hash(FWD_FLOWS_MAP)?;
        FlowTable::new(
            egress,
            reverse,
            forwarded,
            self.public_addrs.clone(),
            ports,
            timeouts,
        )
        .map_err(DatapathError::PublicAddrs)
    }

    /// Lookups of forwarded connections for the packet path, beside the
    /// [`Forwarder`]; call before [`Self::forwarder`].
    pub fn forward_replies(&self) -> Result<crate::forward::Replies, DatapathError> {
        Ok(crate::forward::Replies::new(
            self.share_hash(FWD_FLOWS_MAP)?,
        ))
    }

    /// Hands the forwarding maps to a [`Forwarder`]; call once.
    pub fn forwarder(&mut self, timeouts: Timeouts) -> Result<Forwarder, DatapathError> {
        Ok(Forwarder::new(
            self.take_hash(FWD_RULES_MAP)?,
            self.take_hash(FWD_FLOWS_MAP)?,
            self.take_hash(FWD_STATS_MAP)?,
            self.take_hash(veil_common::FWD_SOURCES_MAP)?,
            timeouts,
        ))
    }

    /// Attaches the forwarding program (TC ingress) to the interface a
    /// forward target is reached through, for its replies. The WAN
    /// interface needs none: its own program forwards too.
    pub fn attach_forward(&mut self, iface: &str) -> Result<(), DatapathError> {
        let tc: &mut SchedClassifier = self.program(PROG_FWD_TC)?;
        tc.attach(iface, TcAttachType::Ingress)
            .map_err(|source| attach_error(PROG_FWD_TC, iface, source))?;
        info!(iface, "forwarding attached");
        Ok(())
    }

    /// Writes the TTL and IP ID normalisation of outgoing packets.
    pub fn normalize(
        &mut self,
        value: veil_common::normalize::Normalize,
    ) -> Result<(), DatapathError> {
        let name = veil_common::normalize::NORMALIZE_MAP;
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(DatapathError::MissingMap(name))?;
        let mut array: aya::maps::Array<_, veil_common::normalize::Normalize> =
            aya::maps::Array::try_from(map)
                .map_err(|source| DatapathError::Map { name, source })?;
        array
            .set(0, value, 0)
            .map_err(|source| DatapathError::Map { name, source })
    }

    /// Hands the per-client limits map to the daemon; call once, after
    /// [`Self::pin`].
    pub fn rate_limits(&mut self) -> Result<crate::ratelimit::RateLimits, DatapathError> {
        let name = veil_common::ratelimit::LIMITED_MAP;
        let count = self.take_array(name)?;
        crate::ratelimit::RateLimits::new(self.take_hash(veil_common::ratelimit::RATE_MAP)?, count)
            .map_err(|source| DatapathError::Map { name, source })
    }

    /// The datapath's counters, summed over CPUs, by reason.
    pub fn stats(&self) -> Result<Vec<(Reason, Counter)>, DatapathError> {
        let map_err = |source| DatapathError::Map {
            name: STATS_MAP,
            source,
        };
        let map = self
            .ebpf
            .map(STATS_MAP)
            .ok_or(DatapathError::MissingMap(STATS_MAP))?;
        let stats: PerCpuArray<_, Counter> = PerCpuArray::try_from(map).map_err(map_err)?;
        Reason::ALL
            .iter()
            .filter(|r| (**r as u32) < REASON_SLOTS)
            .map(|&reason| {
                let per_cpu = stats.get(&(reason as u32), 0).map_err(map_err)?;
                let total = per_cpu.iter().fold(Counter::default(), |a, c| Counter {
                    packets: a.packets + c.packets,
                    bytes: a.bytes + c.bytes,
                });
                Ok((reason, total))
            })
            .collect()
    }

    /// The fragment map (the datapath's own), for inspection and tests.
    pub fn fragments(
        &mut self,
    ) -> Result<HashMap<&mut MapData, FragKey, FragEntry>, DatapathError> {
        let map = self
            .ebpf
            .map_mut(FRAG_MAP)
            .ok_or(DatapathError::MissingMap(FRAG_MAP))?;
        HashMap::try_from(map).map_err(|source| DatapathError::Map {
            name: FRAG_MAP,
            source,
        })
    }

    /// The IPv6 fragment map (the datapath's own), for inspection and tests.
    pub fn fragments6(
        &mut self,
    ) -> Result<HashMap<&mut MapData, veil_common::FragKey6, veil_common::FragEntry6>, DatapathError>
    {
        let name = veil_common::FRAG6_MAP;
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(DatapathError::MissingMap(name))?;
        HashMap::try_from(map).map_err(|source| DatapathError::Map { name, source })
    }

    /// The datapath's log (aya-log), delivered to `logger` on
    /// [`aya_log::EbpfLogger::flush`]; call once. With `log::logger()` the
    /// records land in the daemon's tracing output.
    pub fn logger<T: log::Log>(
        &mut self,
        logger: T,
    ) -> Result<aya_log::EbpfLogger<T>, DatapathError> {
        aya_log::EbpfLogger::init_with_logger(&mut self.ebpf, logger)
            .map_err(|e| DatapathError::Logger(e.to_string()))
    }

    /// A loaded program, for attaching elsewhere or BPF_PROG_TEST_RUN.
    pub fn program<'a, T>(&'a mut self, name: &'static str) -> Result<&'a mut T, DatapathError>
    where
        &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
    {
        let prog = self
            .ebpf
            .program_mut(name)
            .ok_or(DatapathError::MissingProgram(name))?;
        prog.try_into()
            .map_err(|source| DatapathError::Program { name, source })
    }

    fn take_array<V: aya::Pod>(
        &mut self,
        name: &'static str,
    ) -> Result<Array<MapData, V>, DatapathError> {
        let map = self
            .ebpf
            .take_map(name)
            .ok_or(DatapathError::MissingMap(name))?;
        Array::try_from(map).map_err(|source| DatapathError::Map { name, source })
    }

    /// A handle of its own on a map someone else takes (its descriptor
    /// duplicated): for a second reader.
    fn share_hash<K: aya::Pod, V: aya::Pod>(
        &self,
        name: &'static str,
    ) -> Result<HashMap<MapData, K, V>, DatapathError> {
        let map = self.ebpf.map(name).ok_or(DatapathError::MissingMap(name))?;
        let borrowed: HashMap<&MapData, K, V> =
            HashMap::try_from(map).map_err(|source| DatapathError::Map { name, source })?;
        let fd = aya::maps::IterableMap::map(&borrowed)
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| DatapathError::Map {
                name,
                source: MapError::SyscallError(aya::sys::SyscallError {
                    call: "dup",
                    io_error: e,
                }),
            })?;
        let data = MapData::from_fd(fd).map_err(|source| DatapathError::Map { name, source })?;
        HashMap::try_from(aya::maps::Map::HashMap(data))
            .map_err(|source| DatapathError::Map { name, source })
    }

    fn take_hash<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &'static str,
    ) -> Result<HashMap<MapData, K, V>, DatapathError> {
        let map = self
            .ebpf
            .take_map(name)
            .ok_or(DatapathError::MissingMap(name))?;
        HashMap::try_from(map).map_err(|source| DatapathError::Map { name, source })
    }
}

impl Drop for Datapath {
    fn drop(&mut self) {
        if let Some(dir) = &self.pin_dir {
            for (_, file) in PINS {
                let _ = fs::remove_file(dir.join(file));
            }
            // Only empty directories go: another layout's pins stay.
            let _ = fs::remove_dir(dir);
            if let Some(root) = dir.parent() {
                let _ = fs::remove_dir(root);
            }
        }
    }
}

/// Makes sure pins under `root` land on a BPF filesystem: the standard
/// mount point is mounted if the system has not done it (as systemd would);
/// anywhere else, a missing bpffs is an error.
fn ensure_bpffs(root: &Path) -> io::Result<()> {
    const STANDARD: &str = "/sys/fs/bpf";
    let existing = root
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    if is_bpffs(existing)? {
        return Ok(());
    }
    if !root.starts_with(STANDARD) || !is_bpffs_mountable(existing) {
        return Err(io::Error::other(format!(
            "{} is not on a BPF filesystem (mount one with `mount -t bpf bpf DIR`)",
            root.display()
        )));
    }
    mount_bpffs(Path::new(STANDARD))?;
    info!("mounted the BPF filesystem on {STANDARD}");
    Ok(())
}

fn config_map_error(source: MapError) -> DatapathError {
    DatapathError::Map {
        name: CONFIG_MAP,
        source,
    }
}

/// Mounts a BPF filesystem on `target` (an existing directory).
pub fn mount_bpffs(target: &Path) -> io::Result<()> {
    let target = std::ffi::CString::new(target.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: valid C strings; a plain bpffs mount with no data.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn is_bpffs_mountable(existing: &Path) -> bool {
    existing == Path::new("/sys/fs/bpf")
}

fn is_bpffs(path: &Path) -> io::Result<bool> {
    const BPF_FS_MAGIC: i64 = 0xcafe4a11;
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `st` is written by statfs on success.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

fn attach_error(program: &'static str, iface: &str, source: ProgramError) -> DatapathError {
    DatapathError::Attach {
        program,
        iface: iface.to_owned(),
        source,
    }
}
