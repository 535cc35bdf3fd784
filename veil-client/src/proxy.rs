//! The modes without a TUN device, `--socks` and `--redirect`: the
//! user-space stack they share and their listeners, started before the
//! first connection to the gateway and kept across reconnects (their
//! connections pause with the tunnel, as the TUN mode's do).

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use anyhow::{Context, Result};
use tokio::{net::TcpListener, task::JoinHandle};
use tracing::info;

use crate::{
    netstack::{Netstack, Ports},
    redirect, socks,
};

/// What the command line asked for.
pub struct Options {
    pub socks: Option<SocketAddr>,
    pub socks_users: Option<PathBuf>,
    pub redirect: Option<SocketAddr>,
    pub redirect_rules: bool,
    pub mtu: u16,
    /// A TUN device shares the tunnel's address.
    pub beside_tun: bool,
}

/// The stack and its listeners; dropping it stops them and removes the
/// redirect rules.
pub struct Proxies {
    pub stack: Netstack,
    tasks: Vec<JoinHandle<()>>,
    _rules: Option<redirect::Rules>,
}

impl Proxies {
    /// Binds the listeners (an error here is the user's to fix) and
    /// starts serving; `None` when neither mode is asked for.
    pub async fn start(opts: Options) -> Result<Option<Proxies>> {
        if opts.socks.is_none() && opts.redirect.is_none() {
            return Ok(None);
        }
        let ports = if opts.beside_tun {
            Ports::BESIDE_KERNEL
        } else {
            Ports::ALONE
        };
        let users = match &opts.socks_users {
            Some(path) => Some(Arc::new(socks::Users::load(path)?)),
            None => None,
        };
        let mut listeners = Vec::new();
        if let Some(addr) = opts.socks {
            socks::check_exposure(addr, users.as_deref())?;
            let addr = socks::listen_addr(addr)?;
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("listening for SOCKS clients on {addr}"))?;
            listeners.push((listener, true));
        }
        if let Some(addr) = opts.redirect {
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("listening for redirected connections on {addr}"))?;
            listeners.push((listener, false));
        }
        let stack = Netstack::spawn(opts.mtu, ports);
        let mut tasks = Vec::new();
        for (listener, is_socks) in listeners {
            let addr = listener.local_addr()?;
            if is_socks {
                info!(%addr, auth = users.is_some(), "SOCKS5 server listening");
                tasks.push(tokio::spawn(socks::serve(
                    listener,
                    stack.clone(),
                    users.clone(),
                )));
            } else {
                info!(%addr, "accepting redirected connections");
                tasks.push(tokio::spawn(redirect::serve(listener, stack.clone())));
            }
        }
        let rules = match (opts.redirect_rules, opts.redirect) {
            (true, Some(addr)) => Some(redirect::Rules::install(addr)?),
            _ => None,
        };
        Ok(Some(Proxies {
            stack,
            tasks,
            _rules: rules,
        }))
    }
}

impl Drop for Proxies {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}
