//! Cascade error correction as a two-party message exchange.
//!
//! Bob (who holds the noisy key) drives; Alice only answers parity questions about
//! her key, so her side is a stateless-looking responder. Each round is one
//! [`CascadeRequest`] → [`CascadeResponse`] pair; every parity bit Alice sends is
//! counted as leaked. Messages are serde structs so the exchange can cross a network.
//!
//! Variant (after Martinez-Mateo, Pacher, Peev, Ciurana, Martin, "Demystifying the
//! information reconciliation protocol Cascade", QIC 15, 453 (2015)):
//! * block sizes `k_1 ≈ k1_factor / QBER` rounded to a power of two, doubling each
//!   pass up to `n/2`; `passes` passes in total (default 20) so late passes with huge
//!   blocks mop up residual errors for a frame error rate well below 1e-3;
//! * all top-level block parities are requested in the first round (they are always
//!   disclosed in Cascade anyway), then binary searches run in parallel per round;
//! * every learned parity is cached and the sibling parity `parent ^ left` is inferred
//!   for free, so re-searching a block after a cascade flip re-discloses nothing;
//! * permutations are affine maps `pos -> (a pos + b) mod n` with random `a` coprime
//!   to `n`: O(1) memory, O(1) inverse, and a gather pass that is ~10x cheaper than a
//!   Fisher–Yates shuffle at 2^20 bits, which matters for the throughput target.
//!   Pass 1 uses the identity (channel errors are i.i.d.).
//!
//! Correctness does not depend on search bookkeeping: a bit is flipped only when a
//! single-bit range has a known Alice parity different from Bob's bit, i.e. only true
//! errors are ever corrected.

use crate::bits::BitVec;
use crate::math::h2;
use crate::parallel;
use rand::{rngs::StdRng, Rng, RngExt, SeedableRng};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use thiserror::Error;

/// Cascade protocol failures.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum CascadeError {
    /// Request/response belongs to a different round.
    #[error("round mismatch: expected {expected}, got {got}")]
    Round {
        /// Expected round.
        expected: u32,
        /// Received round.
        got: u32,
    },
    /// Key length announced does not match.
    #[error("key length mismatch: local {local}, remote {remote}")]
    Length {
        /// Local length.
        local: u64,
        /// Remote length.
        remote: u64,
    },
    /// A pass specification is invalid (e.g. multiplier not coprime to n).
    #[error("invalid pass specification")]
    BadPass,
    /// A query references an unknown pass or an empty/out-of-range interval.
    #[error("invalid range query")]
    BadQuery,
    /// The response has the wrong number of parities.
    #[error("response has {got} parities, expected {expected}")]
    ResponseSize {
        /// Expected count.
        expected: usize,
        /// Received count.
        got: usize,
    },
    /// Message arrived in the wrong protocol state.
    #[error("unexpected message for the current Cascade state")]
    State,
    /// Safety stop on the number of rounds.
    #[error("too many rounds")]
    TooManyRounds,
    /// More flips than possible with consistent parities: the peer's answers are
    /// inconsistent (corrupted in transit or malicious).
    #[error("inconsistent parities: correction diverged")]
    Diverged,
    /// Key too short or too long for Cascade (needs 2 <= n < 2^32).
    #[error("unsupported key length {0}")]
    KeyLength(usize),
}

/// Public tuning of Cascade (both ends need not agree: only Bob uses it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CascadeConfig {
    /// Number of passes.
    pub passes: usize,
    /// First-pass block size is about `k1_factor / qber`.
    pub k1_factor: f64,
    /// Round `k_1` to the nearest power of two (keeps binary searches balanced).
    pub k1_pow2: bool,
    /// QBER floor used for block sizing (avoids huge blocks at ~0 QBER).
    pub min_qber: f64,
    /// Abort after this many rounds (protects against a misbehaving peer).
    pub max_rounds: u32,
}

impl Default for CascadeConfig {
    fn default() -> Self {
        CascadeConfig {
            passes: 20,
            k1_factor: 5.0,
            k1_pow2: true,
            min_qber: 0.002,
            max_rounds: 20_000,
        }
    }
}

