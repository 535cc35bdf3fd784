//! The GRO stage: a veth pair the gateway puts between the WAN and its TUN
//! device when the WAN interface does no GRO of its own.
//!
//! Without GRO every reply reaches the TUN device as the MTU-sized packet
//! it arrived as, and the daemon pays a read, a wake-up and a queue entry
//! for each: downloads ran at 0.4 of uploads, which cross as 64 KiB
//! super-packets. The datapath now sends translated replies into the
//! stage's near end instead; the kernel hands them to the far end's NAPI,
//! whose GRO merges each flow's run of segments, and the far end's TC
//! program (`veil_gro_tc`) hands the result to the TUN device. One read
//! then takes tens of KiB.
//!
//! A veth only hands a packet to its peer's NAPI when the sending end does
//! not do TSO itself, and NAPI (where GRO runs) is on at the far end only
//! with GRO asked for there: the near end has TSO off, the far end GRO on.
//! Both have IPv6 off, so that the kernel sends nothing of its own through
//! them (a router solicitation would reach the TUN reader as a reply), and
//! the WAN's MTU, so that whatever the WAN delivered fits.
//!
//! The pair is made and removed over rtnetlink (its messages built with the
//! `rtnetlink` crate, sent on a blocking socket, so that dropping the stage
//! removes it on every path out of the gateway). A pair that a killed
//! gateway left behind is replaced at the next start; a link of that name
//! that is not a veth is someone else's, and left alone.
//!
//! A stage deleted (or set down) under a running gateway would swallow
//! every reply sent into it, uncounted: [`StageWatch`] notices, and the
//! gateway then sends replies straight to the TUN device.

use std::{
    io,
    sync::atomic::{AtomicBool, Ordering::Relaxed},
};

use rtnetlink::{
    packet_core::{
        NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL,
        NLM_F_REQUEST,
    },
    packet_route::{link::LinkMessage, RouteNetlinkMessage},
    sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr},
    LinkUnspec, LinkVeth,
};
use tracing::{debug, info};

use crate::{control::StageState, net};

/// Whether the operator asked for the stage (`--gro-stage on|off`); with
/// neither, it is there when the WAN does no GRO ([`wanted`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StageSetting {
    On,
    Off,
}

#[derive(Debug, thiserror::Error)]
#[error("`{0}` is not a GRO stage setting: expected on or off")]
pub struct StageSettingError(String);

impl std::str::FromStr for StageSetting {
    type Err = StageSettingError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "on" => Ok(Self::On),
            "off" => Ok(Self::Off),
            other => Err(StageSettingError(other.to_owned())),
        }
    }
}

impl std::fmt::Display for StageSetting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::On => "on",
            Self::Off => "off",
        })
    }
}

/// Whether the gateway puts the stage in: as the operator said, else when
/// the WAN's GRO is off. A WAN whose GRO cannot be read gets none: the
/// stage would only add a hop in front of a NIC that merges already.
pub fn wanted(setting: Option<StageSetting>, wan_gro: &io::Result<bool>) -> bool {
    match setting {
        Some(StageSetting::On) => true,
        Some(StageSetting::Off) => false,
        None => matches!(wan_gro, Ok(false)),
    }
}

/// The stage's ends for TUN device `tun`: its name (shortened to fit)
/// with `-gi` (near: where replies go in) and `-go` (far: where they come
/// out merged).
pub fn names(tun: &str) -> (String, String) {
    // IFNAMSIZ less the terminating NUL and the 3-byte suffix.
    let stem: String = tun.chars().take(libc::IFNAMSIZ - 1 - 3).collect();
    (format!("{stem}-gi"), format!("{stem}-go"))
}

/// Why the stage could not be made.
#[derive(Debug, thiserror::Error)]
pub enum GroStageError {
    #[error("creating the veth pair {near}/{far}: {source}")]
    Create {
        near: String,
        far: String,
        #[source]
        source: io::Error,
    },
    #[error("a link named {name} exists and is not a veth (its driver: {driver}); veil leaves it alone: rename it, or the TUN device (--tun)")]
    NameTaken { name: String, driver: String },
    #[error("setting up {iface}: {source}")]
    Setup {
        iface: String,
        #[source]
        source: io::Error,
    },
}

