//! bb84: the BB84 key source (simulated quantum channel, real post-processing between the two
//! KMEs), the default of the default network.
//!
//! Owns this end's `Bb84Engine` address, the link's authentication stream, frame pacing and
//! the QKD measures for `status`. Its `Link` calls it at both ends: at the driving end (Alice),
//! on each tick, to run the next frame; at the other end (Bob), with the `Start` and `Step`
//! messages of Alice's frames. Per frame, Alice burns an authentication window (durably, at
//! both ends, before the first tag), has her engine simulate the pulses, sends Bob's detection
//! record in place of the quantum channel, then carries the post-processing messages between
//! the two engines. Once both ends hold the verified, amplified key, each hands it to its
//! `Link` as a shared key: Alice's cuts it and commits the blocks by number, Bob's holds it
//! for that commit. Key bytes never cross the network. An aborted frame (QBER above
//! threshold, failed verification or authentication, lost message) yields nothing at either
//! end; the link backs off and tries again, so it recovers by itself once the channel is
//! clean. The first authentication key (and a new one after exhaustion) is shipped as bytes:
//! it stands in for the key an operator installs at both ends out of band.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use actix::prelude::*;
use futures_util::future::LocalBoxFuture;
use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::link::auth::{AuthStream, CommitAuth, WINDOW_BYTES};
use crate::link::key_source::{
    foreign, Condition, Delivery, KeySource, Produced, QkdHealth, SharedKey, SourceHealth, Stream,
    Work,
};
use crate::link::sources::bb84_engine::{
    AbortFrame, Bb84Engine, BeginAlice, BeginBob, FrameState, Progress, Step,
};
use crate::link::sources::courier::random_bytes;
use crate::link::sources::file_drop::FileDrop;
use crate::link::LinkCore;
use crate::peer::peer_link::{PeerLink, SourceExchange};
use crate::peer::protocol::DetectionRecord;
use crate::peer::protocol::{FrameProgress, SourceReply, SourceRequest};
use crate::storage::audit::AuditRecord;
use crate::storage::ops::{CommitDelivery, UsedKeyFile};
use crate::storage::store::Exec;
use crate::types::{AuthBootstrap, Bb84Settings, KmeId, Owner};
use kme_bb84::pipeline::{AbortReason, Envelope, FrameReport, PROTOCOL_VERSION};

/// How often a running BB84 link logs a summary at info level (and at its first frame).
const SUMMARY_EVERY: Duration = Duration::from_secs(10);
/// Frames over which the sifted and secret key rates are averaged.
const RATE_FRAMES: usize = 16;
/// Longest wait between frames after aborts or failures (doubling from 100 ms).
const MAX_ABORT_BACKOFF: Duration = Duration::from_secs(10);
/// Most windows a `Start` may skip at the Bob end (the Alice end skips one when it burned a
/// window and crashed before the Bob end saw it); beyond, a message could burn the stream.
const MAX_WINDOW_SKIP: u64 = 8;
/// Authentication windows shipped over TLS (`auth_bootstrap = "tls"`), first and after
/// exhaustion.
const AUTH_BOOTSTRAP_WINDOWS: u64 = 256;
/// Below this many authentication windows the operator is warned.
const AUTH_LOW_WARNING: u64 = 16;
/// After this many aborted frames in a row the link counts as down (before: degraded).
const DOWN_AFTER_ABORTS: u64 = 3;

/// The BB84 source of one link end.
pub struct Bb84 {
    settings: Bb84Settings,
    engine: Addr<Bb84Engine>,
    auth: AuthStream,
    next_frame_at: Instant,
    /// (duration, sifted bits, secret bits) of the last frames.
    recent: VecDeque<(Duration, u64, u64)>,
    /// Bob end: when the running frame started here, and what tags its commit.
    bob_started: Instant,
    commit_auth: Option<CommitAuth>,
    stats: QkdHealth,
    /// Frames in a row that failed for want of the peer or the storage (for the back-off).
    failures: u64,
    /// When the last summary was logged (None: log the next frame).
    last_summary: Option<Instant>,
    /// The operator's authentication key files (`auth_bootstrap = "key-file"`).
    rekey: FileDrop,
    /// The stream ran below `AUTH_LOW_WARNING` windows and the operator was warned.
    low_warned: bool,
}

