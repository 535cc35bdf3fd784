//! `veil-user`: the veil gateway daemon, and the commands that manage its
//! clients.
//!
//! ```text
//! sudo veil-user --iface eth0                      # run the gateway
//! sudo veil-user client add alice --out alice.veil # issue a client profile
//! sudo veil-user client list
//! sudo veil-user client revoke alice
//! ```

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{parser::ValueSource, CommandFactory, FromArgMatches, Parser, Subcommand};
use tracing::info;
use veil_user::{
    gateway::{self, GatewayConfig},
    settings::Settings,
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
    gateway: Settings,
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
        /// Also show each client's public address and the busiest flows'
        /// destinations (left out by default: see docs/operations.md,
        /// "Logging policy").
        #[arg(long)]
        addresses: bool,
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
        /// the state directory. `wss://HOST[:PORT]/PATH`: through the web
        /// server at HOST that proxies PATH to --ws-listen.
        #[arg(long, value_name = "HOST:PORT|URL", value_parser = endpoint)]
        endpoint: Vec<String>,
        /// The CA certificate (PEM) that the web server's certificate for
        /// wss:// endpoints is checked against, for a self-signed set-up;
        /// default: the client system's roots.
        #[arg(long, value_name = "FILE")]
        endpoint_ca: Option<PathBuf>,
        /// Let the client also accept the gateway's certificate (--cert)
        /// through the system's root CAs, so that a renewal with a new key
        /// (ACME) keeps it connecting; the key is pinned either way.
        #[arg(long)]
        system_roots: bool,
    },
    /// List issued clients.
    List,
    /// Set a client's own rate limit and quota, over the gateway's
    /// --rate-limit and --quota (a running gateway applies them within a
    /// second).
    Limit {
        name: String,
        /// Its rate each way (50mbit, 1gbit), or `none`: exempt from
        /// --rate-limit; leave out to follow the gateway's.
        #[arg(long, value_name = "RATE|none")]
        rate: Option<veil_user::ratelimit::Limit<veil_user::ratelimit::Rate>>,
        /// Its bytes per quota period (10GiB), or `none`; leave out to
        /// follow the gateway's.
        #[arg(long, value_name = "SIZE|none")]
        quota: Option<veil_user::ratelimit::Limit<veil_user::size::ByteSize>>,
    },
    /// Revoke a client: refused from its next handshake on, its live
    /// session closed.
    Revoke { name: String },
    /// Write the revocation list again (`revocations.crl` in the state
    /// directory, signed by the CA): a fresh list for gateways started with
    /// `--revocations` before any revocation, or one past its next update.
    Revocations,
}

