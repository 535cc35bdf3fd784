//! TLS resumption against the real gateway: a returning client resumes
//! its TLS session (no certificate signed or verified again), and a
//! client revoked since cannot resume its way back in.

use std::{sync::Arc, time::Duration};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsConnector;
use veil_proto::session::{ClientConfig, ClientSession, Output};
use veil_tests::world::World;
use veil_tunnel::profile::Profile;

/// How a connection went: whether its handshake resumed, and the address
/// it was given (none if the gateway closed it first).
struct Outcome {
    resumed: bool,
    vip: Option<std::net::Ipv4Addr>,
}

/// Connects with `tls` (its session store kept between calls), asks for
/// an address, and closes.
async fn connect(tls: &Arc<rustls::ClientConfig>) -> Outcome {
    let tcp = tokio::net::TcpStream::connect("10.200.1.1:443")
        .await
        .expect("TCP to the gateway");
    let name = rustls::pki_types::ServerName::try_from("veil-gateway").unwrap();
    let mut tls = TlsConnector::from(tls.clone())
        .connect(name, tcp)
        .await
        .expect("TLS handshake");
    let resumed = tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    let mut session =
        ClientSession::new(ClientConfig::new("veil-gateway"), std::time::Instant::now()).unwrap();
    let mut buf = vec![0u8; 16 * 1024];
    let mut vip = None;
    'talk: loop {
        while let Some(out) = session.poll_output() {
            match out {
                // Written in the guard: a write that fails ends the talk.
                Output::Send(bytes) if tls.write_all(&bytes).await.is_err() => break 'talk,
                Output::Assigned { addr, .. } => {
                    vip = Some(addr);
                    break 'talk;
                }
                Output::Close { .. } => break 'talk,
                _ => {}
            }
        }
        let _ = tls.flush().await;
        match tokio::time::timeout(Duration::from_secs(10), tls.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {
                if session
                    .receive(&buf[..n], std::time::Instant::now())
                    .is_err()
                {
                    break;
                }
            }
            _ => break,
        }
    }
    let _ = tls.shutdown().await;
    Outcome { resumed, vip }
}

#[test]
fn a_returning_client_resumes_tls_and_a_revoked_one_cannot_resume_its_way_in() {
    let mut world = World::new(1, &[]);
    let path = world.add_client("doomed", 1);
    let profile = Profile::load(&path).unwrap();
    let (config, _) = veil_tunnel::tls::client_config(&profile).unwrap();
    let tls = Arc::new(config);
    let (first, again, revoked) = world.client(1).enter(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async {
                let first = connect(&tls).await;
                let again = connect(&tls).await;
                world.veil_user(&["client", "revoke", "doomed"]);
                // Within a second the registry knows (until then a
                // connection still gets its session); the handshake
                // itself resumes from the ticket whatever the registry
                // says.
                let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
                let revoked = loop {
                    let outcome = connect(&tls).await;
                    if outcome.vip.is_none() || tokio::time::Instant::now() > deadline {
                        break outcome;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                };
                (first, again, revoked)
            })
    });
    assert!(!first.resumed, "nothing to resume the first time");
    assert!(first.vip.is_some(), "the first connection gets its address");
    assert!(again.resumed, "a returning client resumes its TLS session");
    assert_eq!(again.vip, first.vip, "and keeps its address");
    assert!(revoked.resumed, "the ticket still resumes the TLS session");
    assert_eq!(revoked.vip, None, "but the revoked client gets no session");
    world
        .gateway()
        .wait_for_log("client `doomed` is revoked", Duration::from_secs(10));
}
