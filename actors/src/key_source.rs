//! Key sources: where a link's secret material comes from, behind one trait.
//!
//! A source here hands out blocks at the driving end of a link, which `Link` ships to the
//! other end over the authenticated KME-to-KME TLS channel. The one such source is `Courier`:
//! a stand-in that is NOT quantum key distribution. It draws blocks from the OS CSPRNG
//! (OpenSSL's RAND_bytes), so both ends hold identical, identically numbered material and the
//! pools, relay and API above can be exercised; BB84 links use it only for their first
//! authentication key. BB84 itself is interactive (both ends compute the key, none ships it):
//! `Link` drives it through `Bb84Engine`, and it feeds the same blocks and pools.

use crate::error::{Error, Result};

pub trait KeySource {
    /// Short name for logs and status.
    fn name(&self) -> &'static str;
    /// A fresh block of `bytes` secret bytes, to be shared with the other end.
    fn next_block(&mut self, bytes: usize) -> Result<Vec<u8>>;
}

/// CSPRNG blocks shipped over the KME-to-KME channel (not QKD).
pub struct Courier;

impl KeySource for Courier {
    fn name(&self) -> &'static str {
        "courier"
    }

    fn next_block(&mut self, bytes: usize) -> Result<Vec<u8>> {
        let mut block = vec![0u8; bytes];
        openssl::rand::rand_bytes(&mut block)
            .map_err(|err| Error::Unavailable(format!("CSPRNG failed: {err}")))?;
        Ok(block)
    }
}

/// The CSPRNG courier.
pub fn courier() -> Box<dyn KeySource> {
    Box::new(Courier)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn courier_blocks_are_fresh() {
        let mut source = Courier;
        let a = source.next_block(64).unwrap();
        let b = source.next_block(64).unwrap();
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
    }
}
