//! Port forwarding in the running gateway: the rule file loaded at start,
//! reloaded on SIGHUP and when it changes, and the forwarded connections
//! expired. The datapath forwards every packet; this only keeps its maps.

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering::Relaxed},
        Arc, Mutex,
    },
    time::Duration,
};

use anyhow::{Context, Result};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{debug, info, warn};

use super::{Shared, GC_INTERVAL};
use crate::{
    datapath::Datapath,
    forward::{self, Forwarder, Gateway, Replies},
    net::monotonic_ns,
};

/// How often the rule file is looked at for changes.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);
/// How long rules that failed to apply (an interface that would not take
/// the program, a full map) wait before they are tried again.
const RETRY_AFTER: Duration = Duration::from_secs(10);
/// The largest rule file read: 4,096 rules of a long line each. A file
/// grown past it (or a device) costs no more memory than this.
const MAX_RULE_FILE: usize = 1 << 20;

/// The forwarding state the gateway keeps.
pub struct Forwarding {
    pub path: PathBuf,
    pub forwarder: Mutex<Forwarder>,
    /// The connections' map for the packet path: looked up without the
    /// forwarder's lock.
    replies: Replies,
    /// The skipped lines of the last load, as reported (`FILE:LINE: why`).
    pub problems: Mutex<Vec<String>>,
    gateway: Gateway,
    /// The TUN device and the gateway's address inside the tunnel: where
    /// `client:NAME` targets are reached, and from.
    client_route: (u32, Ipv4Addr),
    /// Clients named by rules that could not apply yet (no address).
    waiting: Mutex<BTreeSet<String>>,
    /// Whether a rule forwards to a client: only then are client packets
    /// looked at as replies.
    to_clients: AtomicBool,
    /// Interfaces the forwarding program is attached to (or need none).
    attached: Mutex<BTreeSet<u32>>,
    /// The file's bytes when last loaded.
    loaded: Mutex<Option<Vec<u8>>>,
    /// Bytes that failed to apply, and when (monotonic ns): tried again
    /// after [`RETRY_AFTER`], or at once if the file changes.
    failed: Mutex<Option<(Vec<u8>, u64)>>,
    /// The file's bytes at the last look for changes.
    looked: Mutex<Settling>,
}

/// A file's bytes from one look to the next.
#[derive(Debug, Default)]
struct Settling(Option<Vec<u8>>);

impl Settling {
    /// `now`, if it is what the last look saw too: a file an editor is
    /// still writing is taken once it has settled, not half-written.
    fn settled(&mut self, now: Option<Vec<u8>>) -> Option<Vec<u8>> {
        let same = self.0 == now;
        self.0.clone_from(&now);
        now.filter(|_| same)
    }
}

impl Forwarding {
    pub fn new(
        path: PathBuf,
        (forwarder, replies): (Forwarder, Replies),
        gateway: Gateway,
        wan_ifindex: u32,
        client_route: (u32, Ipv4Addr),
    ) -> Self {
        Self {
            path,
            forwarder: Mutex::new(forwarder),
            replies,
            problems: Mutex::new(Vec::new()),
            // The WAN's own program forwards; the TUN device's answers
            // clients' connections.
            attached: Mutex::new(BTreeSet::from([wan_ifindex, client_route.0])),
            gateway,
            client_route,
            waiting: Mutex::new(BTreeSet::new()),
            to_clients: AtomicBool::new(false),
            loaded: Mutex::new(None),
            failed: Mutex::new(None),
            looked: Mutex::default(),
        }
    }

    /// Whether a packet from client `vip` answers a `client:NAME`
    /// connection: then it goes to the datapath as it is (no flow of its
    /// own, no egress policy: the rule is the operator's).
    pub fn is_client_reply(&self, vip: Ipv4Addr, pkt: &[u8]) -> bool {
        if !self.to_clients.load(Relaxed) {
            return false;
        }
        // Only packets to a NAT port can answer a connection: the rest (a
        // query to the gateway's DNS service) need no lookup. The lookup
        // takes no lock: the forwarder's expiry holds its own for a walk
        // of the whole table.
        forward::client_reply_key(pkt, vip, self.client_route.1)
            .filter(|key| self.gateway.nat_ports.contains(key.dst_port))
            .is_some_and(|key| self.replies.contains(&key))
    }