/// What counts as leaked by Cascade. Bob's questions are public too: which block he searches
/// tells whether his parity matched Alice's, so each parity Alice sends comes with one bit
/// about Bob's key (Tupkary & Lütkenhaus, "Using Cascade in quantum key distribution", 2023).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CascadeLeakage {
    /// Alice's parities and as many bits of Bob's: twice the parities (conservative).
    #[default]
    AliceAndBob,
    /// Alice's parities only, the usual count before that paper.
    AliceOnly,
}

impl CascadeLeakage {
    /// Bits counted as leaked when Alice sent `alice_parities` parities.
    pub fn count(self, alice_parities: u64) -> u64 {
        match self {
            CascadeLeakage::AliceAndBob => alice_parities.saturating_mul(2),
            CascadeLeakage::AliceOnly => alice_parities,
        }
    }
}

/// Permutation and block size of one pass: bit at position `pos` of the permuted
/// key is original bit `(mult * pos + offset) mod n`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PassSpec {
    /// Top-level block size.
    pub block_size: u32,
    /// Multiplier (coprime to n).
    pub mult: u64,
    /// Offset.
    pub offset: u64,
}

/// Parity of bits `[start, end)` of pass `pass`'s permuted key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RangeQuery {
    /// Pass index.
    pub pass: u16,
    /// First position.
    pub start: u32,
    /// One past the last position.
    pub end: u32,
}

/// Bob → Alice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CascadeRequest {
    /// Round counter (starts at 0).
    pub round: u32,
    /// Key length both sides must share.
    pub n: u64,
    /// Passes to set up; Alice answers with all their block parities.
    pub new_passes: Vec<PassSpec>,
    /// Range parities wanted.
    pub queries: Vec<RangeQuery>,
}

/// Alice → Bob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CascadeResponse {
    /// Round being answered.
    pub round: u32,
    /// For each new pass, the parities of all its top-level blocks.
    pub block_parities: Vec<BitVec>,
    /// Parities of the queried ranges, in order.
    pub parities: BitVec,
}

/// Summary of one reconciliation.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
pub struct CascadeStats {
    /// Key length.
    pub n: u64,
    /// Parity bits disclosed by Alice.
    pub leaked: u64,
    /// Bits flipped by Bob (errors corrected).
    pub corrected: u64,
    /// Request/response rounds.
    pub rounds: u32,
}

impl CascadeStats {
    /// Reconciliation efficiency `f = leaked / (n h(q))` with `q = corrected / n`.
    pub fn efficiency(&self) -> f64 {
        if self.n == 0 {
            return 0.0;
        }
        let hq = h2(self.corrected as f64 / self.n as f64);
        if hq <= 0.0 {
            return 0.0;
        }
        self.leaked as f64 / (self.n as f64 * hq)
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        let t = a % b;
        a = b;
        b = t;
    }
    a
}

fn mod_inverse(a: u64, n: u64) -> Option<u64> {
    let (mut t, mut new_t) = (0i128, 1i128);
    let (mut r, mut new_r) = (n as i128, a as i128);
    while new_r != 0 {
        let q = r / new_r;
        (t, new_t) = (new_t, t - q * new_t);
        (r, new_r) = (new_r, r - q * new_r);
    }
    if r != 1 {
        return None;
    }
    if t < 0 {
        t += n as i128;
    }
    u64::try_from(t).ok()
}

fn validate_spec(spec: &PassSpec, n: u64) -> Result<u64, CascadeError> {
    if spec.block_size == 0 || spec.mult == 0 || spec.mult >= n || spec.offset >= n {
        return Err(CascadeError::BadPass);
    }
    if gcd(spec.mult, n) != 1 {
        return Err(CascadeError::BadPass);
    }
    mod_inverse(spec.mult, n).ok_or(CascadeError::BadPass)
}