/// Why a frame was discarded, for the statistics and the logs.
enum Abort {
    /// The post-processing discarded it at this end.
    Frame(AbortReason),
    /// A message or its answer was lost mid-frame (the transport's error).
    Exchange(String),
}

impl std::fmt::Display for Abort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Abort::Frame(reason) => reason.fmt(f),
            Abort::Exchange(err) => write!(f, "message exchange failed: {err}"),
        }
    }
}

/// How one frame ended at the Alice end.
enum FrameEnd {
    Key(Zeroizing<Vec<u8>>),
    Aborted(AbortReason),
    /// The Bob end had burned the window already; his next one is this.
    WindowBehind(u64),
    /// The Bob end neither burned nor holds the window; his next one is this.
    OutOfStep(u64),
    /// Not the channel's fault: the peer or the storage failed.
    Failed(Error),
    /// A message exchange failed after both ends began tagging the frame (a message or its
    /// answer lost): given up here and, best effort, at the Bob end by our abort notice.
    Lost(Error),
}

struct FrameRun {
    frame_id: u64,
    window: u64,
    /// The Bob end started the frame with the window: it never serves again.
    window_used: bool,
    end: FrameEnd,
    alice: FrameReport,
    bob: Option<FrameReport>,
}

impl Bb84 {
    /// `auth_key_dir`: where the operator installs authentication key files.
    pub fn new(
        settings: Bb84Settings,
        engine: Addr<Bb84Engine>,
        auth: AuthStream,
        auth_key_dir: PathBuf,
    ) -> Self {
        Self {
            settings,
            engine,
            auth,
            next_frame_at: Instant::now(),
            recent: VecDeque::new(),
            stats: QkdHealth::default(),
            bob_started: Instant::now(),
            commit_auth: None,
            failures: 0,
            last_summary: None,
            rekey: FileDrop::for_auth_keys(auth_key_dir),
            low_warned: false,
        }
    }

    fn rekey(&mut self) -> &mut FileDrop {
        &mut self.rekey
    }

    /// Warns the operator once when the stream runs low (aborted frames use it up; good ones
    /// refill it), again after it recovered.
    fn watch_auth_level(&mut self, peer: &KmeId) {
        let left = self.auth.windows_left();
        if left < AUTH_LOW_WARNING && !self.low_warned {
            self.low_warned = true;
            log::warn!(
                "link to {peer}: {left} authentication windows left (each aborted frame uses one; \
                 at none the link goes down until an operator re-key, `kme link rekey`)"
            );
        } else if left >= 2 * AUTH_LOW_WARNING {
            self.low_warned = false;
        }
    }
}

