//! Small value types whose parsing gives better errors than the std ones.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An `ip:port` to listen on or connect to; the port is 1–65535.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ListenAddr(pub SocketAddr);

impl ListenAddr {
    pub const fn new(ip: [u8; 4], port: u16) -> Self {
        ListenAddr(SocketAddr::new(
            IpAddr::V4(std::net::Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3])),
            port,
        ))
    }
    pub fn port(&self) -> u16 {
        self.0.port()
    }
    /// The same address with another port.
    pub fn with_port(&self, port: u16) -> Self {
        ListenAddr(SocketAddr::new(self.0.ip(), port))
    }
}

impl FromStr for ListenAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("`{s}` is not of the form ip:port"))?;
        let port: u32 = port
            .parse()
            .map_err(|_| format!("port `{port}` in `{s}` is not a number"))?;
        if port == 0 || port > 65535 {
            return Err(format!("port {port} in `{s}` is out of range (1-65535)"));
        }
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let ip: IpAddr = match host {
            "localhost" => IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            _ => host
                .parse()
                .map_err(|_| format!("`{host}` in `{s}` is not an IP address"))?,
        };
        Ok(ListenAddr(SocketAddr::new(ip, port as u16)))
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Debug for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl Serialize for ListenAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for ListenAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A secret value: never printed by `Debug` or `Display`.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    /// The value itself; callers must not log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}