/// The veth pair, there until dropped.
#[derive(Debug)]
pub struct GroStage {
    near: String,
    far: String,
    near_ifindex: u32,
}

impl GroStage {
    /// Makes the pair for TUN device `tun`, with MTU `mtu` (the WAN's),
    /// replacing one a previous run left.
    pub fn create(tun: &str, mtu: u32) -> Result<Self, GroStageError> {
        let (near, far) = names(tun);
        remove_stale(&near)?;
        let pair = LinkVeth::new(&near, &far).mtu(mtu).build();
        request(
            RouteNetlinkMessage::NewLink(pair),
            NLM_F_CREATE | NLM_F_EXCL,
        )
        .map_err(|source| GroStageError::Create {
            near: near.clone(),
            far: far.clone(),
            source,
        })?;
        // From here on, dropping the stage removes the pair.
        let mut stage = GroStage {
            near,
            far,
            near_ifindex: 0,
        };
        stage.set_up(mtu)?;
        Ok(stage)
    }

    fn set_up(&mut self, mtu: u32) -> Result<(), GroStageError> {
        let setup = |iface: &str, step: &dyn Fn(&str) -> io::Result<()>| {
            step(iface).map_err(|source| GroStageError::Setup {
                iface: iface.to_owned(),
                source,
            })
        };
        let up = |iface: &str| {
            let msg = LinkUnspec::new_with_name(iface).mtu(mtu).up().build();
            request(RouteNetlinkMessage::SetLink(msg), 0)
        };
        setup(&self.near, &|iface| net::set_tso(iface, false))?;
        setup(&self.far, &|iface| net::set_gro(iface, true))?;
        for iface in [&self.near, &self.far] {
            setup(iface, &veil_tunnel::net::disable_ipv6)?;
            setup(iface, &up)?;
        }
        self.near_ifindex = net::ifindex(&self.near).map_err(|source| GroStageError::Setup {
            iface: self.near.clone(),
            source,
        })?;
        Ok(())
    }

    /// Where the datapath sends replies.
    pub fn near_ifindex(&self) -> u32 {
        self.near_ifindex
    }

    /// The end whose TC ingress hands replies to the TUN device.
    pub fn far(&self) -> &str {
        &self.far
    }

    /// The end replies go in at.
    pub fn near(&self) -> &str {
        &self.near
    }

    /// The stage as the running gateway watches it, by its ends' names.
    pub fn watch(&self) -> StageWatch {
        StageWatch {
            near: self.near.clone(),
            far: self.far.clone(),
            near_ifindex: self.near_ifindex,
            lost: AtomicBool::new(false),
        }
    }
}

/// The stage as the running gateway sees it: whether it is still the one
/// the gateway made, and up; what its ring dropped; whether the gateway
/// gave up on it.
#[derive(Debug)]
pub struct StageWatch {
    near: String,
    far: String,
    near_ifindex: u32,
    lost: AtomicBool,
}

/// What became of a stage the gateway no longer sends replies through.
#[derive(Debug, thiserror::Error)]
pub enum StageLost {
    #[error("{0} is gone")]
    Gone(String),
    #[error("{0} was replaced")]
    Replaced(String),
    #[error("{0} is down")]
    Down(String),
}

impl StageWatch {
    /// Whether both ends are still the ones the gateway made, and up.
    pub fn check(&self) -> Result<(), StageLost> {
        match net::ifindex(&self.near) {
            Ok(i) if i == self.near_ifindex => {}
            Ok(_) => return Err(StageLost::Replaced(self.near.clone())),
            Err(_) => return Err(StageLost::Gone(self.near.clone())),
        }
        for end in [&self.near, &self.far] {
            match net::is_up(end) {
                Ok(true) => {}
                Ok(false) => return Err(StageLost::Down(end.clone())),
                Err(_) => return Err(StageLost::Gone(end.clone())),
            }
        }
        Ok(())
    }

    /// The end replies go in at.
    pub fn near(&self) -> &str {
        &self.near
    }

