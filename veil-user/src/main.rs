//! `veil-user`: the veil gateway daemon, and the commands that manage its
//! clients.
//!
//! ```text
//! sudo veil-user --iface eth0                      # run the gateway
//! sudo veil-user client add alice --out alice.veil # issue a client profile
//! sudo veil-user client list
//! sudo veil-user client revoke alice
//! ```

use std::{
    net::{Ipv4Addr, SocketAddr},
    num::NonZeroU32,
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context, Result};
use clap::{
    parser::ValueSource, ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand,
};
use tracing::info;
use veil_user::{
    flows::{PortRange, Timeouts},
    gateway::{self, GatewayConfig},
    net::Ipv4Net,
    size::ByteSize,
    state::{Existing, PrivateFile, StateDir},
};

#[derive(Parser)]
#[command(
    version,
    about = "veil gateway: anonymizing egress through an in-kernel NAT"
)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    /// A TOML file with the gateway's settings (keys as the flags, e.g.
    /// `nat-ports = "61000-65535"`); flags given here win.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Where the CA, certificates, clients and leases live.
    #[arg(
        long,
        global = true,
        default_value = "/var/lib/veil",
        value_name = "DIR"
    )]
    state_dir: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    gateway: GatewayArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Manage client profiles.
    #[command(subcommand)]
    Client(ClientCommand),
    /// Show the running gateway's clients, flows and counters.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ClientCommand {
    /// Issue a profile: one file with everything a client needs. A revoked
    /// name may be issued again (its earlier profiles stay refused).
    Add {
        name: String,
        /// Where to write the profile: a new file, mode 0600 (it holds the
        /// client's key). An existing file or symlink is refused.
        #[arg(long, value_name = "FILE", required_unless_present_any = ["qr", "qr_png"])]
        out: Option<PathBuf>,
        /// Also print the profile as a QR code in the terminal (it holds
        /// the client's key: mind who sees the screen).
        #[arg(long)]
        qr: bool,
        /// Also write the QR code as a PNG: a new file, mode 0600, like
        /// --out (--force replaces it too).
        #[arg(long, value_name = "FILE")]
        qr_png: Option<PathBuf>,
        /// Replace an existing FILE: the profile is written to a new file
        /// beside it and renamed over it (a symlink is replaced, not
        /// followed).
        #[arg(long)]
        force: bool,
        /// The gateway address clients connect to (repeatable: the client
        /// tries them in order, going on to the next when one does not
        /// answer); default: the one the gateway serves on, as recorded in
        /// the state directory.
        #[arg(long, value_name = "HOST:PORT")]
        endpoint: Vec<String>,
    },
    /// List issued clients.
    List,
    /// Revoke a client: refused from its next handshake on, its live
    /// session closed.
    Revoke { name: String },
}

