//! The system's resolver while connected: pointed at the one the gateway
//! announces (DNS_ASSIGN), reachable only through the tunnel, so names
//! are never asked of the local network; put back as it was on exit.
//!
//! Two ways, chosen by what manages `/etc/resolv.conf`:
//!
//! - **systemd-resolved** (running, and `/etc/resolv.conf` points at its
//!   stub): `resolvectl` gives the TUN link the resolver and the routing
//!   domain `~.` (every name) and makes it the default route for DNS.
//!   resolved forgets the link when the TUN device goes, crash or not.
//! - **the file** otherwise: `/etc/resolv.conf` is replaced by ours and
//!   put back byte for byte on exit. A regular file is rewritten in place
//!   (same inode, owner and mode; it may be a bind mount, as in a
//!   container or under `ip netns exec`, which cannot be renamed over); a
//!   symlink is replaced by a file and the same symlink put back; a
//!   missing file is removed again.
//!
//! **Crashes.** The original is kept *inside* the file we write, as
//! comment lines (`# veil-original ...`, hex), not in a file beside it: a
//! bind-mounted `/etc/resolv.conf` shares its directory with other
//! namespaces, where a stray backup could be restored into the wrong one;
//! the copy inside travels with the file it belongs to. The next start of
//! `veil-client` (with or without `--no-dns`) finds our marker and puts the
//! original back before anything else. If something else (a DHCP client,
//! NetworkManager) rewrote the file while we were connected, their version
//! is left alone.

use std::{
    fs,
    io::{self, Write},
    net::Ipv4Addr,
    os::unix::fs::{symlink, OpenOptionsExt},
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use tracing::{info, warn};
use veil_proto::capsule::DnsConfiguration;

use crate::{routes::ip, rules::TABLE};

/// The first line of every `resolv.conf` we write.
const MARKER: &str = "# veil-client: this machine's resolver while the tunnel is up";
/// Lines carrying the original, hex-encoded.
const ORIGINAL: &str = "# veil-original ";
/// glibc reads at most three nameservers.
const MAX_NAMESERVERS: usize = 3;
/// glibc's limit on search domains.
const MAX_SEARCH: usize = 6;
/// A resolv.conf larger than this is not something we replace.
const MAX_ORIGINAL: usize = 64 * 1024;
/// resolved's stub resolver.
const RESOLVED_STUB: &str = "127.0.0.53";
/// Present while systemd-resolved runs.
const RESOLVED_SOCKET: &str = "/run/systemd/resolve/io.systemd.Resolve";

/// What to configure, from the gateway's announcement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Plain-DNS resolvers on port 53, IPv4 (the tunnel carries IPv4).
    pub servers: Vec<Ipv4Addr>,
    /// Search domains, in order.
    pub search: Vec<String>,
    /// Domains the resolvers are for: empty means every name.
    pub domains: Vec<String>,
}

impl Plan {
    /// What we can apply of the gateway's configurations: the plain-DNS
    /// IPv4 resolvers on port 53, lowest priority value first. `None` when
    /// there is none (an empty DNS_ASSIGN withdraws the configuration).
    pub fn from_announcement(configs: &[DnsConfiguration]) -> Option<Plan> {
        let mut nameservers: Vec<_> = configs
            .iter()
            .flat_map(|c| &c.nameservers)
            .filter(|ns| ns.plain_dns() && ns.port() == 53)
            .collect();
        nameservers.sort_by_key(|ns| ns.priority);
        let mut servers: Vec<Ipv4Addr> = Vec::new();
        for addr in nameservers.iter().flat_map(|ns| &ns.ipv4) {
            if !servers.contains(addr) {
                servers.push(*addr);
            }
        }
        if servers.is_empty() {
            return None;
        }
        let mut search = Vec::new();
        let mut domains = Vec::new();
        let mut everything = false;
        for c in configs {
            for d in &c.search_domains {
                let d = d.as_str().trim_end_matches('.').to_owned();
                if !d.is_empty() && !search.contains(&d) {
                    search.push(d);
                }
            }
            for d in &c.internal_domains {
                if d.is_root() {
                    everything = true;
                } else {
                    domains.push(d.as_str().trim_end_matches('.').to_owned());
                }
            }
        }
        // A configuration naming no domain at all is taken as for every
        // name: that is what a plain VPN's resolver is.
        if everything || domains.is_empty() {
            domains.clear();
        }
        Some(Plan {
            servers,
            search,
            domains,
        })
    }