    /// Whether a client a rule waits for has an address now.
    fn client_arrived(&self, leases: &dyn Fn(&str) -> Option<Ipv4Addr>) -> bool {
        let waiting = self.waiting.lock().expect("waiting lock");
        waiting.iter().any(|name| leases(name).is_some())
    }

    /// Reads, resolves and applies the rule file. A file that cannot be
    /// read leaves the rules as they were.
    pub fn load(
        &self,
        datapath: &Mutex<Option<Datapath>>,
        leases: &dyn Fn(&str) -> Option<Ipv4Addr>,
    ) -> Result<()> {
        let bytes = super::read_bounded(&self.path, MAX_RULE_FILE)
            .with_context(|| format!("reading the forward rules {}", self.path.display()))?;
        self.apply(bytes, datapath, leases)
    }

    /// Resolves and applies `bytes`, the rule file's. Bytes that fail are
    /// not taken for loaded: they are tried again ([`Self::changed`]).
    fn apply(
        &self,
        bytes: Vec<u8>,
        datapath: &Mutex<Option<Datapath>>,
        leases: &dyn Fn(&str) -> Option<Ipv4Addr>,
    ) -> Result<()> {
        let done = self.apply_once(&bytes, datapath, leases);
        let mut failed = self.failed.lock().expect("failed lock");
        match done {
            Ok(()) => {
                *failed = None;
                *self.loaded.lock().expect("loaded lock") = Some(bytes);
            }
            Err(_) => *failed = Some((bytes, monotonic_ns())),
        }
        done
    }

    fn apply_once(
        &self,
        bytes: &[u8],
        datapath: &Mutex<Option<Datapath>>,
        leases: &dyn Fn(&str) -> Option<Ipv4Addr>,
    ) -> Result<()> {
        let text = String::from_utf8_lossy(bytes);
        let (rules, mut problems) = forward::parse(&text);
        let named: BTreeSet<String> = rules
            .iter()
            .filter_map(|r| match &r.target {
                forward::Target::Client(name) => Some(name.clone()),
                forward::Target::Host(_) => None,
            })
            .collect();
        let (resolved, more) = forward::resolve(rules, &self.gateway, leases, self.client_route);
        problems.extend(more);
        *self.waiting.lock().expect("waiting lock") = named
            .iter()
            .filter(|n| leases(n).is_none())
            .cloned()
            .collect();
        self.to_clients.store(
            resolved
                .iter()
                .any(|r| r.value.ifindex == self.client_route.0),
            Relaxed,
        );
        problems.sort_by_key(|p| p.line);
        let reports: Vec<String> = problems.iter().map(|p| p.report(&self.path)).collect();
        for r in &reports {
            warn!("forward rule skipped: {r}");
        }
        let ifaces: BTreeSet<u32> = resolved.iter().map(|r| r.value.ifindex).collect();
        match datapath.lock().expect("datapath lock").as_mut() {
            Some(datapath) => self.attach(datapath, &ifaces)?,
            None => return Ok(()),
        }
        let applied = self
            .forwarder
            .lock()
            .expect("forwarder lock")
            .apply(resolved)?;
        info!(
            file = %self.path.display(),
            "forward rules loaded: {} added, {} changed, {} removed, {} unchanged, {} skipped",
            applied.added, applied.changed, applied.removed, applied.unchanged, reports.len()
        );
        *self.problems.lock().expect("problems lock") = reports;
        Ok(())
    }

    /// Attaches the forwarding program where targets' replies arrive.
    fn attach(&self, datapath: &mut Datapath, ifaces: &BTreeSet<u32>) -> Result<()> {
        let mut attached = self.attached.lock().expect("attached lock");
        for index in ifaces.difference(&attached.clone()) {
            let Some((_, name)) = forward::ifaces().into_iter().find(|(i, _)| i == index) else {
                continue;
            };
            datapath.attach_forward(&name)?;
            attached.insert(*index);
        }
        Ok(())
    }