    /// Replies the stage dropped: those the far end's ring (256 packets)
    /// had no room for, which the near end counts as transmit drops.
    pub fn drops(&self) -> u64 {
        veil_tunnel::net::tx_dropped(&self.near)
    }

    /// Marks the stage lost: replies go around it from now on.
    pub fn set_lost(&self) {
        self.lost.store(true, Relaxed);
    }

    /// What `status` shows of it.
    pub fn state(&self) -> StageState {
        match self.lost.load(Relaxed) {
            true => StageState::Lost,
            false => StageState::In,
        }
    }
}

impl Drop for GroStage {
    fn drop(&mut self) {
        match delete_link(&self.near) {
            Ok(()) => debug!(near = %self.near, "GRO stage removed"),
            Err(e) => debug!(near = %self.near, "removing the GRO stage: {e}"),
        }
    }
}

/// Removes the near end a killed gateway left (taking its peer with it),
/// if it is a veth: a link of another kind under that name is not ours.
fn remove_stale(near: &str) -> Result<(), GroStageError> {
    match net::driver(near) {
        Ok(driver) if driver == "veth" => {}
        Ok(driver) => {
            return Err(GroStageError::NameTaken {
                name: near.to_owned(),
                driver,
            })
        }
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => return Ok(()),
        // Unreadable: creating the pair says what is wrong.
        Err(e) => {
            debug!(%near, "reading the driver of a stale GRO stage: {e}");
            return Ok(());
        }
    }
    match delete_link(near) {
        Ok(()) => info!(%near, "removed the GRO stage a previous run left"),
        Err(e) => debug!(%near, "removing a stale GRO stage: {e}"),
    }
    Ok(())
}

/// Deletes link `name` (a veth takes its peer with it).
fn delete_link(name: &str) -> io::Result<()> {
    let msg: LinkMessage = LinkUnspec::new_with_name(name).build();
    request(RouteNetlinkMessage::DelLink(msg), 0)
}

/// Sends one rtnetlink request and waits for the kernel's answer to it.
fn request(message: RouteNetlinkMessage, flags: u16) -> io::Result<()> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
    header.sequence_number = 1;
    let mut msg = NetlinkMessage::new(header, NetlinkPayload::from(message));
    msg.finalize();
    let mut buf = vec![0; msg.buffer_len()];
    msg.serialize(&mut buf);
    socket.send(&buf, 0)?;
    loop {
        let (reply, _) = socket.recv_from_full()?;
        let mut rest = &reply[..];
        while !rest.is_empty() {
            let answer = NetlinkMessage::<RouteNetlinkMessage>::deserialize(rest)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            let len = (answer.header.length as usize).clamp(1, rest.len());
            rest = &rest[len..];
            if answer.header.sequence_number != 1 {
                continue;
            }
            match answer.payload {
                NetlinkPayload::Error(e) if e.code.is_some() => return Err(e.to_io()),
                NetlinkPayload::Error(_) | NetlinkPayload::Done(_) => return Ok(()),
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stage_is_there_when_asked_for_or_when_the_wan_merges_nothing() {
        let no_gro = Ok(false);
        let gro = Ok(true);
        let unknown = Err(io::Error::from(io::ErrorKind::Unsupported));
        assert!(wanted(None, &no_gro));
        assert!(!wanted(None, &gro));
        assert!(!wanted(None, &unknown), "a NIC that may merge gets no hop");
        assert!(wanted(Some(StageSetting::On), &gro));
        assert!(!wanted(Some(StageSetting::Off), &no_gro));
    }

    #[test]
    fn the_ends_are_named_after_the_tun_device_and_fit() {
        assert_eq!(names("veilgw"), ("veilgw-gi".into(), "veilgw-go".into()));
        let (near, far) = names("a-very-long-name");
        assert_eq!((near.len(), far.len()), (15, 15));
        assert_ne!(near, far);
    }

    #[test]
    fn settings_read_as_written() {
        for s in ["on", "off"] {
            assert_eq!(s.parse::<StageSetting>().unwrap().to_string(), s);
        }
        assert!("yes".parse::<StageSetting>().is_err());
    }
}