impl KeySource for Bb84 {
    fn name(&self) -> &'static str {
        "bb84"
    }

    fn delivery(&self) -> Delivery {
        Delivery::ByNumber
    }

    /// Destroys authentication key files that gave blocks before a crash could remove them.
    fn start(&mut self, link: &mut LinkCore) -> Work<Self, ()> {
        self.rekey.start(link).within(Self::rekey)
    }

    /// Alice: the next frame, when the pools want material and the pacing allows; without an
    /// authentication window, the operator's key file (or, with `auth_bootstrap = "tls"`, a
    /// key shipped over TLS).
    fn drive(&mut self, link: &mut LinkCore, now: Instant) -> Work<Self, Produced> {
        let out_of_step = self.auth.out_of_step().is_some();
        if out_of_step || self.auth.windows_left() == 0 {
            // Ends out of step need a key both hold: only the operator's key file is that.
            return match self.settings.auth_bootstrap {
                AuthBootstrap::Tls if !out_of_step => Work::Ready(bootstrap_auth(link)),
                _ => self.rekey.offer_when_due(link, now).within(Self::rekey),
            };
        }
        self.watch_auth_level(&link.params().peer.clone());
        if link.pools_full() || now < self.next_frame_at {
            return Work::Ready(Produced::Nothing);
        }
        self.run_frame(link, now)
    }

    /// Bob: Alice's `Start` and `Step` messages.
    fn answer(
        &mut self,
        request: SourceRequest,
        link: &mut LinkCore,
    ) -> Work<Self, Result<SourceReply>> {
        match request {
            SourceRequest::Start { protocol, .. } if protocol != PROTOCOL_VERSION => {
                Work::refuse(format!(
                "BB84 post-processing protocol {protocol} is not this KME's ({PROTOCOL_VERSION}): \
                 both ends of a link must run the same kme version"
            ))
            }
            SourceRequest::Start {
                frame_id,
                window,
                record,
                ..
            } => self.bob_start(link, frame_id, window, record),
            SourceRequest::Step {
                frame_id,
                envelopes,
            } => self.bob_step(frame_id, envelopes),
            offer @ SourceRequest::FileOffer { .. } => {
                self.rekey.answer(offer, link).within(Self::rekey)
            }
            _ => foreign(self),
        }
    }

    /// An authentication key file gave blocks at both ends: it goes.
    fn key_used(&self, link: &LinkCore, used: &UsedKeyFile) -> LocalBoxFuture<'static, ()> {
        self.rekey.key_used(link, used)
    }

    fn auth_stream(&mut self) -> Option<&mut AuthStream> {
        Some(&mut self.auth)
    }

    fn health(&self) -> SourceHealth {
        let qkd = QkdHealth {
            auth_windows_left: self.auth.windows_left(),
            fibre_km: self.settings.channel.fibre_km,
            eavesdropper: self.settings.channel.eve_fraction,
            ..self.stats.clone()
        };
        match without_auth_key(&self.auth, self.settings.auth_bootstrap) {
            Some(reason) => SourceHealth {
                condition: Condition::Down,
                reason: Some(reason),
                qkd: Some(qkd),
            },
            None => health(qkd),
        }
    }
}

/// The down reason of a link whose ends are at different places in the authentication
/// stream: the driving (Alice) end asks for window `asked`, the Bob end's next is `next`.
fn out_of_step(peer: &KmeId, asked: u64, next: u64) -> String {
    format!(
        "authentication stream out of step with {peer} (the Alice end asks for window {asked}, \
         the Bob end's next is {next}): was an end restored from a backup? Install the same new \
         pre-shared key file at both ends (kme link rekey)"
    )
}

/// Why a link with `auth` cannot run frames: its ends are out of step, or it has no
/// authentication window left and waits for the operator's key file.
fn without_auth_key(auth: &AuthStream, bootstrap: AuthBootstrap) -> Option<String> {
    if let Some(reason) = auth.out_of_step() {
        return Some(reason.to_string());
    }
    if auth.windows_left() > 0 || bootstrap == AuthBootstrap::Tls {
        return None;
    }
    let what = if auth.next_window() == 0 {
        "no authentication key yet"
    } else {
        "authentication key exhausted"
    };
    Some(format!(
        "{what}: install the same pre-shared key file at both ends (kme link rekey)"
    ))
}

/// Up after a good frame, degraded after an aborted one, down after `DOWN_AFTER_ABORTS` in a
/// row; the reason is the last abort's.
fn health(qkd: QkdHealth) -> SourceHealth {
    let condition = match qkd.consecutive_aborts {
        0 => Condition::Up,
        n if n < DOWN_AFTER_ABORTS => Condition::Degraded,
        _ => Condition::Down,
    };
    SourceHealth {
        condition,
        reason: (condition != Condition::Up)
            .then(|| qkd.last_abort.clone())
            .flatten(),
        qkd: Some(qkd),
    }
}