    /// The `resolv.conf` we write: our resolvers, then the original, kept
    /// as comments so that a crash loses nothing.
    pub fn resolv_conf(&self, original: &Original) -> String {
        let mut text = format!(
            "{MARKER}\n# (veil-client puts the original back when it exits, or when it next starts)\n"
        );
        for s in self.servers.iter().take(MAX_NAMESERVERS) {
            text.push_str(&format!("nameserver {s}\n"));
        }
        if !self.search.is_empty() {
            let search: Vec<&str> = self
                .search
                .iter()
                .take(MAX_SEARCH)
                .map(String::as_str)
                .collect();
            text.push_str(&format!("search {}\n", search.join(" ")));
        }
        text.push_str(&original.to_comments());
        text
    }
}

/// What `/etc/resolv.conf` was before we wrote ours.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Original {
    /// A file (perhaps a bind mount) with these bytes.
    File(Vec<u8>),
    /// A symlink to this target.
    Symlink(PathBuf),
    /// Nothing.
    Absent,
}

impl Original {
    fn to_comments(&self) -> String {
        let (kind, bytes): (&str, &[u8]) = match self {
            Original::File(b) => ("file", b),
            Original::Symlink(t) => ("symlink", t.as_os_str().as_encoded_bytes()),
            Original::Absent => ("absent", b""),
        };
        let mut text = format!("{ORIGINAL}{kind}\n");
        for chunk in bytes.chunks(48) {
            text.push_str(ORIGINAL);
            text.push_str(&hex(chunk));
            text.push('\n');
        }
        text
    }

