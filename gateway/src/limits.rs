//! Rate limits (governor): per client IP for every request and for new
//! WebSocket connections ([`Limits`]), and per route class, per IP and per
//! authenticated user ([`ClassLimiter`]). IPv6 clients are grouped by /64,
//! the unit one subscriber usually gets. Keys are evicted by the `gc`
//! methods, run periodically, so memory stays bounded however many
//! addresses or users show up.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use portico_config::{LimitClass, RateLimits};

/// What a client is counted as: an IPv4 address or an IPv6 /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientKey {
    V4(u32),
    V6Prefix(u64),
}

impl From<IpAddr> for ClientKey {
    fn from(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => ClientKey::V4(u32::from(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => ClientKey::V4(u32::from(v4)),
                None => ClientKey::V6Prefix((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

pub struct Limits {
    requests: DefaultKeyedRateLimiter<ClientKey>,
    ws_connects: DefaultKeyedRateLimiter<ClientKey>,
}

fn quota(per_sec: u32, burst: u32) -> Quota {
    let nz = |v: u32| NonZeroU32::new(v).expect("validated: limits are at least 1");
    Quota::per_second(nz(per_sec)).allow_burst(nz(burst))
}

impl Limits {
    pub fn new(cfg: &RateLimits) -> Self {
        Limits {
            requests: RateLimiter::keyed(quota(cfg.requests_per_sec, cfg.requests_burst)),
            ws_connects: RateLimiter::keyed(quota(cfg.ws_connects_per_sec, cfg.ws_connects_burst)),
        }
    }

    /// `Err(retry_after)` when `ip` is over its request rate.
    pub fn check_request(&self, ip: IpAddr) -> Result<(), Duration> {
        check(&self.requests, ip)
    }

    /// `Err(retry_after)` when `ip` opens WebSockets too fast.
    pub fn check_ws_connect(&self, ip: IpAddr) -> Result<(), Duration> {
        check(&self.ws_connects, ip)
    }

    /// Forgets clients whose buckets are full again.
    pub fn gc(&self) {
        for l in [&self.requests, &self.ws_connects] {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }

    /// Clients currently tracked (for tests and metrics).
    pub fn tracked(&self) -> usize {
        self.requests.len() + self.ws_connects.len()
    }
}

fn check(l: &DefaultKeyedRateLimiter<ClientKey>, ip: IpAddr) -> Result<(), Duration> {
    check_key(l, &ClientKey::from(ip))
}

fn check_key<K: std::hash::Hash + Eq + Clone>(
    l: &DefaultKeyedRateLimiter<K>,
    key: &K,
) -> Result<(), Duration> {
    l.check_key(key)
        .map_err(|nu| nu.wait_time_from(DefaultClock::default().now()))
}

/// The limits of one `gateway.limit_classes` entry.
pub struct ClassLimiter {
    name: String,
    per_ip: DefaultKeyedRateLimiter<ClientKey>,
    /// Keyed by the verified token's subject; tokens are signed, so the key
    /// space is the set of real users, and `gc` trims it anyway.
    per_user: Option<DefaultKeyedRateLimiter<String>>,
}

impl std::fmt::Debug for ClassLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClassLimiter").field("name", &self.name).finish()
    }
}

impl ClassLimiter {
    pub fn new(name: &str, c: &LimitClass) -> Self {
        ClassLimiter {
            name: name.to_string(),
            per_ip: RateLimiter::keyed(quota(c.per_ip_per_sec, c.per_ip_burst)),
            per_user: c
                .per_user_per_sec
                .zip(c.per_user_burst)
                .map(|(rate, burst)| RateLimiter::keyed(quota(rate, burst))),
        }
    }

    /// `Err(retry_after)` when the client IP, or the user when known, is
    /// over this class's rate.
    pub fn check(&self, ip: Option<IpAddr>, user: Option<&str>) -> Result<(), Duration> {
        if let Some(ip) = ip {
            check(&self.per_ip, ip)?;
        }
        if let (Some(limiter), Some(user)) = (&self.per_user, user) {
            check_key(limiter, &user.to_string())?;
        }
        Ok(())
    }

    /// Whether this class limits per user (so the user must be known).
    pub fn limits_users(&self) -> bool {
        self.per_user.is_some()
    }

    pub fn gc(&self) {
        self.per_ip.retain_recent();
        self.per_ip.shrink_to_fit();
        if let Some(l) = &self.per_user {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_is_grouped_by_64_and_clients_are_independent() {
        let cfg = RateLimits {
            requests_per_sec: 1,
            requests_burst: 2,
            ..RateLimits::default()
        };
        let l = Limits::new(&cfg);
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let same64: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert!(l.check_request(a).is_ok());
        assert!(l.check_request(same64).is_ok());
        let wait = l.check_request(a).unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(1));
        assert!(l.check_request(other).is_ok(), "another /64 is unaffected");
        assert!(l.check_request("192.0.2.1".parse().unwrap()).is_ok());
    }

    #[test]
    fn a_class_limits_each_user_on_its_own_across_addresses() {
        let class = ClassLimiter::new(
            "api",
            &LimitClass {
                per_ip_per_sec: 1000,
                per_ip_burst: 1000,
                per_user_per_sec: Some(1),
                per_user_burst: Some(2),
            },
        );
        let ip = |n: u8| Some(IpAddr::from([192, 0, 2, n]));
        assert!(class.check(ip(1), Some("alice")).is_ok());
        assert!(class.check(ip(2), Some("alice")).is_ok());
        assert!(
            class.check(ip(3), Some("alice")).is_err(),
            "a new address does not help"
        );
        assert!(
            class.check(ip(1), Some("bob")).is_ok(),
            "other users are unaffected"
        );
        assert!(class.check(ip(1), None).is_ok(), "anonymous: per-IP only");
    }

    #[test]
    fn gc_bounds_memory() {
        let l = Limits::new(&RateLimits {
            requests_per_sec: 1000,
            requests_burst: 1,
            ..RateLimits::default()
        });
        for i in 0..1000u32 {
            let _ = l.check_request(IpAddr::V4(i.into()));
        }
        assert!(l.tracked() >= 1000);
        std::thread::sleep(Duration::from_millis(20));
        l.gc();
        assert_eq!(l.tracked(), 0, "refilled buckets are forgotten");
    }
}