#[derive(Args)]
struct GatewayArgs {
    /// The WAN interface: where the datapath attaches and whose address
    /// remote hosts see.
    #[arg(long, value_name = "IFACE")]
    iface: Option<String>,
    /// The tunnel listener.
    #[arg(long, default_value = "0.0.0.0:443", value_name = "ADDR:PORT")]
    listen: SocketAddr,
    /// The address profiles point clients at (default: the interface's
    /// address and the listener's port).
    #[arg(long, value_name = "HOST:PORT")]
    endpoint: Option<String>,
    /// A public address: what remote hosts see (repeatable, up to 16; each
    /// client keeps one for all its flows). Default: the interface's first
    /// IPv4 address.
    #[arg(long, value_name = "IP")]
    public_addr: Vec<Ipv4Addr>,
    /// The clients' virtual addresses; the first is the gateway's.
    #[arg(long, default_value = "10.77.0.0/16", value_name = "CIDR")]
    pool: Ipv4Net,
    /// NAT ports; keep them out of net.ipv4.ip_local_port_range.
    #[arg(long, default_value = "61000-65535", value_name = "MIN-MAX")]
    nat_ports: PortRange,
    /// The gateway's TUN device.
    #[arg(long, default_value = "veilgw", value_name = "NAME")]
    tun: String,
    /// Where the BPF maps are pinned.
    #[arg(long, default_value = veil_user::datapath::DEFAULT_PIN_ROOT, value_name = "DIR")]
    pin_dir: PathBuf,
    /// Most clients connected at once; more are refused before the upgrade.
    #[arg(long, default_value_t = 1024)]
    max_clients: usize,
    /// Most connections still in their TLS handshake (not authenticated)
    /// at once; more are closed as they arrive.
    #[arg(long, default_value_t = 256)]
    max_handshakes: usize,
    /// Most connections in their handshake from one address at once.
    #[arg(long, default_value_t = 16)]
    max_handshakes_per_source: usize,
    /// Replies waiting for one client, at most (bytes, or with KiB/MiB);
    /// beyond, replies are dropped and counted (client_queue_full).
    #[arg(long, default_value = "4MiB", value_name = "SIZE")]
    client_buffer: ByteSize,
    /// Most flows at once.
    #[arg(long, default_value_t = veil_common::MAX_FLOWS as usize)]
    max_flows: usize,
    /// Most flows one client may hold, so that one client cannot fill the
    /// table for everyone.
    #[arg(long, default_value_t = 32768)]
    max_flows_per_client: usize,
    /// Most NAT ports one client may hold toward one remote address and
    /// port, so that one client cannot take every port toward a popular
    /// server (default: a quarter of --nat-ports).
    #[arg(long, value_name = "PORTS")]
    max_ports_per_endpoint: Option<NonZeroU32>,
    /// How long a disconnected client keeps its flows, for a quick reconnect.
    #[arg(long, default_value = "30", value_name = "SECONDS")]
    grace: u64,
    /// Open a range the default egress policy closes (repeatable).
    #[arg(long, value_name = "CIDR")]
    allow: Vec<Ipv4Net>,
    /// Close a range (repeatable; wins over --allow).
    #[arg(long, value_name = "CIDR")]
    deny: Vec<Ipv4Net>,
    /// Let clients reach each other's virtual addresses.
    #[arg(long)]
    allow_client_to_client: bool,
    /// An upstream resolver of the DNS service clients get on the pool's
    /// first address (repeatable, asked in order). Default: the
    /// nameservers of this machine's /etc/resolv.conf.
    #[arg(long, value_name = "IP")]
    dns: Vec<std::net::IpAddr>,
    /// Worker threads for tunnels (TLS and packet handling); default: one
    /// per CPU.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    threads: Option<u16>,
    /// Serve Prometheus metrics (GET /metrics) on this port of 127.0.0.1,
    /// or on ADDR:PORT to expose them (aggregates only: no client names).
    #[arg(long, value_name = "[ADDR:]PORT", value_parser = veil_user::metrics::parse_addr)]
    metrics: Option<SocketAddr>,
    /// Idle timeout of established TCP flows (RFC 5382: at least 7440).
    #[arg(long, default_value_t = 7440, value_name = "SECONDS")]
    timeout_tcp_established: u64,
    /// Idle timeout of opening and closing TCP flows.
    #[arg(long, default_value_t = 240, value_name = "SECONDS")]
    timeout_tcp_transitory: u64,
    /// Idle timeout of UDP flows (RFC 4787: at least 120).
    #[arg(long, default_value_t = 120, value_name = "SECONDS")]
    timeout_udp: u64,
    /// Idle timeout of UDP flows to port 53 (DNS; RFC 4787 allows shorter
    /// timers for well-known ports).
    #[arg(long, default_value_t = 30, value_name = "SECONDS")]
    timeout_udp_dns: u64,
    /// Idle timeout of ICMP echo flows (RFC 5508: at least 60).
    #[arg(long, default_value_t = 60, value_name = "SECONDS")]
    timeout_icmp: u64,
}

