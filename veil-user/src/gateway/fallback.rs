//! What a stranger gets: a connection without a client certificate (a
//! browser, a crawler, a censor's probe) is answered as an ordinary HTTPS
//! site would answer it, never with veil's refusals.
//!
//! Either the decrypted connection is proxied to a web server the
//! operator runs (`--fallback ADDR:PORT`: the probe sees that site, byte
//! for byte), or a small static site is served here: one page at `/`, 404
//! elsewhere, 405 for methods other than GET and HEAD, 400 for what is not
//! HTTP/1.x, keep-alive as HTTP/1.1 has it. Nothing closes early: a silent
//! stranger is given the header timeout a web server gives (nginx's
//! `client_header_timeout`, 60 s), not the tunnel's handshake timeout.
//!
//! Generic over the connection, so any transport that has decrypted bytes
//! and found no client can hand them here.

use std::{
    net::SocketAddr,
    path::Path,
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};
use tracing::debug;

/// How long a stranger may take to send a request head (nginx's default).
const HEADER_TIMEOUT: Duration = Duration::from_secs(60);
/// How long an idle keep-alive connection stays open (nginx: 75 s).
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(75);
/// Requests served on one connection, at most (nginx: 1000).
const MAX_REQUESTS: usize = 1000;
/// A request head larger than this is refused with 400, as nginx does
/// with its default large_client_header_buffers (8 KiB).
const MAX_HEAD: usize = 8192;
/// A proxied stranger's connection lasts this long at most: the fallback
/// is a decoy, not a service to stream from.
const PROXY_LIFETIME: Duration = Duration::from_secs(600);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The page served when no fallback site is configured.
const DEFAULT_PAGE: &str = "<!DOCTYPE html>\n<html>\n<head><title>Welcome</title></head>\n\
<body>\n<h1>Welcome</h1>\n<p>This site is under construction.</p>\n</body>\n</html>\n";

/// Where strangers go.
#[derive(Clone, Debug)]
pub enum Fallback {
    /// A web server the decrypted connection is proxied to.
    Proxy(SocketAddr),
    /// A page served at `/` (HTML).
    Page(Arc<str>),
}

impl Default for Fallback {
    fn default() -> Self {
        Fallback::Page(DEFAULT_PAGE.into())
    }
}

impl Fallback {
    /// `--fallback` if given, else `--fallback-page`'s file, else the
    /// built-in page.
    pub fn from_settings(proxy: Option<SocketAddr>, page: Option<&Path>) -> std::io::Result<Self> {
        Ok(match (proxy, page) {
            (Some(addr), _) => Fallback::Proxy(addr),
            (None, Some(path)) => Fallback::Page(std::fs::read_to_string(path)?.into()),
            (None, None) => Fallback::default(),
        })
    }
}

/// Serves one stranger's connection to its end.
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(fallback: &Fallback, mut io: S) {
    match fallback {
        Fallback::Proxy(addr) => proxy(*addr, io).await,
        Fallback::Page(page) => pages(page, &mut io).await,
    }
}

async fn proxy<S: AsyncRead + AsyncWrite + Unpin>(addr: SocketAddr, mut io: S) {
    let upstream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await;
    let mut upstream = match upstream {
        Ok(Ok(tcp)) => tcp,
        _ => {
            // As a reverse proxy says it: a 502 after the request came.
            debug!("the fallback site {addr} did not answer");
            let _ = read_head(&mut io, &mut Vec::new(), HEADER_TIMEOUT).await;
            let _ = io
                .write_all(&response(502, false, "text/html", b"", false))
                .await;
            let _ = io.shutdown().await;
            return;
        }
    };
    let _ = tokio::time::timeout(
        PROXY_LIFETIME,
        tokio::io::copy_bidirectional(&mut io, &mut upstream),
    )
    .await;
    let _ = io.shutdown().await;
}

/// The built-in site: requests answered in turn until the stranger closes,
/// goes quiet, or sends what ends a connection.
async fn pages<S: AsyncRead + AsyncWrite + Unpin>(page: &str, io: &mut S) {
    let mut buf = Vec::new();
    for served in 0..MAX_REQUESTS {
        let wait = if served == 0 {
            HEADER_TIMEOUT
        } else {
            KEEPALIVE_TIMEOUT
        };
        let head = match read_head(io, &mut buf, wait).await {
            Ok(Some(head)) => head,
            Ok(None) => break,
            Err(status) => {
                let _ = io
                    .write_all(&response(status, false, "text/html", b"", false))
                    .await;
                break;
            }
        };
        let answer = answer(&head, page);
        let keep = answer.keep_alive && served + 1 < MAX_REQUESTS;
        let bytes = response(
            answer.status,
            answer.head_only,
            "text/html",
            answer.body.as_bytes(),
            keep,
        );
        if io.write_all(&bytes).await.is_err() || !keep {
            break;
        }
    }
    let _ = io.shutdown().await;
}

/// Reads one request head into `buf` (keeping what follows it for the
/// next): `None` when the peer closed or went quiet before sending one,
/// `Err(status)` for a head no server would take.
async fn read_head<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut Vec<u8>,
    wait: Duration,
) -> Result<Option<Vec<u8>>, u16> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = buf[..end + 4].to_vec();
            buf.drain(..end + 4);
            return Ok(Some(head));
        }
        if buf.len() > MAX_HEAD {
            return Err(400);
        }
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout_at(deadline, io.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(None),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            // nginx closes a silent connection without a word.
            Err(_) => return Ok(None),
        }
    }
}

