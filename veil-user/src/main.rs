//! `veil-user`: the veil gateway daemon, and the commands that manage its
//! clients.
//!
//! ```text
//! sudo veil-user --iface eth0                      # run the gateway
//! sudo veil-user client add alice --out alice.veil # issue a client profile
//! sudo veil-user client list
//! sudo veil-user client revoke alice
//! ```

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use tracing::info;
use veil_user::{
    flows::{PortRange, Timeouts},
    gateway::{self, GatewayConfig},
    net::Ipv4Net,
    state::StateDir,
};

#[derive(Parser)]
#[command(
    version,
    about = "veil gateway: anonymizing egress through an in-kernel NAT"
)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
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
    /// Issue a profile: one file with everything a client needs.
    Add {
        name: String,
        /// Where to write the profile (mode 0600).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// The gateway address clients connect to; default: the one the
        /// gateway serves on, as recorded in the state directory.
        #[arg(long, value_name = "HOST:PORT")]
        endpoint: Option<String>,
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
    /// The public address (default: the interface's first IPv4 address).
    #[arg(long, value_name = "IP")]
    public_addr: Option<std::net::Ipv4Addr>,
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
    /// Most flows at once.
    #[arg(long, default_value_t = veil_common::MAX_FLOWS as usize)]
    max_flows: usize,
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
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
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
            endpoint,
        } => {
            let profile = state.add_client(&name, endpoint.as_deref())?;
            write_private(&out, &profile.to_toml())
                .with_context(|| format!("writing {}", out.display()))?;
            println!(
                "client `{name}` added; profile for {} written to {}",
                profile.endpoint,
                out.display()
            );
        }
        ClientCommand::List => {
            let leases = state.leases()?;
            println!(
                "{:<24} {:<16} {:<10} fingerprint",
                "name", "address", "state"
            );
            for c in state.clients()? {
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
                    &c.fingerprint[..16]
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
    println!("clients: {}", status.clients.len());
    for c in &status.clients {
        println!(
            "  {:<20} {:<15} from {:<21} {} B in, {} B out",
            c.name, c.vip, c.peer, c.bytes_from_client, c.bytes_to_client
        );
    }
    let f = &status.flows;
    println!(
        "flows: {} (tcp {}, udp {}, icmp {})",
        f.total, f.tcp, f.udp, f.icmp
    );
    println!("datapath:");
    for (reason, c) in &status.datapath {
        if c.packets > 0 {
            println!(
                "  {reason:<24} {:>12} packets {:>14} bytes",
                c.packets, c.bytes
            );
        }
    }
    println!("gateway:");
    for (name, n) in &status.counters {
        if *n > 0 {
            println!("  {name:<24} {n:>12}");
        }
    }
    Ok(())
}

fn write_private(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())
}

fn serve(state_dir: PathBuf, args: GatewayArgs) -> Result<()> {
    let iface = args
        .iface
        .context("--iface is required to run the gateway (the WAN interface, e.g. --iface eth0)")?;
    let config = GatewayConfig {
        iface,
        listen: args.listen,
        endpoint: args.endpoint,
        public_addr: args.public_addr,
        state_dir,
        pool: args.pool,
        nat_ports: args.nat_ports,
        tun_name: args.tun,
        pin_root: args.pin_dir,
        max_clients: args.max_clients,
        max_flows: args.max_flows,
        grace: Duration::from_secs(args.grace),
        allow: args.allow,
        deny: args.deny,
        client_to_client: args.allow_client_to_client,
        timeouts: Timeouts::default(),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
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
