//! The modes without a TUN device, `--socks` and `--redirect`: the
//! user-space stack they share and their listeners, started before the
//! first connection to the gateway and kept across reconnects (their
//! connections pause with the tunnel, as the TUN mode's do).
//!
//! They run on a thread of their own, beside the one that runs the tunnel:
//! the stack and the relays then take the second core while the first
//! encrypts (measured with `cargo xtask bench socks`).

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use anyhow::{Context, Result};
use tokio::sync::oneshot;
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
    _stop: oneshot::Sender<()>,
    _rules: Option<redirect::Rules>,
}

impl Proxies {
    /// Binds the listeners (an error here is the user's to fix) and
    /// starts serving; `None` when neither mode is asked for.
    pub fn start(opts: Options) -> Result<Option<Proxies>> {
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
        let socks = match opts.socks {
            Some(addr) => {
                socks::check_exposure(addr, users.as_deref())?;
                Some(bind(socks::listen_addr(addr)?, "SOCKS clients")?)
            }
            None => None,
        };
        let redirect = match opts.redirect {
            Some(addr) => Some(bind(addr, "redirected connections")?),
            None => None,
        };
        let (ready, started) = std::sync::mpsc::channel();
        let (stop, stopped) = oneshot::channel::<()>();
        let mtu = opts.mtu;
        std::thread::Builder::new()
            .name("veil-proxies".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = ready.send(Err(anyhow::Error::new(e)));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let stack = Netstack::spawn(mtu, ports);
                    match serve(&stack, socks, redirect, users) {
                        Ok(()) => {
                            let _ = ready.send(Ok(stack));
                            // Until the client stops: then the runtime,
                            // and every task on it, is dropped.
                            let _ = stopped.await;
                        }
                        Err(e) => {
                            let _ = ready.send(Err(e));
                        }
                    }
                });
            })
            .context("starting the proxies' thread")?;
        let stack = started
            .recv()
            .context("the proxies' thread ended at start")??;
        let rules = match (opts.redirect_rules, opts.redirect) {
            (true, Some(addr)) => Some(redirect::Rules::install(addr)?),
            _ => None,
        };
        Ok(Some(Proxies {
            stack,
            _stop: stop,
            _rules: rules,
        }))
    }
}

fn bind(addr: SocketAddr, what: &str) -> Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr)
        .with_context(|| format!("listening for {what} on {addr}"))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Starts the listeners' tasks (inside the proxies' runtime).
fn serve(
    stack: &Netstack,
    socks: Option<std::net::TcpListener>,
    redirect: Option<std::net::TcpListener>,
    users: Option<Arc<socks::Users>>,
) -> Result<()> {
    if let Some(listener) = socks {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        info!(addr = %listener.local_addr()?, auth = users.is_some(), "SOCKS5 server listening");
        tokio::spawn(socks::serve(listener, stack.clone(), users));
    }
    if let Some(listener) = redirect {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        info!(addr = %listener.local_addr()?, "accepting redirected connections");
        tokio::spawn(redirect::serve(listener, stack.clone()));
    }
    Ok(())
}
