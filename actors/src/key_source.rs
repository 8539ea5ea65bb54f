//! Key sources: where a link's secret material comes from, behind one trait.
//!
//! `Link` asks its source for blocks at the generating end of a link. The only source today is
//! `Courier`: a stand-in that is NOT quantum key distribution. It draws blocks from the OS
//! CSPRNG (OpenSSL's RAND_bytes) and `Link` ships them to the other end over the authenticated
//! KME-to-KME TLS channel, so both ends hold identical, identically numbered material and the
//! pools, relay and API above can be exercised. A BB84 or device source replaces it here
//! without touching the pools.

use crate::error::{Error, Result};
use crate::types::SourceKind;

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

/// The source configured for a link.
pub fn for_kind(kind: SourceKind) -> Box<dyn KeySource> {
    match kind {
        SourceKind::Courier => Box::new(Courier),
    }
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