/// `auth_bootstrap = "tls"`: the first authentication key, or a new one after exhaustion,
/// shipped over the TLS channel in place of the key file an operator installs at both ends.
fn bootstrap_auth(link: &mut LinkCore) -> Produced {
    let block = link.params().block_bytes as u64;
    let count = (AUTH_BOOTSTRAP_WINDOWS * WINDOW_BYTES).div_ceil(block);
    match random_bytes((count * block) as usize) {
        Ok(material) => {
            log::warn!(
                "link to {}: shipping {} authentication windows over TLS (auth_bootstrap = \"tls\"): \
                 until they are used up the link's authentication rests on TLS, not on a pre-shared key",
                link.params().peer,
                AUTH_BOOTSTRAP_WINDOWS
            );
            Produced::Bytes {
                material,
                to: Stream::Auth,
            }
        }
        Err(err) => {
            link.set_health(&Err(err));
            Produced::Nothing
        }
    }
}

/// BB84, Alice (driving) end.
impl Bb84 {
    fn run_frame(&mut self, link: &LinkCore, now: Instant) -> Work<Self, Produced> {
        let window = self.auth.next_window();
        let Some(mut material) = self.auth.window(window) else {
            return Work::Ready(Produced::Nothing);
        };
        let commit_auth = CommitAuth::split_from(&mut material);
        let engine = self.engine.clone();
        let peer = link.peer().clone();
        let store = link.store().clone();
        let link_peer = link.params().peer.clone();
        let block_bytes = link.params().block_bytes;
        let work = async move {
            let mut run = FrameRun {
                frame_id: 0,
                window,
                window_used: false,
                end: FrameEnd::Failed(Error::Unavailable("frame not started".into())),
                alice: FrameReport::default(),
                bob: None,
            };
            let begin = engine.send(BeginAlice { auth: material }).await;
            let (frame_id, record) = match begin.map_err(Error::from).and_then(|r| r) {
                Ok(begun) => begun,
                Err(err) => {
                    run.end = FrameEnd::Failed(err);
                    return run;
                }
            };
            run.frame_id = frame_id;
            // Nothing is tagged with the window before the Bob end has burned it (he tags his
            // first message at Start), so a Start that got no answer may be sent again with
            // the same window: he either never saw it or refuses it as burned.
            let start = SourceRequest::Start {
                frame_id,
                window,
                record,
                protocol: PROTOCOL_VERSION,
            };
            let sent = peer.send(SourceExchange(start)).await;
            let mut reply = match sent.map_err(Error::from).and_then(|r| r) {
                Ok(SourceReply::Progress(progress)) => *progress,
                Ok(SourceReply::WindowBehind { next_window }) => {
                    abort_in_engine(&engine, frame_id).await;
                    run.end = FrameEnd::WindowBehind(next_window);
                    return run;
                }
                Ok(SourceReply::AuthOutOfStep { next_window }) => {
                    abort_in_engine(&engine, frame_id).await;
                    run.end = FrameEnd::OutOfStep(next_window);
                    return run;
                }
                Ok(other) => {
                    abort_in_engine(&engine, frame_id).await;
                    run.end = FrameEnd::Failed(other.unexpected("start"));
                    return run;
                }
                Err(err) => {
                    abort_in_engine(&engine, frame_id).await;
                    run.end = FrameEnd::Failed(err);
                    return run;
                }
            };
            run.window_used = true;
            let burn = burn_window(&link_peer, block_bytes, frame_id, window);
            // Burned durably before the first tag from this end.
            if let Err(err) = store
                .send(Exec(burn))
                .await
                .map_err(Error::from)
                .and_then(|r| r)
            {
                abort_in_engine(&engine, frame_id).await;
                run.end = FrameEnd::Failed(err);
                return run;
            }
            loop {
                run.bob = reply.report.or(run.bob);
                let step = Step {
                    frame_id,
                    envelopes: reply.envelopes,
                };
                let progress = match engine.send(step).await.map_err(Error::from).and_then(|r| r) {
                    Ok(progress) => progress,
                    Err(err) => {
                        run.end = FrameEnd::Failed(err);
                        return run;
                    }
                };
                run.alice = progress.report;
                let request = match progress.state {
                    FrameState::Running if !progress.out.is_empty() => SourceRequest::Step {
                        frame_id,
                        envelopes: progress.out,
                    },
                    FrameState::Running => {
                        // The peer answered nothing while the frame expects an answer.
                        give_up(&engine, &peer, frame_id).await;
                        run.end = FrameEnd::Aborted(AbortReason::Timeout);
                        return run;
                    }
                    FrameState::Done(key) => {
                        run.end = FrameEnd::Key(key);
                        return run;
                    }
                    FrameState::Aborted(reason) => {
                        notify_abort(&peer, frame_id, progress.out).await;
                        run.end = FrameEnd::Aborted(reason);
                        return run;
                    }
                };
                let sent = peer.send(SourceExchange(request)).await;
                let answer = sent.map_err(Error::from).and_then(|r| match r? {
                    SourceReply::Progress(progress) => Ok(*progress),
                    other => Err(other.unexpected("step")),
                });
                reply = match answer {
                    Ok(progress) => progress,
                    Err(err) => {
                        // The Bob end may be waiting for a message that will never come, or
                        // may have moved on: our tagged abort notice ends the frame there too
                        // (best effort: without it, his next `Start` drops the frame).
                        give_up(&engine, &peer, frame_id).await;
                        run.end = FrameEnd::Lost(err);
                        return run;
                    }
                };
            }
        };
        Work::later(work, move |run: FrameRun, me: &mut Self, link| {
            let frame_id = run.frame_id;
            match me.frame_finished(link, run, now) {
                Some(key) => Produced::Shared(SharedKey {
                    id: frame_id,
                    bytes: key,
                    used: None,
                    commit_auth,
                    stream: None,
                    fresh_auth_from: None,
                }),
                None => Produced::Nothing,
            }
        })
    }