/// Gather `key` through the affine permutation into a new packed vector.
fn permute(key: &BitVec, spec: &PassSpec) -> BitVec {
    let n = key.len() as u64;
    if (spec.mult == 1 && spec.offset == 0) || n == 0 {
        return key.clone();
    }
    let src = key.words();
    let bit = |p: u64| {
        src.get((p >> 6) as usize)
            .map_or(0, |x| (x >> (p & 63)) & 1)
    };
    // p + d mod n for p, d < n, without a branch (the wrap is a coin toss for the predictor).
    let step = |p: u64, d: u64| {
        let q = p + d;
        q.min(q.wrapping_sub(n))
    };
    let mult = spec.mult % n;
    let mult16 = (16 * mult) % n;
    let mult64 = (64 * mult) % n;
    let mut words = Vec::with_capacity(src.len());
    let mut orig = spec.offset % n;
    // Four independent lanes per word (bits j*16 .. j*16+15) keep the gathers in flight.
    for _ in 0..n / 64 {
        let mut lanes = [orig; 4];
        for j in 1..4 {
            lanes[j] = step(lanes[j - 1], mult16);
        }
        let mut w = 0u64;
        for b in 0..16 {
            for (j, p) in lanes.iter_mut().enumerate() {
                w |= bit(*p) << (j * 16 + b);
                *p = step(*p, mult);
            }
        }
        words.push(w);
        orig = step(orig, mult64);
    }
    if !n.is_multiple_of(64) {
        let mut w = 0u64;
        for b in 0..n % 64 {
            w |= bit(orig) << b;
            orig = step(orig, mult);
        }
        words.push(w);
    }
    BitVec::from_words(words, key.len()).unwrap_or_default()
}

/// A pass's permuted key and the parities of its top-level blocks.
fn permuted_pass(key: &BitVec, spec: &PassSpec) -> (BitVec, BitVec) {
    let bits = permute(key, spec);
    let parities = block_parities(&bits, spec.block_size as usize);
    (bits, parities)
}

fn block_parities(bits: &BitVec, k: usize) -> BitVec {
    let n = bits.len();
    let mut out = BitVec::with_capacity(n.div_ceil(k));
    let mut s = 0;
    while s < n {
        out.push(bits.parity_range(s, (s + k).min(n)));
        s += k;
    }
    out
}

/// Alice's responder.
#[derive(Debug, Clone)]
pub struct CascadeAlice {
    key: BitVec,
    passes: Vec<BitVec>,
    leaked: u64,
    round: u32,
}

impl CascadeAlice {
    /// Wrap Alice's (reference) key.
    pub fn new(key: BitVec) -> Self {
        CascadeAlice {
            key,
            passes: Vec::new(),
            leaked: 0,
            round: 0,
        }
    }

    /// Parity bits disclosed so far.
    pub fn leaked(&self) -> u64 {
        self.leaked
    }

    /// Her key (unchanged by Cascade).
    pub fn key(&self) -> &BitVec {
        &self.key
    }

    /// Consume the responder, returning the key.
    pub fn into_key(self) -> BitVec {
        self.key
    }

    /// Answer one request.
    pub fn respond(&mut self, req: &CascadeRequest) -> Result<CascadeResponse, CascadeError> {
        if req.round != self.round {
            return Err(CascadeError::Round {
                expected: self.round,
                got: req.round,
            });
        }
        let n = self.key.len() as u64;
        if req.n != n {
            return Err(CascadeError::Length {
                local: n,
                remote: req.n,
            });
        }
        // Each pass keeps a permuted copy of the key: a bounded number, whatever Bob asks.
        if self.passes.len() + req.new_passes.len() > MAX_PASSES {
            return Err(CascadeError::BadQuery);
        }
        for spec in &req.new_passes {
            validate_spec(spec, n)?;
        }
        let key = &self.key;
        let mut block_par = Vec::with_capacity(req.new_passes.len());
        for (bits, bp) in parallel::map(&req.new_passes, |spec| permuted_pass(key, spec)) {
            self.leaked += bp.len() as u64;
            block_par.push(bp);
            self.passes.push(bits);
        }
        let mut parities = BitVec::with_capacity(req.queries.len());
        for q in &req.queries {
            let bits = self
                .passes
                .get(usize::from(q.pass))
                .ok_or(CascadeError::BadQuery)?;
            if q.start >= q.end || u64::from(q.end) > n {
                return Err(CascadeError::BadQuery);
            }
            parities.push(bits.parity_range(q.start as usize, q.end as usize));
        }
        self.leaked += parities.len() as u64;
        self.round += 1;
        Ok(CascadeResponse {
            round: req.round,
            block_parities: block_par,
            parities,
        })
    }
}