/// What the built-in site answers to one request.
#[derive(Debug, PartialEq, Eq)]
struct Answer {
    status: u16,
    body: String,
    head_only: bool,
    keep_alive: bool,
}

fn answer(head: &[u8], page: &str) -> Answer {
    let text = String::from_utf8_lossy(head);
    let mut lines = text.split("\r\n");
    let line = lines.next().unwrap_or_default();
    let parts: Vec<&str> = line.split(' ').collect();
    let refuse = |status: u16| Answer {
        status,
        body: error_page(status),
        head_only: false,
        keep_alive: false,
    };
    let [method, target, version] = parts[..] else {
        return refuse(400);
    };
    let http11 = match version {
        "HTTP/1.1" => true,
        "HTTP/1.0" => false,
        _ => return refuse(400),
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return refuse(400);
    }
    let header = |name: &str| {
        text.split("\r\n").skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_ascii_lowercase())
        })
    };
    if http11 && header("host").is_none() {
        return refuse(400);
    }
    // A body we would have to read past: answered, then the connection
    // ends (nginx answers a POST to a static file with 405 the same way).
    let has_body =
        header("transfer-encoding").is_some() || header("content-length").is_some_and(|v| v != "0");
    if method != "GET" && method != "HEAD" {
        return refuse(405);
    }
    let close = header("connection").is_some_and(|v| v.contains("close"));
    let keep_alive = !has_body
        && if http11 {
            !close
        } else {
            header("connection").is_some_and(|v| v.contains("keep-alive"))
        };
    let path = target.split(['?', '#']).next().unwrap_or_default();
    let (status, body) = match path {
        "/" | "/index.html" => (200, page.to_owned()),
        _ => (404, error_page(404)),
    };
    Answer {
        status,
        body,
        head_only: method == "HEAD",
        keep_alive,
    }
}

fn error_page(status: u16) -> String {
    let reason = veil_proto::http::reason_phrase(status);
    format!(
        "<html>\r\n<head><title>{status} {reason}</title></head>\r\n<body>\r\n\
         <center><h1>{status} {reason}</h1></center>\r\n</body>\r\n</html>\r\n"
    )
}

/// A complete response; a `head_only` one keeps its Content-Length but
/// not its body (HEAD). An empty body for an error status is its page.
fn response(status: u16, head_only: bool, kind: &str, body: &[u8], keep: bool) -> Vec<u8> {
    let page;
    let body = if body.is_empty() && status >= 400 {
        page = error_page(status);
        page.as_bytes()
    } else {
        body
    };
    let reason = match status {
        200 => "OK",
        s => veil_proto::http::reason_phrase(s),
    };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nDate: {}\r\nContent-Type: {kind}\r\n\
         Content-Length: {}\r\nConnection: {}\r\n\r\n",
        http_date(SystemTime::now()),
        body.len(),
        if keep { "keep-alive" } else { "close" },
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body);
    }
    out
}

/// An IMF-fixdate (RFC 9110 §5.6.7): `Sun, 06 Nov 1994 08:49:37 GMT`.
fn http_date(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86400, secs % 86400);
    // Howard Hinnant's days_from_civil, inverted.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{}, {day:02} {} {year} {:02}:{:02}:{:02} GMT",
        WEEKDAYS[(days % 7) as usize],
        MONTHS[(month - 1) as usize],
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(head: &str) -> Answer {
        answer(head.as_bytes(), "PAGE")
    }

    #[test]
    fn the_page_the_404_and_the_refusals_are_a_web_servers() {
        let ok = ask("GET / HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(
            (ok.status, ok.body.as_str(), ok.keep_alive),
            (200, "PAGE", true)
        );
        let upgrade = ask(
            "GET /.well-known/masque/ip/*/*/ HTTP/1.1\r\nHost: a\r\nUpgrade: connect-ip\r\n\r\n",
        );
        assert_eq!(upgrade.status, 404, "a stranger's CONNECT-IP is only a GET");
        assert!(ask("HEAD / HTTP/1.1\r\nHost: a\r\n\r\n").head_only);
        assert_eq!(ask("POST / HTTP/1.1\r\nHost: a\r\n\r\n").status, 405);
        assert_eq!(ask("GET / HTTP/1.1\r\n\r\n").status, 400, "no Host");
        assert_eq!(ask("\x16\x03\x01 junk\r\n\r\n").status, 400);
        assert_eq!(ask("GET / SSH-2.0\r\n\r\n").status, 400);
        assert!(!ask("GET / HTTP/1.0\r\n\r\n").keep_alive);
        assert!(!ask("GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").keep_alive);
        assert!(!ask("GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n").keep_alive);
    }

    #[test]
    fn dates_are_imf_fixdates() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777);
        assert_eq!(http_date(t), "Sun, 06 Nov 1994 08:49:37 GMT");
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(http_date(leap), "Tue, 29 Feb 2000 00:00:00 GMT");
    }

    #[tokio::test]
    async fn keep_alive_serves_requests_in_turn_and_a_bad_one_ends_it() {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let task = tokio::spawn(async move {
            serve(&Fallback::Page("PAGE".into()), server).await;
        });
        client
            .write_all(
                b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET /x HTTP/1.1\r\nHost: a\r\n\r\nBREW\r\n\r\n",
            )
            .await
            .unwrap();
        let mut out = String::new();
        client.read_to_string(&mut out).await.unwrap();
        task.await.unwrap();
        let statuses: Vec<&str> = out.split("HTTP/1.1 ").skip(1).map(|r| &r[..3]).collect();
        assert_eq!(statuses, ["200", "404", "400"], "{out}");
    }
}
