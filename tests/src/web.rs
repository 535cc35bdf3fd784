//! A real web server (Debian's nginx or Caddy) in front of the gateway, as
//! a website that proxies one path to veil's WebSocket listener: TLS on its
//! own port with a certificate of its own CA, a static page at `/`. It runs
//! as one process started by PID, with its configuration, logs and other
//! files in a directory of its own (removed with the world's). The
//! configurations are those of docs/operations.md, bar the paths.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

use crate::{netns::NetNs, proc::Proc};

/// What the static page says.
pub const PAGE: &str = "<h1>An ordinary website</h1>\n";

/// Which web server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Server {
    Nginx,
    Caddy,
}

pub struct Website {
    pub server: Server,
    pub dir: PathBuf,
    /// The CA that signed the website's certificate (PEM file).
    pub ca: PathBuf,
    proc: Proc,
}

/// Where the web server listens and what it proxies.
pub struct Site<'a> {
    /// The website's name: its certificate's, and `server_name`.
    pub name: &'a str,
    /// `ADDR:PORT` of its TLS listener.
    pub listen: &'a str,
    /// The path proxied to `upstream` as WebSocket upgrades.
    pub ws_path: &'a str,
    /// `ADDR:PORT` of veil's `--ws-listen`.
    pub upstream: &'a str,
}

impl Website {
    /// Starts `server` in `ns` with its files under `dir`; returns once it
    /// serves.
    pub fn start(server: Server, ns: &NetNs, dir: &Path, site: &Site) -> Self {
        fs::create_dir_all(dir.join("www")).unwrap();
        fs::create_dir_all(dir.join("tmp")).unwrap();
        fs::write(dir.join("www/index.html"), PAGE).unwrap();
        let (ca, cert, key) = certificates(site.name, site.listen);
        let ca_path = dir.join("ca.crt");
        fs::write(&ca_path, ca).unwrap();
        fs::write(dir.join("site.crt"), cert).unwrap();
        fs::write(dir.join("site.key"), key).unwrap();
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/var/run/netns/{}", ns.name()));
        match server {
            Server::Nginx => {
                let conf = dir.join("nginx.conf");
                fs::write(&conf, nginx_config(dir, site)).unwrap();
                cmd.arg("nginx")
                    .arg("-p")
                    .arg(dir)
                    .arg("-c")
                    .arg(&conf)
                    // The error log before the configuration is read: not
                    // Debian's.
                    .arg("-e")
                    .arg(dir.join("error.log"));
            }
            Server::Caddy => {
                let conf = dir.join("Caddyfile");
                fs::write(&conf, caddy_config(dir, site)).unwrap();
                cmd.args(["caddy", "run", "--adapter", "caddyfile", "--config"])
                    .arg(&conf)
                    // Its data and autosaved configuration: here, not in
                    // root's home.
                    .env("XDG_DATA_HOME", dir.join("data"))
                    .env("XDG_CONFIG_HOME", dir.join("config"));
            }
        }
        let name = format!("{server:?}").to_lowercase();
        let mut proc = Proc::start(&name, cmd, dir.join("stderr.log"));
        // Up once its listener takes connections.
        let listen: std::net::SocketAddr = site.listen.parse().unwrap();
        let up = ns.enter(|| {
            (0..100).any(|_| {
                let ok = std::net::TcpStream::connect_timeout(&listen, Duration::from_millis(100))
                    .is_ok();
                if !ok {
                    std::thread::sleep(Duration::from_millis(50));
                }
                ok
            })
        });
        assert!(
            up && proc.is_running(),
            "{name} did not start:\n{}\n{}",
            proc.log(),
            fs::read_to_string(dir.join("error.log")).unwrap_or_default()
        );
        Website {
            server,
            dir: dir.to_owned(),
            ca: ca_path,
            proc,
        }
    }

    /// Issues client `name` a profile for `url` (`wss://…`) that pins
    /// this website's CA; its path.
    pub fn profile(&self, world: &crate::world::World, name: &str, url: &str) -> PathBuf {
        world.add_client_at(name, url, &["--endpoint-ca", self.ca.to_str().unwrap()])
    }

    pub fn access_log(&self) -> String {
        fs::read_to_string(self.dir.join("access.log")).unwrap_or_default()
    }

    /// Whether the access log shows a WebSocket upgrade on `path` (the
    /// `101` of a relayed WebSocket is logged when it ends).
    pub fn logged_upgrade(&self, path: &str) -> bool {
        let log = self.access_log();
        match self.server {
            Server::Nginx => log.contains(&format!("\"GET {path} HTTP/1.1\" 101")),
            // One JSON object a line; Caddy 2.6 logs a hijacked
            // connection's status as 0, the 101's headers as sent.
            Server::Caddy => log.lines().any(|l| {
                l.contains(&format!("\"uri\":\"{path}\"")) && l.contains("\"Sec-Websocket-Accept\"")
            }),
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.proc.is_running()
    }
}

impl Drop for Website {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- web server error log ----\n{}\n---- web server access log ----\n{}",
                fs::read_to_string(self.dir.join("error.log")).unwrap_or_default(),
                self.access_log()
            );
        }
        // `proc` stops it by PID when dropped.
    }
}

/// One process (no master and workers: one PID to stop), everything under
/// `dir`, the WebSocket path proxied as the nginx documentation has it.
fn nginx_config(dir: &Path, site: &Site) -> String {
    let d = dir.display();
    format!(
        r#"daemon off;
master_process off;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    types {{ text/html html; }}
    server {{
        listen {listen} ssl;
        server_name {name};
        ssl_certificate {d}/site.crt;
        ssl_certificate_key {d}/site.key;
        ssl_protocols TLSv1.2 TLSv1.3;
        root {d}/www;
        location / {{ index index.html; }}
        location = {ws_path} {{
            proxy_pass http://{upstream};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_read_timeout 1h;
            proxy_send_timeout 1h;
            proxy_buffering off;
        }}
    }}
}}
"#,
        listen = site.listen,
        name = site.name,
        ws_path = site.ws_path,
        upstream = site.upstream,
    )
}

/// The documented Caddyfile: no admin endpoint, no port 80 for redirects,
/// the certificate given (no ACME), everything under `dir`.
fn caddy_config(dir: &Path, site: &Site) -> String {
    let d = dir.display();
    let (addr, port) = site.listen.rsplit_once(':').unwrap();
    format!(
        r#"{{
	admin off
	auto_https disable_redirects
	skip_install_trust
}}
https://{name}:{port} {{
	bind {addr}
	tls {d}/site.crt {d}/site.key
	log {{
		output file {d}/access.log
	}}
	handle {ws_path} {{
		reverse_proxy {upstream} {{
			flush_interval -1
		}}
	}}
	handle {{
		root * {d}/www
		file_server
	}}
}}
"#,
        name = site.name,
        ws_path = site.ws_path,
        upstream = site.upstream,
    )
}

/// A CA of the website's own and its certificate for `name` (and the
/// listener's address): CA PEM, certificate PEM, key PEM.
fn certificates(name: &str, listen: &str) -> (String, String, String) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::default();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "test website CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    let ca = ca_params.clone().self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, &ca_key);
    let key = KeyPair::generate().unwrap();
    let ip = listen.rsplit_once(':').unwrap().0.to_owned();
    let params = CertificateParams::new(vec![name.to_owned(), ip]).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    (ca.pem(), cert.pem(), key.serialize_pem())
}