fn main() -> Result<()> {
    veil_user::init_logging();
    let matches = Cli::command().get_matches();
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if let Some(path) = &cli.config {
        let file = Settings::load(path)?;
        if matches.value_source("state_dir") != Some(ValueSource::CommandLine) {
            if let Some(dir) = &file.state_dir {
                cli.state_dir = dir.clone();
            }
        }
        cli.gateway = cli.gateway.or_file(file)?;
    }
    match cli.command {
        Some(Command::Client(cmd)) => client(&cli.state_dir, cmd),
        Some(Command::Status { json, addresses }) => status(&cli.state_dir, json, addresses),
        None => serve(cli.gateway.resolve(cli.state_dir)?),
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
            endpoint_ca,
            force,
            system_roots,
        } => {
            // Read before anything is issued.
            let endpoint_ca = endpoint_ca
                .map(|path| read_endpoint_ca(&path, &endpoint))
                .transpose()?;
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
            let mut profile = state.add_client(&name, &endpoint)?;
            profile.endpoint_ca = endpoint_ca;
            profile.server_trust.system_roots = system_roots;
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
            // This process's first read: every record.
            for c in found.records.unwrap_or_default() {
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
        ClientCommand::Limit { name, rate, quota } => {
            let limits = veil_user::ratelimit::ClientLimits { rate, quota };
            state.set_limits(&name, limits)?;
            let show = |v: Option<String>| v.unwrap_or_else(|| "the gateway's".into());
            println!(
                "client `{name}`: rate {}, quota {}",
                show(rate.map(|r| r.to_string())),
                show(quota.map(|q| q.to_string()))
            );
        }
        ClientCommand::Revoke { name } => {
            let record = state.revoke(&name)?;
            println!(
                "client `{name}` revoked; a running gateway closes its session within seconds"
            );
            if record.serial.is_none() {
                println!("(its profile predates revocation lists: gateways that do not hold this registry are not told; issue profiles again to revoke them everywhere)");
            }
            println!(
                "revocation list written: {} (for gateways run with --revocations)",
                state.revocations_path().display()
            );
        }
        ClientCommand::Revocations => {
            let list = state.write_revocations()?;
            println!(
                "revocation list {} written: {} revoked certificate(s), number {}",
                state.revocations_path().display(),
                list.serials.len(),
                list.number
            );
        }
    }
    Ok(())
}

/// `--endpoint`, checked: `HOST:PORT` or `wss://HOST[:PORT]/PATH`.
fn endpoint(text: &str) -> Result<String, String> {
    veil_tunnel::profile::Endpoint::parse(text).map(|_| text.to_owned())
}

/// `--endpoint-ca`: PEM certificates, for `wss://` endpoints only.
fn read_endpoint_ca(path: &std::path::Path, endpoints: &[String]) -> Result<String> {
    if !endpoints.iter().any(|e| e.starts_with("wss://")) {
        anyhow::bail!(
            "--endpoint-ca is the web server's CA for wss:// endpoints, and no --endpoint is one"
        );
    }
    let pem = std::fs::read_to_string(path)
        .with_context(|| format!("reading the endpoint CA {}", path.display()))?;
    let certs = veil_tunnel::tls::certificates(&pem, "endpoint CA certificate")
        .with_context(|| format!("{}", path.display()))?;
    if certs.is_empty() {
        anyhow::bail!("{} holds no certificate", path.display());
    }
    Ok(pem)
}

fn status(state_dir: &std::path::Path, json: bool, addresses: bool) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let status = runtime.block_on(veil_user::control::query(state_dir, addresses))?;
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
        let from = c
            .peer
            .as_deref()
            .map_or(String::new(), |p| format!("tunnel from {p:<21} "));
        println!(
            "  {:<16} {:<15} {from}up {since:>6}  {} B from it, {} B to it",
            c.name, c.vip, c.bytes_from_client, c.bytes_to_client
        );
        if let Some(vip6) = c.vip6 {
            println!("    IPv6 {vip6}");
        }
        if c.replies_queued > 0 {
            println!("    {} B of replies waiting to be sent", c.replies_queued);
        }
        if let Some(rate) = &c.rate_limit {
            println!(
                "    rate limit {rate} each way: {} packets dropped",
                c.rate_dropped
            );
        }
        if let Some(quota) = c.quota {
            println!(
                "    quota {} of {quota} B used: {} packets dropped",
                c.quota_used, c.quota_dropped
            );
        }
    }
    let f = &status.flows;
    println!(
        "flows: {} (tcp {}, udp {}, icmp {}), ipv6 {}; NAT ports {}: {} in use",
        f.total, f.tcp, f.udp, f.icmp, f.ipv6, f.nat_ports, f.nat_ports_in_use
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
    if !status.forwards.is_empty() || !status.forward_problems.is_empty() {
        println!("forwards: {}", status.forwards.len());
        for f in &status.forwards {
            println!(
                "  {:<10} -> {:<24} {} connections ({} open), {} packets, {} B",
                f.rule, f.target, f.connections, f.open, f.packets, f.bytes
            );
        }
        for p in &status.forward_problems {
            println!("  skipped  {p}");
        }
    }
    match status.gro_stage {
        Some(veil_user::control::StageState::In) => println!("GRO stage: in"),
        Some(veil_user::control::StageState::Lost) => {
            println!("GRO stage: lost (deleted or down): replies reach the TUN device unmerged; restart to make it again")
        }
        None => {}
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

fn serve(config: GatewayConfig) -> Result<()> {
    veil_user::preflight::listeners(config.listen, config.metrics, config.nat_ports)?;
    veil_user::preflight::ws_listener(config.ws_listen, config.nat_ports)?;
    let threads = config.threads.map(usize::from).unwrap_or_else(|| {
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