    /// Records the frame in health and pacing; returns its key if it has one.
    fn frame_finished(
        &mut self,
        link: &mut LinkCore,
        run: FrameRun,
        started: Instant,
    ) -> Option<Zeroizing<Vec<u8>>> {
        if run.window_used {
            self.auth.burn(run.window);
        }
        let bob_report = run.bob.unwrap_or_default();
        let (key, outcome) = match run.end {
            FrameEnd::Key(key) => (Some(key), Ok(())),
            FrameEnd::Aborted(reason) => (None, Err(reason)),
            // Catch up with the Bob end (windows below his next one are burned there) — by a
            // few windows at most: we lag him only if we crashed between his burn and ours.
            FrameEnd::WindowBehind(next)
                if next > run.window && next - run.window <= MAX_WINDOW_SKIP + 1 =>
            {
                self.auth.burn(next - 1);
                return None;
            }
            // Farther behind (this end was restored from a backup), or the Bob end lacks the
            // window (he was): only an operator key brings the two ends together again.
            FrameEnd::WindowBehind(next) | FrameEnd::OutOfStep(next) => {
                let reason = out_of_step(&link.params().peer, run.window, next);
                self.auth.set_out_of_step(reason);
                return None;
            }
            FrameEnd::Failed(err) => {
                self.failed(link, err);
                return None;
            }
            FrameEnd::Lost(err) => {
                // An aborted frame (counted as such, as at the Bob end) that is also a failure
                // to reach the peer: retried after the longer of the two back-offs.
                let took = self.frame_time(started);
                let peer = link.params().peer.clone();
                let why = Abort::Exchange(err.to_string());
                self.record(&peer, &bob_report, 0, took, Err(why));
                self.failed(link, err);
                let after_aborts = Instant::now() + backoff(self.stats.consecutive_aborts);
                self.next_frame_at = self.next_frame_at.max(after_aborts);
                return None;
            }
        };
        self.failures = 0;
        let took = self.frame_time(started);
        self.record(
            &link.params().peer,
            &bob_report,
            run.alice.secret_bits,
            took,
            outcome.map_err(Abort::Frame),
        );
        let earliest = if self.settings.paced {
            started + self.physical_frame_time()
        } else {
            started
        };
        self.next_frame_at = earliest.max(Instant::now() + backoff(self.stats.consecutive_aborts));
        link.set_health(&Ok(()));
        key
    }

