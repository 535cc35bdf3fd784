//! A real nginx (Debian's) in front of the gateway, as a website that
//! proxies one path to veil's WebSocket listener: TLS on its own port with
//! a certificate of its own CA, a static page at `/`. It runs as one
//! process started by PID, with its prefix, configuration, logs and
//! temporary files in a directory of its own (removed with the world's).

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

pub struct Nginx {
    pub dir: PathBuf,
    /// The CA that signed the website's certificate (PEM file).
    pub ca: PathBuf,
    proc: Proc,
}

/// Where nginx listens and what it proxies.
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

impl Nginx {
    /// Starts nginx in `ns` with its files under `dir`; returns once it
    /// serves.
    pub fn start(ns: &NetNs, dir: &Path, site: &Site) -> Self {
        fs::create_dir_all(dir.join("www")).unwrap();
        fs::create_dir_all(dir.join("tmp")).unwrap();
        fs::write(dir.join("www/index.html"), PAGE).unwrap();
        let (ca, cert, key) = certificates(site.name, site.listen);
        let ca_path = dir.join("ca.crt");
        fs::write(&ca_path, ca).unwrap();
        fs::write(dir.join("site.crt"), cert).unwrap();
        fs::write(dir.join("site.key"), key).unwrap();
        let conf = dir.join("nginx.conf");
        fs::write(&conf, config(dir, site)).unwrap();
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/var/run/netns/{}", ns.name()))
            .arg("nginx")
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&conf)
            // The error log before the configuration is read: not Debian's.
            .arg("-e")
            .arg(dir.join("error.log"));
        let mut proc = Proc::start("nginx", cmd, dir.join("stderr.log"));
        // Up once it logs its start ("start worker process" with a master,
        // nothing without one): wait for the listener instead.
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
            "nginx did not start:\n{}\n{}",
            proc.log(),
            fs::read_to_string(dir.join("error.log")).unwrap_or_default()
        );
        Nginx {
            dir: dir.to_owned(),
            ca: ca_path,
            proc,
        }
    }

    pub fn access_log(&self) -> String {
        fs::read_to_string(self.dir.join("access.log")).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        self.proc.is_running()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- nginx error log ----\n{}\n---- nginx access log ----\n{}",
                fs::read_to_string(self.dir.join("error.log")).unwrap_or_default(),
                self.access_log()
            );
        }
        // `proc` stops it by PID when dropped.
    }
}

/// One process (no master and workers: one PID to stop), everything under
/// `dir`, the WebSocket path proxied as the nginx documentation has it.
fn config(dir: &Path, site: &Site) -> String {
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