    /// The original kept in a file we wrote; `None` if `text` is not one
    /// of ours (or its copy is damaged: then it is left alone).
    pub fn from_ours(text: &[u8]) -> Option<Original> {
        let text = std::str::from_utf8(text).ok()?;
        if !text.starts_with(MARKER) {
            return None;
        }
        let mut lines = text.lines().filter_map(|l| l.strip_prefix(ORIGINAL));
        let kind = lines.next()?;
        let mut bytes = Vec::new();
        for line in lines {
            bytes.extend(unhex(line.trim())?);
        }
        Some(match kind {
            "file" => Original::File(bytes),
            "symlink" => Original::Symlink(PathBuf::from(String::from_utf8(bytes).ok()?)),
            "absent" if bytes.is_empty() => Original::Absent,
            _ => return None,
        })
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Whether systemd-resolved answers for this `resolv.conf`: a symlink into
/// its directory, or a file naming its stub.
pub fn managed_by_resolved(link_target: Option<&Path>, content: &str) -> bool {
    link_target.is_some_and(|t| t.starts_with("/run/systemd/resolve"))
        || content.lines().any(|l| {
            let mut w = l.split_whitespace();
            w.next() == Some("nameserver") && w.next() == Some(RESOLVED_STUB)
        })
}

/// The system's resolver, pointed at the gateway's until dropped.
pub struct SystemDns {
    tun: String,
    how: How,
    /// The host route that keeps the resolver inside the tunnel.
    route: Option<Ipv4Addr>,
    plan: Plan,
}

enum How {
    Resolved,
    File { path: PathBuf, written: Vec<u8> },
}

impl SystemDns {
    /// Points the system at the resolvers of `plan`, reached through `tun`.
    pub fn apply(tun: &str, plan: Plan) -> Result<Self> {
        let path = PathBuf::from("/etc/resolv.conf");
        let target = fs::read_link(&path).ok();
        let content = fs::read_to_string(&path).unwrap_or_default();
        let resolved = managed_by_resolved(target.as_deref(), &content)
            && Path::new(RESOLVED_SOCKET).exists()
            && resolvectl(&["--version"]).is_ok();
        // The resolver is the gateway's address in the pool: routed into
        // the tunnel even when only some ranges are (--route), in the
        // tunnel's own table like every route into it (see `rules`).
        let route = plan.servers.first().copied();
        if let Some(server) = route {
            ip(&[
                "route",
                "replace",
                &format!("{server}/32"),
                "dev",
                tun,
                "table",
                &TABLE.to_string(),
            ])?;
        }
        let mut dns = SystemDns {
            tun: tun.to_owned(),
            how: How::Resolved,
            route,
            plan: plan.clone(),
        };
        if resolved {
            let mut args = vec!["dns", tun];
            let servers: Vec<String> = plan.servers.iter().map(|s| s.to_string()).collect();
            args.extend(servers.iter().map(String::as_str));
            resolvectl(&args)?;
            // `~.`: every name goes to this link's resolver, not only
            // those under its search domains.
            let mut domains: Vec<String> = if plan.domains.is_empty() {
                vec!["~.".to_owned()]
            } else {
                plan.domains.iter().map(|d| format!("~{d}")).collect()
            };
            domains.extend(plan.search.iter().cloned());
            let mut args = vec!["domain", tun];
            args.extend(domains.iter().map(String::as_str));
            resolvectl(&args)?;
            resolvectl(&["default-route", tun, "true"])?;
            info!(tun, "DNS through the tunnel (systemd-resolved)");
        } else {
            let (written, path) = replace_file(&path, &plan)?;
            dns.how = How::File { path, written };
            info!("DNS through the tunnel (/etc/resolv.conf replaced until exit)");
        }
        Ok(dns)
    }

    /// The plan in force.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }
}

/// Writes ours over `path`, keeping the original inside it.
fn replace_file(path: &Path, plan: &Plan) -> Result<(Vec<u8>, PathBuf)> {
    let original = match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => Original::Symlink(fs::read_link(path)?),
        Ok(m) if m.len() > MAX_ORIGINAL as u64 => {
            bail!(
                "{} is over {MAX_ORIGINAL} bytes: not replaced",
                path.display()
            )
        }
        Ok(_) => Original::File(fs::read(path)?),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Original::Absent,
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    if let Original::File(bytes) = &original {
        if Original::from_ours(bytes).is_some() {
            bail!("{} is still ours from an earlier run", path.display());
        }
    }
    let text = plan.resolv_conf(&original).into_bytes();
    match original {
        Original::File(_) => write_in_place(path, &text)?,
        // A symlink is replaced, never followed: its target is someone
        // else's file (resolved's, or NetworkManager's).
        Original::Symlink(_) | Original::Absent => write_new(path, &text)?,
    }
    Ok((text, path.to_owned()))
}

/// Rewrites an existing file's bytes, keeping its inode (and so its owner,
/// mode, and any bind mount on it).
fn write_in_place(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

/// A new 0644 file at `path`, written beside it and renamed over whatever
/// is there (a symlink is replaced, not followed).
fn write_new(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("veil-{}.tmp", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))
}

/// Puts `original` back at `path`.
fn restore(path: &Path, original: &Original) -> Result<()> {
    match original {
        Original::File(bytes) => {
            // Ours is a file: written in place, the original comes back
            // into the same inode; it was a file before too.
            write_in_place(path, bytes)
        }
        Original::Symlink(target) => {
            let tmp = path.with_extension(format!("veil-{}.link", std::process::id()));
            let _ = fs::remove_file(&tmp);
            symlink(target, &tmp).with_context(|| format!("creating {}", tmp.display()))?;
            fs::rename(&tmp, path).with_context(|| format!("restoring {}", path.display()))
        }
        Original::Absent => match fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("removing {}", path.display()))
            }
            _ => Ok(()),
        },
    }
}

