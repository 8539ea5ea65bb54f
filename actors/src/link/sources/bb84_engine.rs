//! Bb84Engine: the CPU side of one end of a BB84 link (a `SyncArbiter` of one thread per link,
//! so that channel simulation, Cascade and privacy amplification never stall the actors that
//! serve SAEs).
//!
//! Owns: the simulated quantum channel (at the Alice end, with the next frame's pulses
//! simulated ahead on a thread of their own), the random source, and the post-processing
//! state machine of the current frame (`bb84::pipeline`, whose parallel stages use scoped
//! threads of their own). Handles, all from
//! this end's `Link` (its `bb84` key source, `sources/bb84.rs`): `BeginAlice` (simulate a
//! frame's pulses; returns Bob's detection record, which the source sends over the KME-to-KME
//! channel in place of the quantum channel), `BeginBob`, `Step` (feed the peer's messages, get
//! ours back), `AbortFrame`. It never talks to the network or the database: the source carries
//! every envelope and its `Link` stores every block.

use actix::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::peer::protocol::DetectionRecord;
use crate::types::Bb84Settings;
use kme_bb84::auth::{AuthChannel, AuthKeyMaterial, Role};
use kme_bb84::bits::BitVec;
use kme_bb84::channel::{simulate_frame, BobRecord, ChannelError, ChannelFrame};
use kme_bb84::pipeline::{AbortReason, AliceFrame, BobFrame, Envelope, FrameReport, FrameStatus};

/// Where the current frame stands after a step.
#[derive(Debug, Clone, PartialEq)]
pub enum FrameState {
    Running,
    /// The frame's secret key, whole bytes (identical at both ends).
    Done(Zeroizing<Vec<u8>>),
    Aborted(AbortReason),
}

/// The answer to a step: envelopes to send to the peer, and the frame's state.
#[derive(Debug, Clone)]
pub struct Progress {
    pub out: Vec<Envelope>,
    pub state: FrameState,
    pub report: FrameReport,
}

enum Frame {
    Alice(Box<AliceFrame>),
    Bob(Box<BobFrame>),
}

struct Current {
    id: u64,
    auth: AuthChannel,
    frame: Frame,
}

/// The pulses of a frame being simulated on a thread of their own.
type PulsesAhead = std::thread::JoinHandle<std::result::Result<ChannelFrame, ChannelError>>;

pub struct Bb84Engine {
    settings: Bb84Settings,
    rng: StdRng,
    current: Option<Current>,
    /// Alice end: the next frame's pulses, simulated while this frame is post-processed (a
    /// live frame mostly waits for round trips to the Bob end, and the simulation took a
    /// sixth of an unpaced frame's time before it).
    next_pulses: Option<PulsesAhead>,
}

impl Bb84Engine {
    /// `seed`: 32 bytes from the OS CSPRNG (basis and bit choices, samples, hash seeds).
    pub fn new(settings: Bb84Settings, seed: [u8; 32]) -> Self {
        Self {
            settings,
            rng: StdRng::from_seed(seed),
            current: None,
            next_pulses: None,
        }
    }

    /// This frame's pulses: those simulated ahead if any, else simulated now. Starts the next
    /// frame's on a thread of its own (with a generator seeded from this engine's).
    fn pulses(&mut self) -> std::result::Result<ChannelFrame, ChannelError> {
        let channel = self.settings.channel.clone();
        let pulses = self.settings.pulses_per_frame;
        let ahead = self.next_pulses.take().map(|thread| thread.join());
        let frame = match ahead {
            Some(Ok(frame)) => frame,
            // No frame ahead (the first), or its thread died: simulate here.
            Some(Err(_)) | None => simulate_frame(&channel, pulses, &mut self.rng),
        };
        let mut seed = [0u8; 32];
        self.rng.fill_bytes(&mut seed);
        let mut rng = StdRng::from_seed(seed);
        // Without a thread the next frame simulates its pulses when it begins.
        self.next_pulses = std::thread::Builder::new()
            .name("bb84-pulses".into())
            .spawn(move || simulate_frame(&channel, pulses, &mut rng))
            .ok();
        frame
    }

