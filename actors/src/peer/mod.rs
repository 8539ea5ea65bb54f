//! The KME-to-KME channel, client side: `PeerLink` (one per neighbour) and the wire types
//! both ends speak (`protocol.rs`); the server side is the edge's `peer_api.rs`.

pub mod peer_link;
pub mod protocol;