/// Most passes Alice sets up in one frame (the default configuration uses at most 20).
const MAX_PASSES: usize = 64;

/// Cheap multiplicative hasher for the per-round query index (keys are not attacker-chosen
/// in a way that matters: a bad distribution only costs time).
#[derive(Default)]
struct MixHasher(u64);

impl Hasher for MixHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }
    fn write_u16(&mut self, v: u16) {
        self.write_u64(u64::from(v));
    }
    fn write_u32(&mut self, v: u32) {
        self.write_u64(u64::from(v));
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(26) ^ v).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

#[derive(Debug, Clone)]
struct BobPass {
    spec: PassSpec,
    inv_mult: u64,
    bits: BitVec,
    alice_blocks: BitVec,
    odd: BitVec,
    /// Alice's parities learned so far, per half of a split in the binary searches: a
    /// block's searches always split the same way, so every split point `mid` of a pass is
    /// distinct and the halves left and right of it are bits `2 mid` and `2 mid + 1`. Flat
    /// bit arrays keep a block's nodes together (a hash map here cost a cache miss per
    /// lookup, a third of Cascade's time).
    known: BitVec,
    alice_nodes: BitVec,
}

impl BobPass {
    // n < 2^32 (checked in `CascadeBob::new`) and every operand is reduced mod n, so the
    // products fit in u64: a 64-bit division per pass and flip, not a 128-bit one.
    fn pos_of(&self, orig: u64, n: u64) -> u64 {
        // pos = a^{-1} (orig - b) mod n.
        let d = (orig + n - self.spec.offset) % n;
        (d * self.inv_mult) % n
    }
    fn orig_of(&self, pos: u64, n: u64) -> u64 {
        (pos * self.spec.mult + self.spec.offset) % n
    }
}

#[derive(Debug, Clone, Copy)]
struct Search {
    pass: u16,
    start: u32,
    end: u32,
    alice_parity: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BobState {
    Init,
    AwaitBlocks,
    Searching,
    Done,
}

/// Bob's driver.
#[derive(Debug, Clone)]
pub struct CascadeBob {
    key: BitVec,
    n: u64,
    plan: Vec<PassSpec>,
    passes: Vec<BobPass>,
    current: usize,
    searches: Vec<Search>,
    pending: Vec<(Search, usize)>,
    queries: Vec<RangeQuery>,
    stats: CascadeStats,
    state: BobState,
    max_rounds: u32,
}

/// First-pass block size for a QBER estimate.
pub fn first_block_size(cfg: &CascadeConfig, qber: f64, n: usize) -> usize {
    let q = qber.max(cfg.min_qber);
    let k = cfg.k1_factor / q;
    let k = if cfg.k1_pow2 {
        2f64.powi(k.log2().round() as i32)
    } else {
        k.round()
    };
    (k as usize).clamp(2, (n / 2).max(2))
}

impl CascadeBob {
    /// Prepare reconciliation of Bob's `key` given a QBER estimate; `seed` drives the
    /// (public) permutations.
    pub fn new(
        key: BitVec,
        qber_estimate: f64,
        cfg: &CascadeConfig,
        seed: u64,
    ) -> Result<Self, CascadeError> {
        let n = key.len();
        if n < 2 || u32::try_from(n).is_err() {
            return Err(CascadeError::KeyLength(n));
        }
        let n64 = n as u64;
        let mut rng = StdRng::seed_from_u64(seed);
        let mut k = first_block_size(cfg, qber_estimate, n);
        let mut plan = Vec::with_capacity(cfg.passes);
        for p in 0..cfg.passes.max(1) {
            let (mult, offset) = if p == 0 {
                (1, 0)
            } else {
                let mut a = rng.random_range(1..n64);
                while gcd(a, n64) != 1 {
                    a = rng.random_range(1..n64);
                }
                (a, rng.random_range(0..n64))
            };
            plan.push(PassSpec {
                block_size: u32::try_from(k).unwrap_or(u32::MAX),
                mult,
                offset,
            });
            k = (2 * k).min(n.div_ceil(2)).max(1);
        }
        Ok(CascadeBob {
            key,
            n: n64,
            plan,
            passes: Vec::new(),
            current: 0,
            searches: Vec::new(),
            pending: Vec::new(),
            queries: Vec::new(),
            stats: CascadeStats {
                n: n64,
                ..CascadeStats::default()
            },
            state: BobState::Init,
            max_rounds: cfg.max_rounds,
        })
    }