    fn progress(&mut self, out: Vec<Envelope>) -> Progress {
        let Some(current) = self.current.as_mut() else {
            return Progress {
                out,
                state: FrameState::Aborted(AbortReason::UnexpectedMessage),
                report: FrameReport::default(),
            };
        };
        let (status, report) = match &current.frame {
            Frame::Alice(f) => (f.status().clone(), f.report()),
            Frame::Bob(f) => (f.status().clone(), f.report()),
        };
        let state = match status {
            FrameStatus::InProgress => {
                return Progress {
                    out,
                    state: FrameState::Running,
                    report,
                }
            }
            FrameStatus::Aborted(reason) => FrameState::Aborted(reason),
            FrameStatus::Done => {
                let key = match &mut current.frame {
                    Frame::Alice(f) => f.take_key(),
                    Frame::Bob(f) => f.take_key(),
                };
                match key {
                    Some(key) => FrameState::Done(key_bytes(&key)),
                    None => FrameState::Aborted(AbortReason::NoSecretKey),
                }
            }
        };
        // The frame is over: its state (and any copy of the key) goes.
        self.current = None;
        Progress { out, state, report }
    }
}

/// The key's whole bytes, little-endian per 64-bit word (a trailing partial byte is dropped
/// at both ends alike).
fn key_bytes(key: &BitVec) -> Zeroizing<Vec<u8>> {
    let mut bytes: Vec<u8> = key.words().iter().flat_map(|w| w.to_le_bytes()).collect();
    bytes.truncate(key.len() / 8);
    bytes.into()
}

impl Actor for Bb84Engine {
    type Context = SyncContext<Self>;
}

/// Alice end: simulate the pulses of a new frame. Result: its (random) ID and Bob's detection
/// record.
#[derive(Message)]
#[rtype(result = "Result<(u64, DetectionRecord)>")]
pub struct BeginAlice {
    pub auth: AuthKeyMaterial,
}

impl Handler<BeginAlice> for Bb84Engine {
    type Result = Result<(u64, DetectionRecord)>;

    fn handle(&mut self, msg: BeginAlice, _ctx: &mut SyncContext<Self>) -> Self::Result {
        let frame_id = self.rng.next_u64();
        let frame = self
            .pulses()
            .map_err(|err| Error::BadRequest(format!("BB84 channel parameters: {err}")))?;
        let auth = AuthChannel::new(Role::Alice, &msg.auth);
        let alice = AliceFrame::new(&auth, frame_id, frame.alice, frame.pulses_per_class);
        self.current = Some(Current {
            id: frame_id,
            auth,
            frame: Frame::Alice(Box::new(alice)),
        });
        let record = DetectionRecord {
            bits: frame.bob.bits,
            bases: frame.bob.bases,
        };
        Ok((frame_id, record))
    }
}

/// Bob end: a new frame from the detection record Alice's end sent. Result: the first
/// envelopes (the sifting request). Any frame still running here is dropped.
#[derive(Message)]
#[rtype(result = "Progress")]
pub struct BeginBob {
    pub frame_id: u64,
    pub auth: AuthKeyMaterial,
    pub record: DetectionRecord,
}

impl Handler<BeginBob> for Bb84Engine {
    type Result = MessageResult<BeginBob>;

    fn handle(&mut self, msg: BeginBob, _ctx: &mut SyncContext<Self>) -> Self::Result {
        let mut auth = AuthChannel::new(Role::Bob, &msg.auth);
        let record = BobRecord {
            bits: msg.record.bits,
            bases: msg.record.bases,
        };
        let mut bob = BobFrame::new(
            &self.settings.pp,
            &auth,
            msg.frame_id,
            record,
            self.rng.next_u64(),
        );
        let out = bob.start(&mut auth);
        self.current = Some(Current {
            id: msg.frame_id,
            auth,
            frame: Frame::Bob(Box::new(bob)),
        });
        MessageResult(self.progress(out))
    }
}

/// Feed the peer's envelopes of frame `frame_id`. Result: ours, and the frame's state; an
/// error if that frame is not running here (a stale or forged message: nothing to continue).
#[derive(Message)]
#[rtype(result = "Result<Progress>")]
pub struct Step {
    pub frame_id: u64,
    pub envelopes: Vec<Envelope>,
}

impl Handler<Step> for Bb84Engine {
    type Result = Result<Progress>;

    fn handle(&mut self, msg: Step, _ctx: &mut SyncContext<Self>) -> Self::Result {
        let current = match self.current.as_mut() {
            Some(current) if current.id == msg.frame_id => current,
            _ => {
                return Err(Error::PeerMessage(format!(
                    "BB84 frame {} is not running here",
                    msg.frame_id
                )))
            }
        };
        let mut out = Vec::new();
        for envelope in &msg.envelopes {
            let replies = match &mut current.frame {
                Frame::Alice(f) => f.handle(&mut current.auth, envelope),
                Frame::Bob(f) => f.handle(&mut current.auth, envelope),
            };
            out.extend(replies);
        }
        Ok(self.progress(out))
    }
}