/// Takes each setting from the file unless the command line gave it.
fn apply_file(cli: &mut Cli, matches: &ArgMatches, file: veil_user::config::FileConfig) {
    let from_flag = |id: &str| matches.value_source(id) == Some(ValueSource::CommandLine);
    macro_rules! take {
        ($($field:ident),* $(,)?) => {$(
            if !from_flag(stringify!($field)) {
                if let Some(v) = file.$field {
                    cli.gateway.$field = v.into();
                }
            }
        )*};
    }
    take!(
        listen,
        pool,
        nat_ports,
        tun,
        pin_dir,
        max_clients,
        max_handshakes,
        max_handshakes_per_source,
        client_buffer,
        max_flows,
        max_flows_per_client,
        public_addr,
        grace,
        allow,
        deny,
        allow_client_to_client,
        dns,
        timeout_tcp_established,
        timeout_tcp_transitory,
        timeout_udp,
        timeout_udp_dns,
        timeout_icmp,
    );
    // Optional settings: present in the file means set.
    macro_rules! take_opt {
        ($($field:ident),* $(,)?) => {$(
            if !from_flag(stringify!($field)) && file.$field.is_some() {
                cli.gateway.$field = file.$field;
            }
        )*};
    }
    take_opt!(iface, endpoint, metrics, threads, max_ports_per_endpoint);
    if !from_flag("state_dir") {
        if let Some(dir) = file.state_dir {
            cli.state_dir = dir;
        }
    }
}

fn main() -> Result<()> {
    veil_user::init_logging();
    let matches = Cli::command().get_matches();
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if let Some(path) = &cli.config {
        let file = veil_user::config::load(path)?;
        apply_file(&mut cli, &matches, file);
    }
    match cli.command {
        Some(Command::Client(cmd)) => client(&cli.state_dir, cmd),
        Some(Command::Status { json }) => status(&cli.state_dir, json),
        None => serve(cli.state_dir, cli.gateway),
    }
}

fn client(state_dir: &std::path::Path, cmd: ClientCommand) -> Result<()> {
    let state = StateDir::open(state_dir)
        .with_context(|| format!("opening the state directory {}", state_dir.display()))?;
    match cmd {
        ClientCommand::Add {
            name,
            out,
            qr,
            qr_png,
            endpoint,
            force,
        } => {
            // Opened first: a refused --out (or --qr-png) issues nothing.
            let existing = if force {
                Existing::Replace
            } else {
                Existing::Refuse
            };
            let file = out
                .as_ref()
                .map(|out| PrivateFile::create(out, existing).context("writing the profile"))
                .transpose()?;
            let png_file = qr_png
                .as_ref()
                .map(|path| PrivateFile::create(path, existing).context("writing the QR code"))
                .transpose()?;
            let profile = state.add_client(&name, &endpoint)?;
            // Rendered before anything is written: a profile too large for
            // a code fails whole.
            let code = (qr || png_file.is_some())
                .then(|| veil_user::qr::code(&profile))
                .transpose()?;
            if let (Some(file), Some(out)) = (file, &out) {
                file.commit(profile.to_toml().as_bytes())
                    .context("writing the profile")?;
                println!(
                    "client `{name}` added; profile for {} written to {}",
                    profile.endpoints.join(", "),
                    out.display()
                );
            } else {
                println!(
                    "client `{name}` added; profile for {}",
                    profile.endpoints.join(", ")
                );
            }
            if let (Some(file), Some(code), Some(path)) = (png_file, &code, &qr_png) {
                file.commit(&veil_user::qr::png(code)?)
                    .context("writing the QR code")?;
                println!("QR code written to {}", path.display());
            }
            if let (true, Some(code)) = (qr, &code) {
                println!("{}", veil_user::qr::terminal(code));
                println!("(the QR code holds the client's key: veil-client reads the scanned text as a profile)");
            }
        }
        ClientCommand::List => {
            let leases = state.leases()?;
            println!(
                "{:<24} {:<16} {:<10} fingerprint",
                "name", "address", "state"
            );
            let found = state.client_records()?;
            for bad in &found.unreadable {
                eprintln!("warning: {bad}");
            }
            for c in found.records {
                let addr = leases.get(&c.name).map_or("-".into(), |a| a.to_string());
                let status = if c.revoked.is_some() {
                    "revoked"
                } else {
                    "active"
                };
                println!(
                    "{:<24} {:<16} {:<10} {}",
                    c.name,
                    addr,
                    status,
                    c.fingerprint.get(..16).unwrap_or(&c.fingerprint)
                );
            }
        }
        ClientCommand::Revoke { name } => {
            state.revoke(&name)?;
            println!(
                "client `{name}` revoked; a running gateway closes its session within seconds"
            );
        }
    }
    Ok(())
}