/// At start: a `resolv.conf` left by a run that did not exit cleanly
/// (killed, crashed, power lost) is put back as it was.
pub fn recover() {
    let path = Path::new("/etc/resolv.conf");
    let Ok(bytes) = fs::read(path) else { return };
    if fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
        return;
    }
    if let Some(original) = Original::from_ours(&bytes) {
        match restore(path, &original) {
            Ok(()) => warn!("/etc/resolv.conf was left by an earlier veil-client run that did not exit cleanly: restored"),
            Err(e) => warn!("restoring /etc/resolv.conf left by an earlier run: {e:#}"),
        }
    }
}

impl Drop for SystemDns {
    fn drop(&mut self) {
        match &self.how {
            How::Resolved => {
                if let Err(e) = resolvectl(&["revert", &self.tun]) {
                    warn!("reverting the DNS settings of {}: {e:#}", self.tun);
                }
            }
            How::File { path, written } => {
                let now = fs::read(path).unwrap_or_default();
                if &now != written {
                    warn!(
                        "{} changed while connected (by something else): left as it is now",
                        path.display()
                    );
                } else if let Some(original) = Original::from_ours(written) {
                    match restore(path, &original) {
                        Ok(()) => info!("{} restored", path.display()),
                        Err(e) => warn!("restoring {}: {e:#}", path.display()),
                    }
                }
            }
        }
        if let Some(server) = self.route {
            let _ = ip(&[
                "route",
                "del",
                &format!("{server}/32"),
                "dev",
                &self.tun,
                "table",
                &TABLE.to_string(),
            ]);
        }
    }
}

fn resolvectl(args: &[&str]) -> Result<()> {
    crate::routes::command("resolvectl", args)
}

#[cfg(test)]
mod tests {
    use veil_proto::capsule::{DomainName, Nameserver, SvcParam};

    use super::*;

    fn gateway() -> Vec<DnsConfiguration> {
        vec![DnsConfiguration::full_tunnel(vec![Ipv4Addr::new(
            10, 77, 0, 1,
        )])]
    }

    #[test]
    fn the_gateways_resolver_for_every_name() {
        let plan = Plan::from_announcement(&gateway()).unwrap();
        assert_eq!(plan.servers, [Ipv4Addr::new(10, 77, 0, 1)]);
        assert!(plan.domains.is_empty() && plan.search.is_empty());
        assert_eq!(Plan::from_announcement(&[]), None, "withdrawn");
    }

    #[test]
    fn only_plain_dns_on_port_53_is_used_best_priority_first() {
        let mut configs = gateway();
        configs[0].nameservers[0].priority = 5;
        configs[0].nameservers.push(Nameserver {
            priority: 1,
            ipv4: vec![Ipv4Addr::new(192, 0, 2, 9)],
            ipv6: vec![],
            auth_domain: DomainName::new("dns.example").unwrap(),
            params: vec![SvcParam {
                key: veil_proto::capsule::svc_key::NO_DEFAULT_ALPN,
                value: vec![],
            }],
        });
        let mut port = Nameserver::plain(1, vec![Ipv4Addr::new(192, 0, 2, 10)]);
        port.params.push(SvcParam {
            key: veil_proto::capsule::svc_key::PORT,
            value: 5353u16.to_be_bytes().to_vec(),
        });
        configs[0].nameservers.push(port);
        configs[0]
            .nameservers
            .push(Nameserver::plain(2, vec![Ipv4Addr::new(10, 77, 0, 9)]));
        configs[0].search_domains = vec![DomainName::new("corp.example.").unwrap()];
        let plan = Plan::from_announcement(&configs).unwrap();
        assert_eq!(
            plan.servers,
            [Ipv4Addr::new(10, 77, 0, 9), Ipv4Addr::new(10, 77, 0, 1)]
        );
        assert_eq!(plan.search, ["corp.example"]);
    }