    /// Statistics so far.
    pub fn stats(&self) -> CascadeStats {
        self.stats
    }

    /// True once all passes are finished.
    pub fn is_done(&self) -> bool {
        self.state == BobState::Done
    }

    /// Bob's (corrected) key.
    pub fn key(&self) -> &BitVec {
        &self.key
    }

    /// Consume the driver, returning the corrected key.
    pub fn into_key(self) -> BitVec {
        self.key
    }

    /// The next request to send, or `None` when reconciliation is complete.
    pub fn next_request(&mut self) -> Result<Option<CascadeRequest>, CascadeError> {
        match self.state {
            BobState::Init => {
                self.state = BobState::AwaitBlocks;
                Ok(Some(CascadeRequest {
                    round: 0,
                    n: self.n,
                    new_passes: self.plan.clone(),
                    queries: Vec::new(),
                }))
            }
            BobState::AwaitBlocks => Err(CascadeError::State),
            BobState::Done => Ok(None),
            BobState::Searching => {
                if !self.queries.is_empty() {
                    // Request already built but not yet answered.
                    return Err(CascadeError::State);
                }
                loop {
                    self.advance();
                    if self.stats.corrected > self.n / 2 {
                        return Err(CascadeError::Diverged);
                    }
                    if !self.queries.is_empty() {
                        if self.stats.rounds >= self.max_rounds {
                            return Err(CascadeError::TooManyRounds);
                        }
                        return Ok(Some(CascadeRequest {
                            round: self.stats.rounds,
                            n: self.n,
                            new_passes: Vec::new(),
                            queries: self.queries.clone(),
                        }));
                    }
                    // No open searches: move to the next pass.
                    self.current += 1;
                    if self.current >= self.passes.len() {
                        self.state = BobState::Done;
                        return Ok(None);
                    }
                    self.seed_pass(self.current);
                }
            }
        }
    }

    /// Consume Alice's answer to the last request.
    pub fn handle_response(&mut self, resp: &CascadeResponse) -> Result<(), CascadeError> {
        if resp.round != self.stats.rounds {
            return Err(CascadeError::Round {
                expected: self.stats.rounds,
                got: resp.round,
            });
        }
        match self.state {
            BobState::AwaitBlocks => {
                if resp.block_parities.len() != self.plan.len() || !resp.parities.is_empty() {
                    return Err(CascadeError::ResponseSize {
                        expected: self.plan.len(),
                        got: resp.block_parities.len(),
                    });
                }
                let inverses = self
                    .plan
                    .iter()
                    .map(|spec| validate_spec(spec, self.n))
                    .collect::<Result<Vec<_>, _>>()?;
                let key = &self.key;
                let permuted = parallel::map(&self.plan, |spec| permuted_pass(key, spec));
                let passes = self.plan.iter().zip(inverses).zip(permuted);
                for (((spec, inv_mult), (bits, mine)), alice_blocks) in
                    passes.zip(resp.block_parities.iter())
                {
                    if mine.len() != alice_blocks.len() {
                        return Err(CascadeError::ResponseSize {
                            expected: mine.len(),
                            got: alice_blocks.len(),
                        });
                    }
                    self.stats.leaked += alice_blocks.len() as u64;
                    let nodes = 2 * self.key.len();
                    self.passes.push(BobPass {
                        known: BitVec::zeros(nodes),
                        alice_nodes: BitVec::zeros(nodes),
                        spec: *spec,
                        inv_mult,
                        bits,
                        odd: mine.xor(alice_blocks),
                        alice_blocks: alice_blocks.clone(),
                    });
                }
                self.stats.rounds += 1;
                self.state = BobState::Searching;
                self.current = 0;
                self.seed_pass(0);
                Ok(())
            }
            BobState::Searching => {
                if resp.parities.len() != self.queries.len() || !resp.block_parities.is_empty() {
                    return Err(CascadeError::ResponseSize {
                        expected: self.queries.len(),
                        got: resp.parities.len(),
                    });
                }
                self.stats.leaked += resp.parities.len() as u64;
                self.stats.rounds += 1;
                // A query is the left half of a split: it ends at the split point.
                let answered = std::mem::take(&mut self.queries);
                for (q, i) in answered.iter().zip(0..) {
                    self.learn(q.pass, Self::slot(q.end, false), resp.parities.get(i));
                }
                let pending = std::mem::take(&mut self.pending);
                for (mut s, qi) in pending {
                    let a_l = resp.parities.get(qi);
                    self.step(&mut s, a_l);
                    self.searches.push(s);
                }
                Ok(())
            }
            _ => Err(CascadeError::State),
        }
    }