    /// Not the channel: retry later, waiting longer after each failure in a row.
    fn failed(&mut self, link: &mut LinkCore, err: Error) {
        self.failures = self.failures.saturating_add(1);
        self.next_frame_at = Instant::now() + backoff(self.failures);
        link.set_health(&Err(err));
    }
}

/// Wait before the next frame after `n` aborts or failures in a row: none after a success,
/// then 100 ms, doubling up to `MAX_ABORT_BACKOFF`.
fn backoff(n: u64) -> Duration {
    match n {
        0 => Duration::ZERO,
        n => Duration::from_millis(100u64 << (n - 1).min(16)).min(MAX_ABORT_BACKOFF),
    }
}

/// Best effort: tell the other end that this frame is over (it drops it anyway at the next
/// `Start`).
async fn notify_abort(peer: &Addr<PeerLink>, frame_id: u64, envelopes: Vec<Envelope>) {
    if !envelopes.is_empty() {
        let _ = peer
            .send(SourceExchange(SourceRequest::Step {
                frame_id,
                envelopes,
            }))
            .await;
    }
}

/// Abort the frame in this end's engine (timeout). Result: its tagged abort notice, if it
/// had begun tagging.
async fn abort_in_engine(engine: &Addr<Bb84Engine>, frame_id: u64) -> Vec<Envelope> {
    engine
        .send(AbortFrame {
            frame_id,
            reason: AbortReason::Timeout,
        })
        .await
        .unwrap_or_default()
}

/// Abort the frame in this end's engine and send the other end the tagged notice.
async fn give_up(engine: &Addr<Bb84Engine>, peer: &Addr<PeerLink>, frame_id: u64) {
    notify_abort(peer, frame_id, abort_in_engine(engine, frame_id).await).await;
}

impl Bb84 {
    /// The time a frame started at `started` took: on a paced link at least its pulses' time.
    fn frame_time(&self, started: Instant) -> Duration {
        let took = started.elapsed();
        if self.settings.paced {
            took.max(self.physical_frame_time())
        } else {
            took
        }
    }

    fn physical_frame_time(&self) -> Duration {
        let channel = &self.settings.channel;
        Duration::from_secs_f64(self.settings.pulses_per_frame as f64 / channel.pulse_rate_hz)
    }

    /// Health and logs after a frame, from the Bob end's report (which holds the estimates).
    fn record(
        &mut self,
        peer: &KmeId,
        report: &FrameReport,
        secret_bits: u64,
        took: Duration,
        outcome: std::result::Result<(), Abort>,
    ) {
        let stats = &mut self.stats;
        if let Some(qber) = report.qber_test {
            stats.qber = Some(qber);
        }
        if let Some(bound) = &report.finite_key {
            stats.qber_upper = Some(bound.phi1);
        }
        if let Some(cascade) = &report.cascade {
            stats.efficiency = Some(cascade.efficiency());
        }
        let now = Instant::now();
        match outcome {
            Ok(()) => {
                if stats.consecutive_aborts > 0 {
                    log::info!(
                        "link to {peer}: frames succeed again (QBER {:?})",
                        stats.qber
                    );
                }
                stats.frames_ok += 1;
                stats.consecutive_aborts = 0;
                self.recent
                    .push_back((took, report.sifted_bits, secret_bits));
            }
            Err(reason) => {
                if let Abort::Frame(AbortReason::QberTooHigh { observed, upper }) = reason {
                    stats.qber = Some(observed);
                    stats.qber_upper = Some(upper);
                }
                stats.frames_aborted += 1;
                stats.consecutive_aborts += 1;
                log::warn!(
                    "link to {peer}: frame aborted ({reason}); {} in a row",
                    stats.consecutive_aborts
                );
                stats.last_abort = Some(reason.to_string());
                self.recent.push_back((took, report.sifted_bits, 0));
            }
        }
        while self.recent.len() > RATE_FRAMES {
            self.recent.pop_front();
        }
        let (time, sifted, secret) = self.recent.iter().fold((0.0, 0, 0), |(t, a, b), r| {
            (t + r.0.as_secs_f64(), a + r.1, b + r.2)
        });
        if time > 0.0 {
            stats.sifted_bits_per_s = sifted as f64 / time;
            stats.secret_bits_per_s = secret as f64 / time;
        }
        if self
            .last_summary
            .is_none_or(|at| now.duration_since(at) >= SUMMARY_EVERY)
        {
            self.last_summary = Some(now);
            log::info!(
                "link to {peer}: {} frames ok, {} aborted; QBER {:.2}%, f {:.3}, sifted {:.0} bit/s, secret {:.0} bit/s",
                stats.frames_ok,
                stats.frames_aborted,
                stats.qber.unwrap_or(0.0) * 100.0,
                stats.efficiency.unwrap_or(0.0),
                stats.sifted_bits_per_s,
                stats.secret_bits_per_s
            );
        }
    }
}

