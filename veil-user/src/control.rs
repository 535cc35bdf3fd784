//! The daemon's control socket (`STATE_DIR/control.sock`, mode 0600):
//! `veil-user status` asks, the running gateway answers with a snapshot.
//! One request line, one JSON reply line.

use std::{collections::BTreeMap, net::Ipv4Addr, path::Path};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
};

pub const SOCKET: &str = "control.sock";

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Status {
    pub clients: Vec<ClientStatus>,
    pub flows: FlowCounts,
    /// Connections refused before a session, by cause.
    pub refused: BTreeMap<String, u64>,
    /// The daemon's own drop and refusal counters.
    pub counters: BTreeMap<String, u64>,
    /// The datapath's counters, by reason code name.
    pub datapath: BTreeMap<String, PacketCount>,
    /// Port forwarding rules in force, with their counters.
    #[serde(default)]
    pub forwards: Vec<ForwardStatus>,
    /// Lines of the forward rule file that were skipped, with why.
    #[serde(default)]
    pub forward_problems: Vec<String>,
    /// The GRO stage in front of the TUN device; absent without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gro_stage: Option<StageState>,
}

/// The GRO stage's state, as `status` shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StageState {
    /// Replies go through it.
    In,
    /// Deleted or set down under the gateway: replies bypass it, unmerged,
    /// until a restart makes a new one.
    Lost,
}

/// One forward rule, as `status` shows it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ForwardStatus {
    /// `tcp/8080`
    pub rule: String,
    /// `10.200.9.2:80`, as written (a host name stays a name).
    pub target: String,
    /// Connections made, packets and bytes forwarded (both directions).
    pub connections: u64,
    pub packets: u64,
    pub bytes: u64,
    /// Connections ended before they were assured (a handshake not
    /// finished, UDP not kept up) to make room for newer ones.
    #[serde(default)]
    pub evicted: u64,
    /// Connections with entries in the datapath now.
    pub open: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClientStatus {
    pub name: String,
    pub vip: Ipv4Addr,
    /// Its IPv6 address, when the gateway carries IPv6 (`--pool6`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vip6: Option<std::net::Ipv6Addr>,
    /// The tunnel's remote address: the client's public address, shown
    /// only when asked for (`status --addresses`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// Seconds since the epoch.
    pub connected_since: u64,
    pub bytes_from_client: u64,
    pub bytes_to_client: u64,
    /// Its rate limit (each way), if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<String>,
    /// Its quota in bytes per period, if it has one, and what it used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<u64>,
    #[serde(default)]
    pub quota_used: u64,
    /// Packets the datapath dropped over its rate, over its quota.
    #[serde(default)]
    pub rate_dropped: u64,
    #[serde(default)]
    pub quota_dropped: u64,
    /// Bytes of replies waiting in its queue for its session to send, up
    /// to `--client-buffer`: a client that reads slower than its replies
    /// arrive (or a session that falls behind) holds it full.
    #[serde(default)]
    pub replies_queued: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct FlowCounts {
    pub total: usize,
    pub tcp: usize,
    pub udp: usize,
    pub icmp: usize,
    /// The NAT port range and how many of its ports some flow uses.
    pub nat_ports: String,
    pub nat_ports_in_use: usize,
    /// IPv6 flows (NAT66), not counted in the others.
    #[serde(default)]
    pub ipv6: usize,
    /// The longest-lived flow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest: Option<FlowBrief>,
    /// The flows with the most packets, both directions together.
    #[serde(default)]
    pub busiest: Vec<FlowBrief>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct FlowBrief {
    /// `tcp 10.77.0.2:50000 -> 198.18.0.2:443 via 198.18.0.1:61377`
    pub flow: String,
    pub age_secs: u64,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct PacketCount {
    pub packets: u64,
    pub bytes: u64,
}

impl Status {
    /// Without what ties a client to a place or a destination: its public
    /// address and the flows' remote endpoints (the default answer; `status
    /// --addresses` asks for them).
    pub fn without_addresses(mut self) -> Self {
        for c in &mut self.clients {
            c.peer = None;
        }
        self.flows.oldest = None;
        self.flows.busiest.clear();
        self
    }
}

/// The request for a status with addresses.
const WITH_ADDRESSES: &str = "status addresses";

/// Binds the socket, replacing one a crashed daemon left behind.
pub fn bind(state_dir: &Path) -> Result<UnixListener> {
    let path = state_dir.join(SOCKET);
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(&path).is_ok() {
            bail!(
                "another gateway is running with state directory {}",
                state_dir.display()
            );
        }
        std::fs::remove_file(&path)
            .with_context(|| format!("removing stale {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves requests until the task is dropped; `snapshot` makes a status.
pub async fn serve(listener: UnixListener, snapshot: impl Fn() -> Status) -> Result<()> {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                crate::net::accept_failed("control socket", &e).await;
                continue;
            }
        };
        let (read, mut write) = stream.into_split();
        let mut line = String::new();
        // One short request; anything else is answered with an error.
        let n = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            BufReader::new(read).read_line(&mut line),
        )
        .await;
        let reply = match (n, line.trim()) {
            (Ok(Ok(_)), "status") => serde_json::to_string(&snapshot().without_addresses())?,
            (Ok(Ok(_)), WITH_ADDRESSES) => serde_json::to_string(&snapshot())?,
            _ => r#"{"error":"unknown request: send `status`"}"#.to_owned(),
        };
        let _ = write.write_all(format!("{reply}\n").as_bytes()).await;
    }
}

/// Asks the gateway running with `state_dir` for its status, with the
/// clients' public addresses and the flows' remotes if `addresses`.
pub async fn query(state_dir: &Path, addresses: bool) -> Result<Status> {
    let path = state_dir.join(SOCKET);
    let stream = UnixStream::connect(&path).await.with_context(|| {
        format!(
            "no gateway is running with state directory {} (nothing at {})",
            state_dir.display(),
            path.display()
        )
    })?;
    let (read, mut write) = stream.into_split();
    let request = if addresses { WITH_ADDRESSES } else { "status" };
    write.write_all(format!("{request}\n").as_bytes()).await?;
    let mut line = String::new();
    BufReader::new(read).read_line(&mut line).await?;
    serde_json::from_str(&line).context("reading the gateway's answer")
}