    #[test]
    fn our_file_carries_the_original_byte_for_byte() {
        let plan = Plan::from_announcement(&gateway()).unwrap();
        for original in [
            Original::File(b"nameserver 10.200.1.53\n# \xff odd bytes\n".to_vec()),
            Original::File(Vec::new()),
            Original::File(vec![b'x'; 5000]),
            Original::Symlink("/run/systemd/resolve/stub-resolv.conf".into()),
            Original::Absent,
        ] {
            let text = plan.resolv_conf(&original);
            assert!(text.starts_with(MARKER));
            assert!(text.contains("\nnameserver 10.77.0.1\n"));
            assert_eq!(Original::from_ours(text.as_bytes()), Some(original));
        }
        assert_eq!(Original::from_ours(b"nameserver 1.1.1.1\n"), None);
        let damaged = format!("{MARKER}\n{ORIGINAL}file\n{ORIGINAL}zz\n");
        assert_eq!(Original::from_ours(damaged.as_bytes()), None);
    }

    #[test]
    fn resolved_is_recognised_by_its_stub() {
        assert!(managed_by_resolved(
            Some(Path::new("/run/systemd/resolve/stub-resolv.conf")),
            ""
        ));
        assert!(managed_by_resolved(
            None,
            "# x\nnameserver 127.0.0.53\noptions edns0\n"
        ));
        assert!(!managed_by_resolved(None, "nameserver 10.200.1.53\n"));
        assert!(!managed_by_resolved(
            Some(Path::new("/etc/netns/x/resolv.conf")),
            "nameserver 192.0.2.1\n"
        ));
    }

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("veil-dns-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_file_is_rewritten_in_place_and_restored_exactly() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = temp("file");
        let path = dir.join("resolv.conf");
        let before = b"# local\nnameserver 10.200.1.53\nsearch lan\n".to_vec();
        fs::write(&path, &before).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        let ino = fs::metadata(&path).unwrap().ino();
        let plan = Plan::from_announcement(&gateway()).unwrap();
        let (written, _) = replace_file(&path, &plan).unwrap();
        assert_eq!(fs::read(&path).unwrap(), written);
        assert_eq!(fs::metadata(&path).unwrap().ino(), ino, "same inode");
        assert!(replace_file(&path, &plan).is_err(), "never stacked");
        restore(&path, &Original::from_ours(&written).unwrap()).unwrap();
        assert_eq!(fs::read(&path).unwrap(), before);
        let meta = fs::metadata(&path).unwrap();
        assert_eq!((meta.ino(), meta.mode() & 0o777), (ino, 0o640));
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_symlink_comes_back_as_the_same_symlink() {
        let dir = temp("link");
        let target = dir.join("stub-resolv.conf");
        fs::write(&target, "nameserver 127.0.0.53\n").unwrap();
        let path = dir.join("resolv.conf");
        symlink(&target, &path).unwrap();
        let plan = Plan::from_announcement(&gateway()).unwrap();
        let (written, _) = replace_file(&path, &plan).unwrap();
        assert!(fs::symlink_metadata(&path).unwrap().is_file());
        assert_eq!(
            fs::read_to_string(&target).unwrap(),
            "nameserver 127.0.0.53\n",
            "the target is not touched"
        );
        restore(&path, &Original::from_ours(&written).unwrap()).unwrap();
        assert_eq!(fs::read_link(&path).unwrap(), target);
        // And a file that was not there is removed again.
        let absent = dir.join("absent.conf");
        let (written, _) = replace_file(&absent, &plan).unwrap();
        restore(&absent, &Original::from_ours(&written).unwrap()).unwrap();
        assert!(fs::symlink_metadata(&absent).is_err());
        fs::remove_dir_all(dir).unwrap();
    }
}
