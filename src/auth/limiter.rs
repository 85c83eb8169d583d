//! Rate limits: login attempts per account and per peer address, orders per user; each "N per
//! minute" as SPEC §7 words it, counted over a sliding minute (`Window`).
//!
//! Every login attempt counts, for unknown emails alike; while a limit holds even the right password
//! is refused. Limits are per process: with several API instances the effective limit is multiplied
//! by their number (documented in docs/security.md).

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hash, RandomState};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};

/// The limiter's clock ticks in tenths of a second; an admission counts for the minute that starts
/// with its tick (600 ticks), so a `Retry-After` is never more than 60 s, and no window of 59.9 s
/// ever holds more than the limit.
const TICK_MS: u64 = 100;
const SPAN_TICKS: u64 = 60_000 / TICK_MS;

fn tick(at: Duration) -> u64 {
    (at.as_millis() / u128::from(TICK_MS)) as u64
}

/// Shards of a window's map (a lock each), so that concurrent requests rarely wait on each other.
const SHARDS: usize = 16;

/// What one key was admitted in the last minute: per tick that admitted any, how many; oldest
/// first. Never more entries than the limit or than a minute's ticks: a key's state is bounded
/// whatever its traffic.
#[derive(Default)]
struct Admitted {
    ticks: VecDeque<(u64, u32)>,
    total: u32,
}

impl Admitted {
    /// Forgets what no longer counts at tick `now`.
    fn expire(&mut self, now: u64) {
        while let Some(&(s, n)) = self.ticks.front() {
            if s + SPAN_TICKS > now {
                break;
            }
            self.total -= n;
            self.ticks.pop_front();
        }
    }

    /// How long from `at` until one more would be admitted under `limit` (`limit` ≥ 1).
    fn wait(&self, limit: u32, at: Duration) -> Duration {
        let mut left = self.total;
        for &(s, n) in &self.ticks {
            left -= n;
            if left < limit {
                return Duration::from_millis((s + SPAN_TICKS) * TICK_MS).saturating_sub(at);
            }
        }
        Duration::ZERO
    }
}

/// A keyed limit of `limit` admissions per sliding minute: an action is admitted when fewer than
/// `limit` of the key's were admitted in the last minute (counted by the tenth of a second);
/// refused ones do not count. Unlike a token bucket (governor's GCRA, used here
/// before), which admits a full burst and then refills steadily, so that up to about twice the
/// limit passed in a minute, no minute ever admits more than `limit`.
pub struct Window<K> {
    limit: u32,
    epoch: Instant,
    hasher: RandomState,
    shards: Box<[Mutex<HashMap<K, Admitted>>]>,
}

