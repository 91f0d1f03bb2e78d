//! Where a peer is dialled: a host name or IP address and a port, resolved with the system
//! resolver at every connection attempt, so a peer that moves is found again on reconnect.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use tokio::net::TcpStream;

/// How many resolved addresses a dial tries, in the resolver's order.
const MAX_ADDRS: usize = 8;

/// A peer's dial address: `mimi.b.example:443`, `127.0.0.1:4433` or `[::1]:4433`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PeerAddr {
    host: String,
    port: u16,
}

/// Not a `host:port` address.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{input:?} is not an address like mimi.b.example:443, 127.0.0.1:4433 or [::1]:4433")]
pub struct PeerAddrError {
    input: String,
}

fn is_host_name(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

impl PeerAddr {
    /// `host` is a DNS name or an IP address (IPv6 without brackets).
    pub fn new(host: &str, port: u16) -> Result<PeerAddr, PeerAddrError> {
        let bad = || PeerAddrError {
            input: format!("{host}:{port}"),
        };
        if port == 0 {
            return Err(bad());
        }
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(SocketAddr::new(ip, port).into());
        }
        if !is_host_name(host) {
            return Err(bad());
        }
        Ok(PeerAddr {
            host: host.to_ascii_lowercase(),
            port,
        })
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The address itself when the host is an IP address (no resolver needed).
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        self.host
            .parse::<IpAddr>()
            .ok()
            .map(|ip| SocketAddr::new(ip, self.port))
    }

    /// Resolves the host now (the system resolver, `getaddrinfo`): at most a few addresses,
    /// in the resolver's order.
    pub async fn resolve(&self) -> std::io::Result<Vec<SocketAddr>> {
        if let Some(a) = self.socket_addr() {
            return Ok(vec![a]);
        }
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((self.host.as_str(), self.port))
            .await?
            .take(MAX_ADDRS)
            .collect();
        if addrs.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{} has no address", self.host),
            ));
        }
        Ok(addrs)
    }

    /// Resolves the host and connects to the first address that answers.
    pub async fn connect_tcp(&self) -> std::io::Result<TcpStream> {
        let mut last = None;
        for addr in self.resolve().await? {
            match TcpStream::connect(addr).await {
                Ok(s) => return Ok(s),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| std::io::ErrorKind::NotFound.into()))
    }
}

impl From<SocketAddr> for PeerAddr {
    fn from(a: SocketAddr) -> Self {
        PeerAddr {
            host: a.ip().to_string(),
            port: a.port(),
        }
    }
}

impl FromStr for PeerAddr {
    type Err = PeerAddrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(a) = s.parse::<SocketAddr>() {
            return Ok(a.into());
        }
        let bad = || PeerAddrError {
            input: s.to_owned(),
        };
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        // IPv6 needs brackets, which SocketAddr's parser already handled.
        if host.contains(':') {
            return Err(bad());
        }
        let port: u16 = port.parse().map_err(|_| bad())?;
        PeerAddr::new(host, port).map_err(|_| bad())
    }
}

impl fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.socket_addr() {
            Some(a) => a.fmt(f),
            None => write!(f, "{}:{}", self.host, self.port),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_and_addresses() {
        let a: PeerAddr = "mimi.B.example:443".parse().expect("name");
        assert_eq!((a.host(), a.port()), ("mimi.b.example", 443));
        assert_eq!(a.to_string(), "mimi.b.example:443");
        assert_eq!(a.socket_addr(), None);
        let v6: PeerAddr = "[::1]:4433".parse().expect("v6");
        assert_eq!(v6.socket_addr(), Some("[::1]:4433".parse().expect("addr")));
        assert_eq!(v6.to_string(), "[::1]:4433");
        for bad in [
            "nowhere",
            "b.example",
            "b.example:0",
            "b.example:99999",
            "b..example:1",
            "-b.example:1",
            "b example:1",
            ":443",
            "::1:443",
        ] {
            assert!(bad.parse::<PeerAddr>().is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn a_host_name_is_resolved_when_dialling() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let addr = PeerAddr::new("localhost", port).expect("localhost");
        let resolved = addr.resolve().await.expect("localhost resolves");
        assert!(
            resolved.iter().all(|a| a.ip().is_loopback()),
            "{resolved:?}"
        );
        // Whichever of ::1 and 127.0.0.1 comes first, the dial reaches the listener.
        let (dialled, accepted) = tokio::join!(addr.connect_tcp(), listener.accept());
        let dialled = dialled.expect("connected");
        let (_, from) = accepted.expect("accepted");
        assert_eq!(dialled.local_addr().expect("local"), from);
    }
}
