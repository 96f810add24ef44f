//! A peer's address as configured: an IP address and port, or a host name
//! and port that is resolved again at every dial, so that a branch on
//! dynamic DNS (or a headquarters that moved) is found at its new address
//! without a restart.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerAddr {
    Ip(SocketAddr),
    Name { host: String, port: u16 },
}

impl FromStr for PeerAddr {
    type Err = String;

    fn from_str(text: &str) -> Result<PeerAddr, String> {
        let t = text.trim();
        if let Ok(addr) = t.parse::<SocketAddr>() {
            return Ok(PeerAddr::Ip(addr));
        }
        let bad = || {
            format!(
                "{text:?} is not an address: use host:port or ip:port (\"branch1.example:7741\", \"203.0.113.10:7741\")"
            )
        };
        let (host, port) = t.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        // A DNS name: labels of letters, digits and hyphens.
        let name_ok = !host.is_empty()
            && host.len() <= 253
            && host.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            });
        if !name_ok || port == 0 {
            return Err(bad());
        }
        Ok(PeerAddr::Name {
            host: host.to_ascii_lowercase(),
            port,
        })
    }
}

/// An HTTP proxy as configured (`proxy = "http://host:port"`): the peer
/// the TCP transport dials and asks for a tunnel (`CONNECT`).
pub fn parse_proxy(text: &str) -> Result<PeerAddr, String> {
    let rest = text.trim().strip_prefix("http://").ok_or_else(|| {
        format!(
            "{text:?} is not an HTTP proxy: use http://host:port (\"http://proxy.example:3128\")"
        )
    })?;
    rest.trim_end_matches('/').parse()
}

impl fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerAddr::Ip(a) => write!(f, "{a}"),
            PeerAddr::Name { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

impl PeerAddr {
    /// The address to dial now: a name is looked up again (the system's
    /// resolver: /etc/hosts, DNS) at every call; its first IPv4 address is
    /// taken (the daemons' dialling sockets are IPv4), else its first.
    pub async fn resolve(&self) -> std::io::Result<SocketAddr> {
        match self {
            PeerAddr::Ip(a) => Ok(*a),
            PeerAddr::Name { host, port } => {
                let all: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), *port))
                    .await?
                    .collect();
                all.iter()
                    .find(|a| a.is_ipv4())
                    .or(all.first())
                    .copied()
                    .ok_or_else(|| {
                        std::io::Error::new(
                            std::io::ErrorKind::NotFound,
                            format!("{host} has no address"),
                        )
                    })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_names_parse_and_print_back() {
        for (text, want) in [
            ("127.0.0.1:7741", "127.0.0.1:7741"),
            ("[::1]:7741", "[::1]:7741"),
            ("Branch-1.Example:7741", "branch-1.example:7741"),
            ("localhost:9", "localhost:9"),
        ] {
            let a: PeerAddr = text.parse().unwrap();
            assert_eq!(a.to_string(), want);
        }
        for bad in [
            "",
            "branch1",
            "branch1:",
            "branch1:70000",
            "branch1:0",
            ":7741",
            "bad_name:7741",
            "-x.example:1",
            "a..b:1",
            "http://x:1",
        ] {
            assert!(bad.parse::<PeerAddr>().is_err(), "{bad:?} parsed");
        }
    }

    #[tokio::test]
    async fn a_name_resolves_and_an_ip_stays_itself() {
        let ip: PeerAddr = "127.0.0.1:5".parse().unwrap();
        assert_eq!(ip.resolve().await.unwrap(), "127.0.0.1:5".parse().unwrap());
        let name: PeerAddr = "localhost:5".parse().unwrap();
        let got = name.resolve().await.unwrap();
        assert!(got.ip().is_loopback() && got.is_ipv4(), "{got}");
    }
}