/// BB84, Bob end.
impl Bb84 {
    fn bob_start(
        &mut self,
        link: &mut LinkCore,
        frame_id: u64,
        window: u64,
        record: DetectionRecord,
    ) -> Work<Self, Result<SourceReply>> {
        let next = self.auth.next_window();
        if window < next {
            // Already burned (a retried Start): tell the Alice end where to continue.
            return Work::Ready(Ok(SourceReply::WindowBehind { next_window: next }));
        }
        let held = if window - next > MAX_WINDOW_SKIP {
            None
        } else {
            self.auth.window(window)
        };
        let Some(mut material) = held else {
            // Burns nothing: the Alice end learns where this end is, and stops; shown here
            // until a frame starts in step (a stray `Start` is forgotten then).
            self.auth
                .set_out_of_step(out_of_step(&link.params().peer, window, next));
            return Work::Ready(Ok(SourceReply::AuthOutOfStep { next_window: next }));
        };
        self.auth.in_step();
        self.commit_auth = CommitAuth::split_from(&mut material);
        self.auth.burn(window);
        self.bob_started = Instant::now();
        let engine = self.engine.clone();
        link.hold(None);
        let store = link.store().clone();
        let burn = burn_window(
            &link.params().peer,
            link.params().block_bytes,
            frame_id,
            window,
        );
        let work = async move {
            store.send(Exec(burn)).await??;
            let begin = BeginBob {
                frame_id,
                auth: material,
                record,
            };
            Ok(engine.send(begin).await?)
        };
        Self::then_bob_progress(work, frame_id)
    }

    fn bob_step(
        &mut self,
        frame_id: u64,
        envelopes: Vec<Envelope>,
    ) -> Work<Self, Result<SourceReply>> {
        let engine = self.engine.clone();
        let work = async move {
            engine
                .send(Step {
                    frame_id,
                    envelopes,
                })
                .await?
        };
        Self::then_bob_progress(work, frame_id)
    }

    /// The engine's `work` on a frame, then the answer to the Alice end from its progress.
    fn then_bob_progress(
        work: impl std::future::Future<Output = Result<Progress>> + 'static,
        frame_id: u64,
    ) -> Work<Self, Result<SourceReply>> {
        Work::later(
            work,
            move |progress: Result<Progress>, me: &mut Self, link| {
                me.bob_progress(link, frame_id, progress?)
            },
        )
    }

