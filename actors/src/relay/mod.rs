//! The QKD network beyond neighbours: routes (`router.rs`), trusted-node relay and multicast
//! (`transport.rs`), and the one-time pad and MAC of each hop (`seal.rs`).
//!
//! **A relayed key.** The master's KME (A) asks `Router` for a tree of shortest usable paths to
//! the KMEs of the slaves. The first branch's `KeyPool` takes the key K from its link exactly
//! as for a neighbour (only positions travel); every other branch, and every trusted node
//! below, sends K sealed: K XOR a fresh pad of the next link, with a one-time Wegman–Carter
//! tag keyed by more material of that link. Legs travel in the links' ordered activation
//! batches (sequence numbers, digests and the stream high mark reject replays and reuse), so
//! a hop's material is burned durably at both of its ends before the key goes on. A KME with
//! slaves of the request holds K in `held_keys`, not retrievable. When every leg is durable,
//! A releases the relay down the tree; each KME releases the keys it holds and passes the
//! release to its branches at the same time, and answers only when all of them succeeded;
//! only then does the SAE get 200. Any failure or timeout aborts the relay down the tree:
//! held and released keys are burned, and the SAE gets 503 (a slave that retrieved its copy
//! in between keeps it: its master never received that key).
//!
//! **What is durable, and why.** Link material (pads, MAC keys, the first hop's key) is
//! consumed in the same transaction that records the leg, at both ends: after `kill -9` it is
//! never offered again. Held keys and each relay's outcome (`relays`) are durable at the KMEs
//! that serve slaves, and a repeated release or abort changes nothing there. Where a relay
//! goes next, and who sent it, live in memory for the hold time: a KME restarted mid-relay
//! knows nothing of the relay, refuses its release (it cannot tell whether branches below it
//! are waiting), and the master's KME answers 503 and aborts, which burns what it held; held
//! keys nobody settles are burned when the hold time (twice the request timeout) passes.
//!
//! **Settlement waits.** Settlements to a neighbour go in batches, one in flight plus up to
//! seven more for settlements that waited 2 ms. A KME answers a release only after its
//! branches did, so in a ring under heavy relay load in both directions the batches in flight
//! can wait on each other in a cycle; the peer timeout (half the request timeout) breaks it:
//! those relays are aborted (503), nothing is reused.
//!
//! **The one window left.** If the release reached every KME but its acknowledgement is lost
//! on the way back, the master's KME answers 503 and sends an abort after it; a KME that the
//! abort cannot reach keeps keys that the master never received (retrievable only with their
//! key_IDs, which only the master's KME knew), until they expire.

pub mod router;
pub mod seal;
pub mod transport;