fn status(state_dir: &std::path::Path, json: bool) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let status = runtime.block_on(veil_user::control::query(state_dir))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(());
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    println!("clients: {}", status.clients.len());
    for c in &status.clients {
        let since = ago(now.saturating_sub(c.connected_since));
        println!(
            "  {:<16} {:<15} tunnel from {:<21} up {since:>6}  {} B from it, {} B to it",
            c.name, c.vip, c.peer, c.bytes_from_client, c.bytes_to_client
        );
    }
    let f = &status.flows;
    println!(
        "flows: {} (tcp {}, udp {}, icmp {}); NAT ports {}: {} in use",
        f.total, f.tcp, f.udp, f.icmp, f.nat_ports, f.nat_ports_in_use
    );
    if let Some(o) = &f.oldest {
        println!("  oldest   {}  ({} old)", o.flow, ago(o.age_secs));
    }
    for b in &f.busiest {
        println!(
            "  busiest  {}  ({} packets, {} B)",
            b.flow, b.packets, b.bytes
        );
    }
    if !status.refused.is_empty() {
        println!("refused connections:");
        for (cause, n) in &status.refused {
            println!("  {cause:<24} {n:>12}");
        }
    }
    println!("datapath (packets by reason):");
    for (reason, c) in &status.datapath {
        if c.packets > 0 {
            println!(
                "  {reason:<24} {:>12} packets {:>14} bytes",
                c.packets, c.bytes
            );
        }
    }
    let dropped: Vec<_> = status.counters.iter().filter(|(_, n)| **n > 0).collect();
    if !dropped.is_empty() {
        println!("gateway (client packets dropped or refused):");
        for (name, n) in dropped {
            println!("  {name:<24} {n:>12}");
        }
    }
    Ok(())
}

/// `95s` -> `1m35s`.
fn ago(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

fn serve(state_dir: PathBuf, args: GatewayArgs) -> Result<()> {
    let iface = args
        .iface
        .context("--iface is required to run the gateway: the WAN interface, e.g. --iface eth0 (or `iface = \"eth0\"` in the --config file)")?;
    veil_user::preflight::listeners(args.listen, args.metrics, args.nat_ports)?;
    let config = GatewayConfig {
        iface,
        listen: args.listen,
        endpoint: args.endpoint,
        public_addrs: args.public_addr,
        state_dir,
        pool: args.pool,
        nat_ports: args.nat_ports,
        tun_name: args.tun,
        pin_root: args.pin_dir,
        max_clients: args.max_clients,
        max_flows: args.max_flows,
        max_flows_per_client: args.max_flows_per_client,
        max_ports_per_endpoint: args.max_ports_per_endpoint,
        grace: Duration::from_secs(args.grace),
        allow: args.allow,
        deny: args.deny,
        client_to_client: args.allow_client_to_client,
        timeouts: Timeouts {
            tcp_established: Duration::from_secs(args.timeout_tcp_established),
            tcp_transitory: Duration::from_secs(args.timeout_tcp_transitory),
            udp: Duration::from_secs(args.timeout_udp),
            udp_dns: Duration::from_secs(args.timeout_udp_dns),
            icmp: Duration::from_secs(args.timeout_icmp),
        },
        metrics: args.metrics,
        client_buffer: args.client_buffer.0,
        max_handshakes: args.max_handshakes,
        max_handshakes_per_source: args.max_handshakes_per_source,
        dns: args.dns,
    };
    let threads = args.threads.map(usize::from).unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get)
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let shutdown = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("installing a SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => info!("SIGINT: shutting down"),
                _ = term.recv() => info!("SIGTERM: shutting down"),
            }
        };
        gateway::run(config, shutdown).await
    })
}