    /// The file's bytes if they differ from what was loaded and are what
    /// they were a look ago ([`Settling`]): a half-written file would drop
    /// the rules of its missing lines for a second. These bytes are the
    /// ones loaded, not a later read. SIGHUP loads at once.
    fn changed(&self) -> Option<Vec<u8>> {
        let now = super::read_bounded(&self.path, MAX_RULE_FILE).ok();
        let settled = self.looked.lock().expect("looked lock").settled(now)?;
        if self.loaded.lock().expect("loaded lock").as_ref() == Some(&settled) {
            return None;
        }
        let failed = self.failed.lock().expect("failed lock");
        let waiting = failed.as_ref().is_some_and(|(bytes, at)| {
            *bytes == settled && monotonic_ns().saturating_sub(*at) < RETRY_AFTER.as_nanos() as u64
        });
        (!waiting).then_some(settled)
    }

    /// What to load on a look: the file, settled and changed, else the
    /// rules loaded last when a client they wait for arrived (the file may
    /// be mid-write just then).
    fn on_look(&self, leases: &dyn Fn(&str) -> Option<Ipv4Addr>) -> Option<Reload> {
        if let Some(bytes) = self.changed() {
            return Some(Reload::These(bytes));
        }
        if !self.client_arrived(leases) {
            return None;
        }
        let loaded = self.loaded.lock().expect("loaded lock").clone();
        Some(loaded.map_or(Reload::ReadFile, Reload::These))
    }
}

/// What a reload of the rules loads.
enum Reload {
    /// The file as it is now (SIGHUP).
    ReadFile,
    /// These bytes, the file's at a look.
    These(Vec<u8>),
}

impl Shared {
    /// A client's address, if it has one (a lease is for good).
    pub(super) fn lease_of(&self, name: &str) -> Option<Ipv4Addr> {
        self.clients
            .lock()
            .expect("clients lock")
            .leases()
            .get(name)
            .copied()
    }

    fn reload_forward(&self, fwd: &Forwarding, what: Reload) {
        let leases = |name: &str| self.lease_of(name);
        let done = match what {
            Reload::ReadFile => fwd.load(&self.datapath, &leases),
            Reload::These(bytes) => fwd.apply(bytes, &self.datapath, &leases),
        };
        if let Err(e) = done {
            warn!("forward rules kept as they were: {e:#}");
        }
    }
}

/// Reloads the rules on SIGHUP and when the file changes; expires idle
/// connections.
pub(super) async fn watch(shared: Arc<Shared>, fwd: Arc<Forwarding>) -> Result<()> {
    let mut hup = signal(SignalKind::hangup()).context("installing a SIGHUP handler")?;
    let mut look = tokio::time::interval(WATCH_INTERVAL);
    // Ticks missed while a reload or gc ran are not made up at once: two
    // looks a moment apart would take a file still being written as
    // settled.
    look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut gc = tokio::time::interval(GC_INTERVAL);
    loop {
        let reload = tokio::select! {
            _ = hup.recv() => {
                info!("SIGHUP: reloading the forward rules");
                Some(Reload::ReadFile)
            }
            _ = look.tick() => {
                // A read of the file may block (a network file system).
                let (shared, fwd) = (shared.clone(), fwd.clone());
                tokio::task::spawn_blocking(move || fwd.on_look(&|n| shared.lease_of(n))).await?
            }
            _ = gc.tick() => {
                let fwd = fwd.clone();
                let expired = tokio::task::spawn_blocking(move || {
                    fwd.forwarder.lock().expect("forwarder lock").gc(monotonic_ns())
                })
                .await?;
                match expired {
                    Ok(0) => {}
                    Ok(n) => debug!(expired = n, "forward gc"),
                    Err(e) => warn!("forward gc: {e:#}"),
                }
                None
            }
        };
        if let Some(what) = reload {
            let (shared, fwd) = (shared.clone(), fwd.clone());
            // DNS and route look-ups block.
            tokio::task::spawn_blocking(move || shared.reload_forward(&fwd, what)).await?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Settling;

    #[test]
    fn a_file_is_taken_once_two_looks_agree() {
        let mut file = Settling::default();
        let bytes = |s: &str| Some(s.as_bytes().to_vec());
        assert_eq!(file.settled(bytes("8080,h,")), None, "being written");
        assert_eq!(file.settled(bytes("8080,h,80\n")), None, "still changing");
        assert_eq!(file.settled(bytes("8080,h,80\n")), bytes("8080,h,80\n"));
        assert_eq!(file.settled(bytes("8080,h,80\n")), bytes("8080,h,80\n"));
        assert_eq!(file.settled(None), None, "gone");
    }
}