    fn bob_progress(
        &mut self,
        link: &mut LinkCore,
        frame_id: u64,
        progress: Progress,
    ) -> Result<SourceReply> {
        let peer = link.params().peer.clone();
        let finished = progress.state != FrameState::Running;
        match progress.state {
            FrameState::Running => {}
            FrameState::Done(key) => {
                let took = self.frame_time(self.bob_started);
                let bits = progress.report.secret_bits;
                self.record(&peer, &progress.report, bits, took, Ok(()));
                link.hold(Some(SharedKey {
                    id: frame_id,
                    bytes: key,
                    used: None,
                    commit_auth: self.commit_auth.take(),
                    stream: None,
                    fresh_auth_from: None,
                }));
            }
            FrameState::Aborted(reason) => {
                let took = self.frame_time(self.bob_started);
                self.record(&peer, &progress.report, 0, took, Err(Abort::Frame(reason)));
            }
        }
        Ok(SourceReply::Progress(Box::new(FrameProgress {
            envelopes: progress.out,
            report: finished.then_some(progress.report),
        })))
    }
}

/// Burns authentication window `window` for frame `frame_id` durably, with its audit record
/// (at each end before its first tag).
fn burn_window(peer: &KmeId, block_bytes: usize, frame_id: u64, window: u64) -> CommitDelivery {
    CommitDelivery {
        peer: peer.clone(),
        owner: Owner::Auth,
        position: AuthStream::position_after(window),
        block_bytes,
        audits: vec![AuditRecord::new(
            "bb84_frame_started",
            serde_json::json!({
                "peer": peer.as_str(),
                "frame_id": frame_id,
                "auth_window": window,
            }),
        )],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aborted_frames_degrade_then_take_the_link_down() {
        let after = |aborts: u64| {
            health(QkdHealth {
                consecutive_aborts: aborts,
                frames_aborted: aborts,
                last_abort: (aborts > 0).then(|| "QBER too high".to_string()),
                ..QkdHealth::default()
            })
        };
        let up = after(0);
        assert_eq!((up.condition, up.reason), (Condition::Up, None));
        assert_eq!(up.qkd.map(|q| q.frames_aborted), Some(0));
        for (aborts, condition) in [(1, Condition::Degraded), (2, Condition::Degraded)] {
            let h = after(aborts);
            assert_eq!(h.condition, condition);
            assert_eq!(h.reason.as_deref(), Some("QBER too high"));
        }
        let down = after(DOWN_AFTER_ABORTS);
        assert_eq!(down.condition, Condition::Down);
        assert_eq!(down.reason.as_deref(), Some("QBER too high"));
    }

    #[test]
    fn a_link_without_authentication_key_waits_for_the_operator_unless_tls_is_allowed() {
        use crate::storage::db::StoredBlock;
        let block = |seq| StoredBlock {
            seq,
            data: vec![1; WINDOW_BYTES as usize].into(),
        };
        let fresh = AuthStream::new(WINDOW_BYTES as usize, 0, Vec::new());
        let why = without_auth_key(&fresh, AuthBootstrap::KeyFile).unwrap();
        assert!(why.starts_with("no authentication key yet"), "{why}");
        // Two windows held, both burned by aborted frames: exhausted.
        let mut used_up = AuthStream::new(WINDOW_BYTES as usize, 0, vec![block(0), block(1)]);
        assert_eq!(without_auth_key(&used_up, AuthBootstrap::KeyFile), None);
        used_up.burn(0);
        used_up.burn(1);
        let why = without_auth_key(&used_up, AuthBootstrap::KeyFile).unwrap();
        assert!(why.starts_with("authentication key exhausted"), "{why}");
        assert!(why.contains("kme link rekey"), "{why}");
        // Only the explicit demo setting ships a key over TLS instead.
        assert_eq!(without_auth_key(&used_up, AuthBootstrap::Tls), None);
    }

    #[test]
    fn backoff_doubles_from_100_ms_up_to_the_cap() {
        assert_eq!(backoff(0), Duration::ZERO);
        assert_eq!(backoff(1), Duration::from_millis(100));
        assert_eq!(backoff(3), Duration::from_millis(400));
        assert_eq!(backoff(200), MAX_ABORT_BACKOFF);
    }
}
