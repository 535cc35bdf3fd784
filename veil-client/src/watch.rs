//! Network changes: the client notices when a new connection to the
//! endpoint in use (the one it is connected or connecting to, followed
//! across failovers) would leave from another local address than the one it has
//! (a new DHCP lease, another Wi-Fi, a cable plugged in) and reconnects
//! at once, rather than after its keepalive timeout.
//!
//! It asks the kernel every [`INTERVAL`] (a connected UDP socket: four
//! system calls, no packet, no process) instead of following rtnetlink
//! events: a little more wake-up, much less code, and a change is seen
//! within a quarter of a second either way.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use tokio::time::{interval, Interval, MissedTickBehavior};

use crate::uplink::source_for;

pub const INTERVAL: Duration = Duration::from_millis(250);

pub struct Watch {
    gateway: SocketAddr,
    ticker: Interval,
}

impl Watch {
    pub fn new(gateway: SocketAddr) -> Self {
        let mut ticker = interval(INTERVAL);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Watch { gateway, ticker }
    }

    /// Watches the uplink toward `gateway` from now on: the endpoint in
    /// use after a failover.
    pub fn follow(&mut self, gateway: SocketAddr) {
        self.gateway = gateway;
    }

    /// Resolves once a connection to the gateway would leave from a local
    /// address other than `from` (`None`: there was no route). Cancel-safe,
    /// and the ticks go on across calls, so it can sit in a `select!`
    /// loop.
    pub async fn moved(&mut self, from: Option<IpAddr>) -> IpAddr {
        loop {
            self.ticker.tick().await;
            match source_for(self.gateway) {
                Some(now) if Some(now) != from => return now,
                _ => {}
            }
        }
    }
}