/// Give up the frame `frame_id` (timeout, lost peer). Result: the abort notice for the peer.
#[derive(Message)]
#[rtype(result = "Vec<Envelope>")]
pub struct AbortFrame {
    pub frame_id: u64,
    pub reason: AbortReason,
}

impl Handler<AbortFrame> for Bb84Engine {
    type Result = MessageResult<AbortFrame>;

    fn handle(&mut self, msg: AbortFrame, _ctx: &mut SyncContext<Self>) -> Self::Result {
        match self.current.take() {
            Some(mut current) if current.id == msg.frame_id => {
                MessageResult(match &mut current.frame {
                    Frame::Alice(f) => f.abort(&mut current.auth, msg.reason),
                    Frame::Bob(f) => f.abort(&mut current.auth, msg.reason),
                })
            }
            other => {
                self.current = other;
                MessageResult(Vec::new())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kme_bb84::channel::ChannelParams;
    use kme_bb84::pipeline::PpConfig;

    fn settings(eve: f64) -> Bb84Settings {
        let channel = ChannelParams {
            eve_fraction: eve,
            ..ChannelParams::default()
        };
        let mut pp = PpConfig::default();
        pp.estimation.source = channel.source();
        Bb84Settings {
            // The smallest frames that keep a fair share of key under the finite-key bound.
            pulses_per_frame: channel.pulses_for_sifted(500_000.0),
            channel,
            paced: false,
            pp,
            auth_bootstrap: crate::types::AuthBootstrap::KeyFile,
        }
    }

    /// Runs one frame between two engines the way two `Link`s do, envelope lists both ways.
    async fn frame(eve: f64) -> (FrameState, FrameState) {
        let alice = SyncArbiter::start(1, move || Bb84Engine::new(settings(eve), [1; 32]));
        let bob = SyncArbiter::start(1, move || Bb84Engine::new(settings(eve), [2; 32]));
        let auth = AuthKeyMaterial::insecure_from_seed(7, 16);
        let (frame_id, record) = alice
            .send(BeginAlice { auth: auth.clone() })
            .await
            .unwrap()
            .unwrap();
        let mut from_bob = bob
            .send(BeginBob {
                frame_id,
                auth,
                record,
            })
            .await
            .unwrap();
        let mut bob_state = from_bob.state.clone();
        loop {
            let from_alice = alice
                .send(Step {
                    frame_id,
                    envelopes: from_bob.out,
                })
                .await
                .unwrap()
                .unwrap();
            if from_alice.state != FrameState::Running || from_alice.out.is_empty() {
                return (from_alice.state, bob_state);
            }
            from_bob = bob
                .send(Step {
                    frame_id,
                    envelopes: from_alice.out,
                })
                .await
                .unwrap()
                .unwrap();
            if from_bob.state != FrameState::Running {
                bob_state = from_bob.state.clone();
            }
        }
    }

    #[actix::test]
    async fn both_ends_release_the_same_key() {
        let (alice, bob) = frame(0.0).await;
        match (alice, bob) {
            (FrameState::Done(a), FrameState::Done(b)) => {
                assert_eq!(a, b);
                assert!(a.len() > 1000, "{} bytes", a.len());
            }
            other => panic!("{other:?}"),
        }
    }

    #[actix::test]
    async fn a_step_for_a_frame_not_running_is_refused() {
        let engine = SyncArbiter::start(1, || Bb84Engine::new(settings(0.0), [3; 32]));
        let step = Step {
            frame_id: 42,
            envelopes: Vec::new(),
        };
        assert!(matches!(
            engine.send(step).await.unwrap(),
            Err(Error::PeerMessage(_))
        ));
    }

    #[actix::test]
    async fn an_eavesdropper_aborts_the_frame_at_both_ends() {
        let (alice, bob) = frame(1.0).await;
        assert!(
            matches!(bob, FrameState::Aborted(AbortReason::QberTooHigh { observed, .. }) if (0.2..0.3).contains(&observed)),
            "{bob:?}"
        );
        assert!(matches!(alice, FrameState::Aborted(_)), "{alice:?}");
    }
}
