//! courier: a stand-in key source for tests and benchmarks that is NOT quantum key
//! distribution.
//!
//! Owns a bit budget that grows at the link's `rate_bits_per_s`. Its `Link` calls it on every
//! tick at the driving end: it draws blocks from the OS CSPRNG (OpenSSL's RAND_bytes) for
//! whichever end needs them and the `Link` ships their bytes over the KME-to-KME TLS channel,
//! so both ends hold identical, identically numbered material and the pools, relay and API
//! above can be exercised; the secrecy of its blocks rests on TLS, not on physics. The other
//! end's `Link` stores the shipments itself; the courier takes no messages from the peer. BB84
//! links draw their first authentication key with [`random_bytes`] too.

use std::time::Instant;
use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::link::key_source::{Delivery, KeySource, Produced, Stream, Work};
use crate::link::LinkCore;

/// Most blocks per shipment.
const MAX_BLOCKS_PER_SHIPMENT: u64 = 16;

/// `len` fresh bytes from the OS CSPRNG.
pub fn random_bytes(len: usize) -> Result<Zeroizing<Vec<u8>>> {
    let mut bytes = Zeroizing::new(vec![0u8; len]);
    openssl::rand::rand_bytes(&mut bytes)
        .map_err(|err| Error::Unavailable(format!("CSPRNG failed: {err}")))?;
    Ok(bytes)
}

/// CSPRNG blocks shipped over the KME-to-KME channel (not QKD).
pub struct Courier {
    budget_bits: f64,
    last_tick: Instant,
}

impl Courier {
    pub fn new(block_bytes: usize) -> Self {
        // One block for each end at once: a fresh network serves its first keys right after
        // start instead of one block-time later.
        Self {
            budget_bits: (block_bytes * 16) as f64,
            last_tick: Instant::now(),
        }
    }

    /// Adds the bits `rate` earned since the last tick, up to one second's worth (at least
    /// one full shipment). Returns the whole blocks the budget pays for, at most a shipment.
    fn accrue(&mut self, rate: u64, block_bits: f64, now: Instant) -> u64 {
        let elapsed = now.duration_since(self.last_tick).as_secs_f64();
        self.last_tick = now;
        let cap = (rate as f64).max(block_bits * MAX_BLOCKS_PER_SHIPMENT as f64);
        self.budget_bits = (self.budget_bits + rate as f64 * elapsed).min(cap);
        ((self.budget_bits / block_bits) as u64).min(MAX_BLOCKS_PER_SHIPMENT)
    }
}

impl KeySource for Courier {
    fn name(&self) -> &'static str {
        "courier"
    }

    fn delivery(&self) -> Delivery {
        Delivery::Bytes
    }

    /// Turns the bit budget into blocks for whichever end needs them.
    fn drive(&mut self, link: &mut LinkCore, now: Instant) -> Work<Self, Produced> {
        let params = link.params();
        let (block_bytes, rate) = (params.block_bytes, params.rate_bits_per_s);
        let block_bits = (block_bytes * 8) as f64;
        let affordable = self.accrue(rate, block_bits, now);
        let blocks = link.wanted_blocks(affordable);
        if blocks == 0 {
            return Work::Ready(Produced::Nothing);
        }
        let produced = match random_bytes(blocks as usize * block_bytes) {
            Ok(material) => {
                self.budget_bits -= blocks as f64 * block_bits;
                Produced::Bytes {
                    material,
                    to: Stream::Pools,
                }
            }
            Err(err) => {
                link.set_health(&Err(err));
                Produced::Nothing
            }
        };
        Work::Ready(produced)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn random_bytes_are_fresh() {
        let a = random_bytes(64).unwrap();
        let b = random_bytes(64).unwrap();
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
    }

    #[test]
    fn budget_grows_with_time_up_to_one_second_or_one_shipment() {
        let block_bits = 1024.0 * 8.0;
        let mut courier = Courier::new(1024);
        let start = courier.last_tick;
        // The initial budget: two blocks.
        assert_eq!(courier.accrue(0, block_bits, start), 2);
        courier.budget_bits = 0.0;
        // 1.5 blocks a second: one block after one second, then three after two.
        let rate = (block_bits * 1.5) as u64;
        assert_eq!(
            courier.accrue(rate, block_bits, start + Duration::from_secs(1)),
            1
        );
        assert_eq!(
            courier.accrue(rate, block_bits, start + Duration::from_secs(2)),
            3
        );
        // Capped at one shipment however long the link was idle or the rate.
        let later = start + Duration::from_secs(3600);
        assert_eq!(courier.accrue(u64::MAX / 2, block_bits, later), 16);
        courier.budget_bits = 0.0;
        assert_eq!(
            courier.accrue(rate, block_bits, later + Duration::from_secs(3600)),
            16
        );
    }
}