    fn seed_pass(&mut self, p: usize) {
        let Some(pass) = self.passes.get(p) else {
            return;
        };
        let k = pass.spec.block_size as usize;
        let n = self.n as usize;
        for b in pass.odd.ones() {
            let start = b * k;
            self.searches.push(Search {
                pass: p as u16,
                start: start as u32,
                end: (start + k).min(n) as u32,
                alice_parity: pass.alice_blocks.get(b),
            });
        }
    }

    fn bob_parity(&self, pass: u16, start: u32, end: u32) -> bool {
        self.passes
            .get(usize::from(pass))
            .is_some_and(|p| p.bits.parity_range(start as usize, end as usize))
    }

    /// Bit index of the half left (`right` false) or right of split `mid`.
    fn slot(mid: u32, right: bool) -> usize {
        2 * mid as usize + usize::from(right)
    }

    fn learn(&mut self, pass: u16, slot: usize, alice_parity: bool) {
        if let Some(p) = self.passes.get_mut(usize::from(pass)) {
            p.known.set(slot, true);
            p.alice_nodes.set(slot, alice_parity);
        }
    }

    fn learned(&self, pass: u16, slot: usize) -> Option<bool> {
        let p = self.passes.get(usize::from(pass))?;
        p.known.get(slot).then(|| p.alice_nodes.get(slot))
    }

    /// Narrow a search with the known Alice parity of its left half, and remember the
    /// inferred right-half parity.
    fn step(&mut self, s: &mut Search, a_left: bool) {
        let mid = s.start + (s.end - s.start) / 2;
        let a_right = s.alice_parity ^ a_left;
        self.learn(s.pass, Self::slot(mid, true), a_right);
        if self.bob_parity(s.pass, s.start, mid) != a_left {
            s.end = mid;
            s.alice_parity = a_left;
        } else {
            s.start = mid;
            s.alice_parity = a_right;
        }
    }

    /// Run every open search as far as cached parities allow; collect the queries
    /// needed for the next round.
    fn advance(&mut self) {
        let mut waiting: Vec<(Search, usize)> = Vec::new();
        let mut index: HashMap<(u16, usize), usize, BuildHasherDefault<MixHasher>> =
            HashMap::with_capacity_and_hasher(self.searches.len(), Default::default());
        while let Some(mut s) = self.searches.pop() {
            if self.stats.corrected > self.n / 2 {
                break; // diverging on inconsistent parities; caller reports it
            }
            if self.bob_parity(s.pass, s.start, s.end) == s.alice_parity {
                continue; // became even through flips elsewhere
            }
            loop {
                if s.end - s.start == 1 {
                    self.flip(s.pass, s.start);
                    break;
                }
                let mid = s.start + (s.end - s.start) / 2;
                let left = Self::slot(mid, false);
                if let Some(a_l) = self.learned(s.pass, left) {
                    self.step(&mut s, a_l);
                    continue;
                }
                let q = RangeQuery {
                    pass: s.pass,
                    start: s.start,
                    end: mid,
                };
                let qi = *index.entry((s.pass, left)).or_insert_with(|| {
                    self.queries.push(q);
                    self.queries.len() - 1
                });
                waiting.push((s, qi));
                break;
            }
        }
        self.pending = waiting;
    }