impl<K: Hash + Eq + Clone> Window<K> {
    /// A window admitting `limit` actions per key per minute (at least 1).
    pub fn per_minute(limit: u32) -> Self {
        Self {
            limit: limit.max(1),
            epoch: Instant::now(),
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    fn shard(&self, key: &K) -> std::sync::MutexGuard<'_, HashMap<K, Admitted>> {
        let i = (self.hasher.hash_one(key) as usize) % SHARDS;
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits one action of `key` at `at` (time since the window's epoch), or says how long until
    /// it would be admitted.
    pub fn admit_at(&self, key: &K, at: Duration) -> Result<(), Duration> {
        let now = tick(at);
        let mut map = self.shard(key);
        let a = map.entry(key.clone()).or_default();
        a.expire(now);
        if a.total >= self.limit {
            return Err(a.wait(self.limit, at).max(Duration::from_millis(1)));
        }
        a.total += 1;
        match a.ticks.back_mut() {
            Some((s, n)) if *s == now => *n += 1,
            _ => a.ticks.push_back((now, 1)),
        }
        Ok(())
    }

    /// Takes back the last admission of `key` (made at `at`): an action another limit then refused
    /// does not count.
    pub fn take_back_at(&self, key: &K, at: Duration) {
        let mut map = self.shard(key);
        if let Some(a) = map.get_mut(key)
            && let Some((s, n)) = a.ticks.back_mut()
            && *s == tick(at)
        {
            *n -= 1;
            a.total -= 1;
            if *n == 0 {
                a.ticks.pop_back();
            }
        }
    }

    /// Forgets the keys of which nothing counts any more at `at`, bounding memory.
    pub fn forget_idle_at(&self, at: Duration) {
        let now = tick(at);
        for shard in self.shards.iter() {
            let mut map = shard.lock().unwrap_or_else(|p| p.into_inner());
            map.retain(|_, a| {
                a.expire(now);
                a.total > 0
            });
        }
    }

    /// Time since the window's epoch (its clock).
    pub fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    /// How many keys the window holds (for the tests of forgetting).
    #[cfg(test)]
    fn keys(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }
}

/// Keyed per-minute limits for logins.
#[derive(Clone)]
pub struct LoginLimiter {
    per_account: Arc<Window<[u8; 32]>>,
    per_address: Arc<Window<IpAddr>>,
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

impl LoginLimiter {
    /// Limits allowing `per_account` and `per_address` attempts per minute.
    pub fn new(per_account: u32, per_address: u32) -> Self {
        Self {
            per_account: Arc::new(Window::per_minute(per_account)),
            per_address: Arc::new(Window::per_minute(per_address)),
        }
    }

    /// Counts one attempt; `Err(wait)` when a limit holds (the attempt then counts in neither).
    pub fn check(&self, email: &str, addr: IpAddr) -> Result<(), Duration> {
        let at = self.per_address.now();
        self.check_at(email, addr, at)
    }

    fn check_at(&self, email: &str, addr: IpAddr, at: Duration) -> Result<(), Duration> {
        let address = address_key(addr);
        self.per_address.admit_at(&address, at)?;
        if let Err(wait) = self.per_account.admit_at(&account_key(email), at) {
            self.per_address.take_back_at(&address, at);
            return Err(wait);
        }
        Ok(())
    }

    /// Forgets keys of which nothing counts any more, bounding memory.
    pub fn shrink(&self) {
        let at = self.per_address.now();
        self.per_address.forget_idle_at(at);
        self.per_account.forget_idle_at(at);
    }
}

/// A per-user limit on placing orders (0 = off).
#[derive(Clone)]
pub struct UserLimiter {
    inner: Option<Arc<Window<i32>>>,
}

impl UserLimiter {
    /// A limiter allowing `per_minute_limit` actions per user; 0 disables it.
    pub fn new(per_minute_limit: u32) -> Self {
        Self {
            inner: (per_minute_limit > 0).then(|| Arc::new(Window::per_minute(per_minute_limit))),
        }
    }

    /// Counts one action; `Err(wait)` when the limit holds.
    pub fn check(&self, user_id: i32) -> Result<(), Duration> {
        let Some(w) = &self.inner else { return Ok(()) };
        w.admit_at(&user_id, w.now())
    }

    /// Forgets idle keys.
    pub fn shrink(&self) {
        if let Some(w) = &self.inner {
            w.forget_idle_at(w.now());
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
        assert!(wait > Duration::from_secs(59) && wait <= Duration::from_secs(60));
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

    fn secs(s: f64) -> Duration {
        Duration::from_millis((s * 1000.0).round() as u64)
    }

    #[test]
    fn a_window_admits_its_limit_then_says_when_the_oldest_stops_counting() {
        let w = Window::per_minute(3);
        assert!(w.admit_at(&1, secs(10.2)).is_ok());
        assert!(w.admit_at(&1, secs(10.9)).is_ok());
        assert!(w.admit_at(&1, secs(30.0)).is_ok());
        // The first counts until 70.2, the second until 70.9.
        let wait = w.admit_at(&1, secs(40.5)).unwrap_err();
        assert_eq!(wait, secs(29.7));
        assert!(w.admit_at(&1, secs(70.19)).is_err(), "still within the minute");
        assert!(
            w.admit_at(&2, secs(40.5)).is_ok(),
            "another key has its own minute"
        );
        assert!(w.admit_at(&1, secs(70.2)).is_ok());
        assert_eq!(w.admit_at(&1, secs(70.5)).unwrap_err(), secs(0.4));
        assert!(w.admit_at(&1, secs(70.9)).is_ok());
        // Full again: the one of 30.0 counts until 90.0.
        assert_eq!(w.admit_at(&1, secs(71.5)).unwrap_err(), secs(18.5));
    }

    #[test]
    fn no_minute_ever_admits_more_than_the_limit_and_a_steady_client_gets_it() {
        // A client trying every 50 ms for ten minutes: a token bucket of the same figure let
        // about twice the limit through in its first minute.
        let limit = 25;
        let w = Window::per_minute(limit);
        let mut admitted = Vec::new();
        for i in 0..12_000u64 {
            let at = Duration::from_millis(i * 50);
            if w.admit_at(&7, at).is_ok() {
                admitted.push(at);
            }
        }
        for (k, &from) in admitted.iter().enumerate() {
            let within = admitted[k..]
                .iter()
                .take_while(|&&t| t < from + secs(59.9))
                .count();
            assert!(
                within <= limit as usize,
                "{within} admitted in the minute from {from:?}"
            );
        }
        // Ten minutes: ten times the limit, no fewer.
        assert_eq!(admitted.len(), 10 * limit as usize);
    }

    #[test]
    fn refused_attempts_do_not_count_and_idle_keys_are_forgotten() {
        let w = Window::per_minute(1);
        assert!(w.admit_at(&1, secs(0.5)).is_ok());
        for k in 0..100 {
            assert!(w.admit_at(&1, secs(1.0 + f64::from(k) * 0.5)).is_err());
        }
        assert!(
            w.admit_at(&1, secs(60.5)).is_ok(),
            "refusals did not push the minute on"
        );
        assert!(w.admit_at(&2, secs(61.0)).is_ok());
        w.take_back_at(&2, secs(61.05));
        assert!(w.admit_at(&2, secs(61.3)).is_ok(), "taken back");
        assert_eq!(w.keys(), 2);
        w.forget_idle_at(secs(121.29));
        assert_eq!(w.keys(), 1, "the second still counts");
        w.forget_idle_at(secs(121.3));
        assert_eq!(w.keys(), 0);
    }

    #[test]
    fn a_login_refused_by_its_account_does_not_count_for_its_address() {
        let l = LoginLimiter::new(1, 2);
        let ip: IpAddr = "10.0.0.9".parse().unwrap();
        assert!(l.check_at("a@x.io", ip, secs(1.0)).is_ok());
        for _ in 0..5 {
            assert!(l.check_at("a@x.io", ip, secs(2.0)).is_err());
        }
        assert!(
            l.check_at("b@x.io", ip, secs(3.0)).is_ok(),
            "the address's second attempt"
        );
        assert!(
            l.check_at("c@x.io", ip, secs(4.0)).is_err(),
            "the address's third"
        );
    }
}
