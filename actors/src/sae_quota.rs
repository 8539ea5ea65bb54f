//! Per-SAE rate limits: token buckets of requests per second and keys per second, kept by the
//! SAE's own KME (owned by `SaeRegistry`, which asks before it spends anything).
//!
//! One SAE in a loop would otherwise drain a link's pool (every other SAE of that link gets
//! 503) and park keys at the slave's KME. Each bucket holds one second of its rate, so a burst
//! of a second's worth passes at once and a steady stream at the rate never waits. Over a
//! limit the request is refused before anything is taken: 503 with the time until it would
//! pass (`Retry-After`) and the limit's name. The cap on keys waiting per SAE pair
//! (`max_waiting_keys`) is kept here too, and enforced by `SaeRegistry` from the slave KMEs'
//! counts.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use crate::error::{Error, Result};
use crate::types::SaeId;

/// The limits of one SAE (from `[sae_defaults]`, overridden per `[[sae]]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SaeLimits {
    /// Requests of any kind (status, enc_keys, dec_keys) per second.
    pub requests_per_s: NonZeroU32,
    /// Keys asked for by enc_keys plus keys retrieved by dec_keys, per second.
    pub keys_per_s: NonZeroU32,
    /// Most keys of this SAE (as master) waiting for one slave at the slave's KME.
    pub max_waiting_keys: u64,
}

impl Default for SaeLimits {
    /// Far above what a well-behaved SAE asks, low enough that one looping SAE cannot take a
    /// link's whole output (operators set theirs in the network file).
    fn default() -> Self {
        Self {
            requests_per_s: NonZeroU32::MIN.saturating_add(999),
            keys_per_s: NonZeroU32::MIN.saturating_add(9_999),
            max_waiting_keys: 100_000,
        }
    }
}

struct Buckets {
    requests: DefaultDirectRateLimiter,
    keys: DefaultDirectRateLimiter,
}

impl Buckets {
    fn new(limits: SaeLimits) -> Self {
        Self {
            requests: RateLimiter::direct(Quota::per_second(limits.requests_per_s)),
            keys: RateLimiter::direct(Quota::per_second(limits.keys_per_s)),
        }
    }
}

/// The buckets of this KME's SAEs, made on first use (one per registered SAE at most).
pub struct SaeQuotas {
    default: SaeLimits,
    per_sae: HashMap<SaeId, SaeLimits>,
    buckets: HashMap<SaeId, Buckets>,
    clock: DefaultClock,
    /// Keys admitted per SAE since the start (asked for by enc_keys, retrieved by dec_keys).
    usage: HashMap<SaeId, u64>,
}

impl SaeQuotas {
    pub fn new(default: SaeLimits, per_sae: HashMap<SaeId, SaeLimits>) -> Self {
        Self {
            default,
            per_sae,
            buckets: HashMap::new(),
            clock: DefaultClock::default(),
            usage: HashMap::new(),
        }
    }

    /// New limits per SAE (a reload): the buckets of SAEs whose limits stay keep their
    /// tokens, the others start full with their new limits.
    pub fn set_limits(&mut self, per_sae: HashMap<SaeId, SaeLimits>) {
        self.buckets
            .retain(|sae, _| per_sae.get(sae) == self.per_sae.get(sae));
        self.per_sae = per_sae;
    }

    fn limits(&self, sae: &SaeId) -> SaeLimits {
        self.per_sae.get(sae).copied().unwrap_or(self.default)
    }

    /// Keys admitted for `sae` since the start.
    pub fn usage(&self, sae: &SaeId) -> u64 {
        self.usage.get(sae).copied().unwrap_or(0)
    }

    /// `max_waiting_keys` of master SAE `sae` (of any KME).
    pub fn max_waiting_keys(&self, sae: &SaeId) -> u64 {
        self.limits(sae).max_waiting_keys
    }

    fn buckets(&mut self, sae: &SaeId) -> &Buckets {
        let limits = self.limits(sae);
        self.buckets
            .entry(sae.clone())
            .or_insert_with(|| Buckets::new(limits))
    }

    /// One request of `sae`: refused (nothing taken) when over `requests_per_s`.
    pub fn admit_request(&mut self, sae: &SaeId) -> Result<()> {
        let limit = self.limits(sae).requests_per_s;
        let now = self.clock.now();
        match self.buckets(sae).requests.check() {
            Ok(()) => Ok(()),
            Err(not_until) => Err(over(
                sae,
                format!("requests_per_s ({limit} requests/s)"),
                not_until.wait_time_from(now),
            )),
        }
    }

    /// `keys` keys for `sae`: refused (nothing taken) when over `keys_per_s`; a request for more
    /// keys than one second's worth can never pass, and is a bad request.
    pub fn admit_keys(&mut self, sae: &SaeId, keys: u32) -> Result<()> {
        let Some(keys) = NonZeroU32::new(keys) else {
            return Ok(());
        };
        let limit = self.limits(sae).keys_per_s;
        let now = self.clock.now();
        match self.buckets(sae).keys.check_n(keys) {
            Ok(Ok(())) => {
                *self.usage.entry(sae.clone()).or_default() += u64::from(keys.get());
                Ok(())
            }
            Ok(Err(not_until)) => Err(over(
                sae,
                format!("keys_per_s ({limit} keys/s)"),
                not_until.wait_time_from(now),
            )),
            Err(_) => Err(Error::BadRequest(format!(
                "{keys} keys in one request exceed {sae}'s keys_per_s ({limit} keys/s)"
            ))),
        }
    }
}

fn over(sae: &SaeId, limit: String, wait: Duration) -> Error {
    Error::OverLimit {
        message: format!("{sae} is over its {limit}; retry later"),
        retry_after: wait,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quotas(requests: u32, keys: u32) -> SaeQuotas {
        let limits = SaeLimits {
            requests_per_s: NonZeroU32::new(requests).unwrap(),
            keys_per_s: NonZeroU32::new(keys).unwrap(),
            max_waiting_keys: 10,
        };
        SaeQuotas::new(limits, HashMap::new())
    }

    #[test]
    fn a_second_of_requests_passes_then_the_next_waits_with_a_retry_time() {
        let mut q = quotas(3, 1000);
        let sae = SaeId::new("sae-a");
        for _ in 0..3 {
            q.admit_request(&sae).unwrap();
        }
        match q.admit_request(&sae) {
            Err(Error::OverLimit {
                message,
                retry_after,
            }) => {
                assert!(
                    message.contains("requests_per_s (3 requests/s)"),
                    "{message}"
                );
                assert!(retry_after > Duration::ZERO && retry_after <= Duration::from_secs(1));
            }
            other => panic!("{other:?}"),
        }
        // Each SAE has its own buckets.
        q.admit_request(&SaeId::new("sae-b")).unwrap();
    }

    #[test]
    fn keys_are_counted_per_key_and_an_impossible_request_is_a_bad_request() {
        let mut q = quotas(100, 10);
        let sae = SaeId::new("sae-a");
        q.admit_keys(&sae, 8).unwrap();
        assert!(matches!(
            q.admit_keys(&sae, 3),
            Err(Error::OverLimit { .. })
        ));
        // Refused requests took nothing: two keys still pass.
        q.admit_keys(&sae, 2).unwrap();
        assert!(matches!(q.admit_keys(&sae, 11), Err(Error::BadRequest(_))));
    }
}
