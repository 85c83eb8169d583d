//! Login rate limits per account and per peer address (governor's keyed GCRA limiters).
//!
//! Every attempt counts, for unknown emails alike; while a limit holds even the right password is
//! refused. Limits are per process: with several API instances the effective limit is multiplied by
//! their number (documented in docs/security.md).

use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use sha2::{Digest as _, Sha256};

/// Keyed per-minute limiters for logins.
#[derive(Clone)]
pub struct LoginLimiter {
    per_account: Arc<DefaultKeyedRateLimiter<[u8; 32]>>,
    per_address: Arc<DefaultKeyedRateLimiter<IpAddr>>,
}

/// The key of an account's limit: a digest of the normalised e-mail, 32 bytes whatever was sent
/// (keying by the text itself kept every hostile megabyte-long "e-mail" until the key expired).
pub fn account_key(email: &str) -> [u8; 32] {
    Sha256::digest(email.trim().to_lowercase().as_bytes()).into()
}

/// The key of an address's limit: an IPv4 address as it is (an IPv4-mapped IPv6 one too), an IPv6
/// address by its /64, the block a single host or customer line is usually given (one quota per
/// address would give such a client 2^64 quotas).
pub fn address_key(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(_) => addr,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        },
    }
}

fn per_minute(n: u32) -> Quota {
    Quota::per_minute(NonZeroU32::new(n.max(1)).expect("non-zero"))
}

impl LoginLimiter {
    /// Limits allowing `per_account` and `per_address` attempts per minute.
    pub fn new(per_account: u32, per_address: u32) -> Self {
        Self {
            per_account: Arc::new(RateLimiter::keyed(per_minute(per_account))),
            per_address: Arc::new(RateLimiter::keyed(per_minute(per_address))),
        }
    }

    /// Counts one attempt; `Err(wait)` when a limit holds.
    pub fn check(&self, email: &str, addr: IpAddr) -> Result<(), Duration> {
        let clock = DefaultClock::default();
        let address = self.per_address.check_key(&address_key(addr));
        let account = self.per_account.check_key(&account_key(email));
        let wait = [address.err(), account.err()]
            .into_iter()
            .flatten()
            .map(|nu| nu.wait_time_from(clock.now()))
            .max();
        match wait {
            Some(w) => Err(w),
            None => Ok(()),
        }
    }

    /// Forgets keys whose limits are back to full, bounding memory.
    pub fn shrink(&self) {
        self.per_account.retain_recent();
        self.per_address.retain_recent();
    }
}

/// A per-user limit on placing orders (0 = off).
#[derive(Clone)]
pub struct UserLimiter {
    inner: Option<Arc<DefaultKeyedRateLimiter<i32>>>,
}

impl UserLimiter {
    /// A limiter allowing `per_minute` actions per user; 0 disables it.
    pub fn new(per_minute_limit: u32) -> Self {
        Self {
            inner: (per_minute_limit > 0).then(|| Arc::new(RateLimiter::keyed(per_minute(per_minute_limit)))),
        }
    }

    /// Counts one action; `Err(wait)` when the limit holds.
    pub fn check(&self, user_id: i32) -> Result<(), Duration> {
        let Some(l) = &self.inner else { return Ok(()) };
        l.check_key(&user_id)
            .map_err(|nu| nu.wait_time_from(DefaultClock::default().now()))
    }

    /// Forgets idle keys.
    pub fn shrink(&self) {
        if let Some(l) = &self.inner {
            l.retain_recent();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn account_limit_counts_every_attempt_case_insensitively() {
        let l = LoginLimiter::new(2, 100);
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        assert!(l.check("A@x.io", ip).is_ok());
        assert!(l.check("a@x.io", ip).is_ok());
        let wait = l.check("a@X.io", ip).unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(30));
        assert!(l.check("b@x.io", ip).is_ok());
    }

    #[test]
    fn an_ipv6_64_shares_one_quota_and_ipv4_mapped_is_ipv4() {
        let l = LoginLimiter::new(100, 2);
        assert!(l.check("a@x.io", "2001:db8:1:2::1".parse().unwrap()).is_ok());
        assert!(
            l.check("b@x.io", "2001:db8:1:2:ffff:ffff:ffff:ffff".parse().unwrap())
                .is_ok()
        );
        assert!(
            l.check("c@x.io", "2001:db8:1:2:dead:beef::7".parse().unwrap())
                .is_err(),
            "a third address of the same /64 has no quota of its own"
        );
        assert!(l.check("c@x.io", "2001:db8:1:3::1".parse().unwrap()).is_ok());
        let l = LoginLimiter::new(100, 1);
        assert!(l.check("a@x.io", "10.1.2.3".parse().unwrap()).is_ok());
        assert!(l.check("a@x.io", "::ffff:10.1.2.3".parse().unwrap()).is_err());
    }

    #[test]
    fn an_account_key_is_32_bytes_whatever_the_email() {
        let huge = "x".repeat(1 << 20) + "@x.io";
        assert_eq!(account_key(&huge).len(), 32);
        assert_eq!(account_key(" A@X.io "), account_key("a@x.io"));
        assert_ne!(account_key("a@x.io"), account_key("b@x.io"));
    }

    #[test]
    fn address_limit_holds_across_accounts() {
        let l = LoginLimiter::new(100, 2);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        assert!(l.check("a@x.io", ip).is_ok());
        assert!(l.check("b@x.io", ip).is_ok());
        assert!(l.check("c@x.io", ip).is_err());
        assert!(l.check("c@x.io", "10.0.0.2".parse().unwrap()).is_ok());
    }
}