    fn flip(&mut self, pass: u16, pos: u32) {
        let n = self.n;
        let Some(orig) = self
            .passes
            .get(usize::from(pass))
            .map(|p| p.orig_of(u64::from(pos), n))
        else {
            return;
        };
        self.key.flip(orig as usize);
        self.stats.corrected += 1;
        let current = self.current;
        for (q, p) in self.passes.iter_mut().enumerate() {
            let pq = p.pos_of(orig, n) as usize;
            p.bits.flip(pq);
            let k = p.spec.block_size as usize;
            let blk = pq / k;
            p.odd.flip(blk);
            if q <= current && p.odd.get(blk) {
                let start = blk * k;
                self.searches.push(Search {
                    pass: q as u16,
                    start: start as u32,
                    end: (start + k).min(n as usize) as u32,
                    alice_parity: p.alice_blocks.get(blk),
                });
            }
        }
    }
}

/// Run Cascade between two in-memory keys; returns Bob's corrected key and stats.
/// Messages are round-tripped through the same structs a network transport would use.
pub fn reconcile_in_process(
    alice_key: &BitVec,
    bob_key: &BitVec,
    qber_estimate: f64,
    cfg: &CascadeConfig,
    seed: u64,
) -> Result<(BitVec, CascadeStats), CascadeError> {
    let mut alice = CascadeAlice::new(alice_key.clone());
    let mut bob = CascadeBob::new(bob_key.clone(), qber_estimate, cfg, seed)?;
    while let Some(req) = bob.next_request()? {
        let resp = alice.respond(&req)?;
        bob.handle_response(&resp)?;
    }
    let stats = bob.stats();
    debug_assert_eq!(stats.leaked, alice.leaked());
    Ok((bob.into_key(), stats))
}

/// Apply i.i.d. bit flips with probability `qber` (test/bench helper).
pub fn add_noise<R: Rng + ?Sized>(key: &BitVec, qber: f64, rng: &mut R) -> BitVec {
    let mut out = key.clone();
    let thr = (qber.clamp(0.0, 1.0) * 18_446_744_073_709_551_615.0) as u64;
    for i in 0..key.len() {
        if rng.next_u64() < thr {
            out.flip(i);
        }
    }
    out
}

/// Uniformly random key of `n` bits (test/bench helper).
pub fn random_key<R: Rng + ?Sized>(n: usize, rng: &mut R) -> BitVec {
    let mut words: Vec<u64> = (0..n.div_ceil(64)).map(|_| rng.next_u64()).collect();
    if !n.is_multiple_of(64) {
        if let Some(w) = words.last_mut() {
            *w &= (1u64 << (n % 64)) - 1;
        }
    }
    BitVec::from_words(words, n).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permute_gathers_bit_i_from_offset_plus_i_times_mult() {
        let mut rng = StdRng::seed_from_u64(9);
        for n in [1usize, 63, 64, 65, 127, 1000, 4096, 10_007] {
            let key = random_key(n, &mut rng);
            for (mult, offset) in [(1u64, 0u64), (1, 5), (3, 0), (7, 11), (n as u64 - 1, 2)] {
                let (mult, offset) = (mult % n as u64, offset % n as u64);
                if mult == 0 || gcd(mult, n as u64) != 1 {
                    continue;
                }
                let spec = PassSpec {
                    block_size: 8,
                    mult,
                    offset,
                };
                let got = permute(&key, &spec);
                assert_eq!(got.len(), n);
                for i in 0..n as u64 {
                    let src = ((offset as u128 + i as u128 * mult as u128) % n as u128) as usize;
                    assert_eq!(
                        got.get(i as usize),
                        key.get(src),
                        "n {n} mult {mult} bit {i}"
                    );
                }
            }
        }
    }

    #[test]
    fn alice_refuses_more_passes_than_she_would_ever_need() {
        let mut alice = CascadeAlice::new(BitVec::from_bools((0..1000).map(|i| i % 3 == 0)));
        let spec = PassSpec {
            block_size: 8,
            mult: 3,
            offset: 1,
        };
        let request = |passes: usize, round: u32| CascadeRequest {
            round,
            n: 1000,
            new_passes: vec![spec; passes],
            queries: Vec::new(),
        };
        assert_eq!(
            alice.respond(&request(MAX_PASSES + 1, 0)),
            Err(CascadeError::BadQuery)
        );
        assert!(alice.respond(&request(MAX_PASSES, 0)).is_ok());
        assert_eq!(alice.respond(&request(1, 1)), Err(CascadeError::BadQuery));
    }

    fn run(a: &BitVec, b: &BitVec, q: f64, seed: u64) -> (BitVec, CascadeStats) {
        reconcile_in_process(a, b, q, &CascadeConfig::default(), seed).unwrap()
    }

    #[test]
    fn zero_errors() {
        let mut rng = StdRng::seed_from_u64(1);
        let a = random_key(10_000, &mut rng);
        let (b, st) = run(&a, &a, 0.01, 2);
        assert_eq!(a, b);
        assert_eq!(st.corrected, 0);
    }

    #[test]
    fn single_error_anywhere() {
        let mut rng = StdRng::seed_from_u64(3);
        let a = random_key(4_099, &mut rng);
        for pos in [0usize, 1, 63, 64, 2048, 4_098] {
            let mut b = a.clone();
            b.flip(pos);
            let (c, st) = run(&a, &b, 0.01, pos as u64);
            assert_eq!(c, a, "pos {pos}");
            assert_eq!(st.corrected, 1);
        }
    }

    #[test]
    fn burst_errors() {
        let mut rng = StdRng::seed_from_u64(4);
        let a = random_key(20_000, &mut rng);
        let mut b = a.clone();
        for i in 5_000..5_040 {
            b.flip(i);
        }
        for i in (12_000..12_400).step_by(3) {
            b.flip(i);
        }
        let (c, _) = run(&a, &b, 0.01, 9);
        assert_eq!(c, a);
    }

    #[test]
    fn random_errors_several_qbers() {
        let mut rng = StdRng::seed_from_u64(5);
        for q in [0.005, 0.01, 0.02, 0.05, 0.08, 0.11] {
            for t in 0..3 {
                let a = random_key(1 << 15, &mut rng);
                let b = add_noise(&a, q, &mut rng);
                let (c, st) = run(&a, &b, q, t);
                assert_eq!(c, a, "q={q} t={t}");
                assert_eq!(st.corrected as usize, a.hamming(&b));
                assert!(st.efficiency() < 1.35, "q={q} f={}", st.efficiency());
            }
        }
    }

    #[test]
    fn messages_serialize() {
        let mut rng = StdRng::seed_from_u64(6);
        let a = random_key(5_000, &mut rng);
        let b = add_noise(&a, 0.03, &mut rng);
        let mut alice = CascadeAlice::new(a.clone());
        let mut bob = CascadeBob::new(b, 0.03, &CascadeConfig::default(), 1).unwrap();
        while let Some(req) = bob.next_request().unwrap() {
            let req: CascadeRequest =
                serde_json::from_str(&serde_json::to_string(&req).unwrap()).unwrap();
            let resp = alice.respond(&req).unwrap();
            let resp: CascadeResponse =
                serde_json::from_str(&serde_json::to_string(&resp).unwrap()).unwrap();
            bob.handle_response(&resp).unwrap();
        }
        assert_eq!(bob.stats().leaked, alice.leaked());
        assert_eq!(bob.into_key(), a);
    }

    #[test]
    fn rejects_bad_requests() {
        let mut alice = CascadeAlice::new(BitVec::zeros(100));
        let bad = CascadeRequest {
            round: 0,
            n: 100,
            new_passes: vec![PassSpec {
                block_size: 8,
                mult: 10,
                offset: 0,
            }],
            queries: vec![],
        };
        assert_eq!(alice.respond(&bad), Err(CascadeError::BadPass));
        let bad_q = CascadeRequest {
            round: 0,
            n: 100,
            new_passes: vec![],
            queries: vec![RangeQuery {
                pass: 3,
                start: 0,
                end: 4,
            }],
        };
        assert_eq!(alice.respond(&bad_q), Err(CascadeError::BadQuery));
    }
}
