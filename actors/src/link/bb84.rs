//! BB84 frames of a `Link`: the Alice end drives them, the Bob end answers (see the module
//! doc of `link` for the protocol).

use std::collections::VecDeque;

use super::*;
use crate::bb84::pipeline::{AbortReason, Envelope, FrameReport};
use crate::bb84_engine::{
    AbortFrame, BeginAlice, BeginBob, DetectionRecord, FrameState, Progress, Step,
};
use crate::types::Bb84Settings;

/// How often a running BB84 link logs a summary at info level (and at its first frame).
const SUMMARY_EVERY: Duration = Duration::from_secs(10);
/// Frames over which the sifted and secret key rates are averaged.
const RATE_FRAMES: usize = 16;
/// Longest wait between frames after aborts or failures (doubling from 100 ms).
const MAX_ABORT_BACKOFF: Duration = Duration::from_secs(10);
/// Most windows a `Start` may skip at the Bob end (the Alice end skips one when it burned a
/// window and crashed before the Bob end saw it); beyond, a message could burn the stream.
const MAX_WINDOW_SKIP: u64 = 8;
/// Authentication windows shipped at bootstrap (and at a re-key after exhaustion).
const AUTH_BOOTSTRAP_WINDOWS: u64 = 256;
/// The BB84 part of a link end.
pub(super) struct Bb84End {
    pub(super) settings: Bb84Settings,
    engine: Addr<Bb84Engine>,
    pub(super) auth: AuthStream,
    next_frame_at: Instant,
    /// (duration, sifted bits, secret bits) of the last frames.
    recent: VecDeque<(Duration, u64, u64)>,
    /// Bob end: when the running frame started here.
    bob_started: Instant,
    pub(super) stats: QkdHealth,
    /// Frames in a row that failed for want of the peer or the storage (for the back-off).
    failures: u64,
    /// When the last summary was logged (None: log the next frame).
    last_summary: Option<Instant>,
}

/// How one frame ended at the Alice end.
enum FrameEnd {
    Key(Vec<u8>),
    Aborted(AbortReason),
    /// The Bob end had burned the window already; his next one is this.
    WindowBehind(u64),
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

/// BB84, Alice (driving) end.
impl Link {
    pub(super) fn bb84_tick(&mut self, ctx: &mut Context<Self>, now: Instant) {
        let Some(bb84) = self.bb84.as_ref() else {
            return;
        };
        if bb84.auth.windows_left() == 0 {
            self.bootstrap_auth(ctx);
            return;
        }
        let high = self.params.high_water_bytes();
        if self.own_level.min(self.peer_level) >= high || now < bb84.next_frame_at {
            return;
        }
        self.run_frame(ctx, now);
    }

    /// The first authentication key, or a new one after exhaustion, shipped over the TLS
    /// channel: it stands in for the key an operator installs at both ends out of band.
    fn bootstrap_auth(&mut self, ctx: &mut Context<Self>) {
        let block = self.params.block_bytes as u64;
        let count = (AUTH_BOOTSTRAP_WINDOWS * WINDOW_BYTES).div_ceil(block);
        let owner = auth_owner();
        let mut blocks = Vec::new();
        for _ in 0..count {
            let data = match self.source.next_block(self.params.block_bytes) {
                Ok(data) => data,
                Err(err) => return self.set_health(&Err(err)),
            };
            let seq = self.take_seq(&owner);
            blocks.push(BlockRecord {
                owner: owner.clone(),
                seq,
                data,
            });
        }
        log::info!(
            "link to {}: shipping {} authentication windows over TLS (bootstrap)",
            self.params.peer,
            AUTH_BOOTSTRAP_WINDOWS
        );
        self.ship(ctx, blocks, false, Delivery::Bytes);
    }

    fn run_frame(&mut self, ctx: &mut Context<Self>, now: Instant) {
        let Some(bb84) = self.bb84.as_mut() else {
            return;
        };
        let window = bb84.auth.next_window();
        let Some(material) = bb84.auth.window(window) else {
            return;
        };
        let engine = bb84.engine.clone();
        let peer = self.peer.clone();
        let store = self.store.clone();
        let link_peer = self.params.peer.clone();
        let block_bytes = self.params.block_bytes;
        self.busy = true;
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
            let drop_frame = || async {
                let _ = engine
                    .send(AbortFrame {
                        frame_id,
                        reason: AbortReason::Timeout,
                    })
                    .await;
            };
            let start = SourceRequest::Start {
                frame_id,
                window,
                record,
            };
            let sent = peer.send(SourceExchange(start)).await;
            let mut reply = match sent.map_err(Error::from).and_then(|r| r) {
                Ok(reply) => reply,
                Err(err) => {
                    drop_frame().await;
                    run.end = FrameEnd::Failed(err);
                    return run;
                }
            };
            if let Some(next) = reply.next_window {
                drop_frame().await;
                run.end = FrameEnd::WindowBehind(next);
                return run;
            }
            run.window_used = true;
            let burn = Op::CommitDelivery {
                peer: link_peer.clone(),
                owner: auth_owner(),
                position: AuthStream::position_after(window),
                block_bytes,
                audit: AuditRecord::new(
                    "bb84_frame_started",
                    serde_json::json!({
                        "peer": link_peer.as_str(),
                        "frame_id": frame_id,
                        "auth_window": window,
                    }),
                ),
            };
            // Burned durably before the first tag from this end.
            if let Err(err) = store
                .send(burn.into())
                .await
                .map_err(Error::from)
                .and_then(|r| r)
            {
                drop_frame().await;
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
                        let notice = engine
                            .send(AbortFrame {
                                frame_id,
                                reason: AbortReason::Timeout,
                            })
                            .await
                            .unwrap_or_default();
                        notify_abort(&peer, frame_id, notice).await;
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
                reply = match sent.map_err(Error::from).and_then(|r| r) {
                    Ok(reply) => reply,
                    Err(err) => {
                        // The Bob end may be waiting for a message that will never come, or
                        // may have moved on: our tagged abort notice ends the frame there too
                        // (best effort: without it, his next `Start` drops the frame).
                        let notice = engine
                            .send(AbortFrame {
                                frame_id,
                                reason: AbortReason::Timeout,
                            })
                            .await
                            .unwrap_or_default();
                        notify_abort(&peer, frame_id, notice).await;
                        run.end = FrameEnd::Lost(err);
                        return run;
                    }
                };
            }
        };
        ctx.spawn(
            fut::wrap_future(work).map(move |run: FrameRun, act: &mut Self, ctx| {
                act.busy = false;
                let frame_id = run.frame_id;
                let key = act.frame_finished(run, now);
                if let Some(key) = key {
                    let blocks = act.cut(key);
                    if !blocks.is_empty() {
                        let delivery = Delivery::Commit {
                            frame: Some(frame_id),
                            file: None,
                        };
                        act.ship(ctx, blocks, false, delivery);
                    }
                }
            }),
        );
    }

    /// Records the frame in health and pacing; returns its key if it has one.
    fn frame_finished(&mut self, run: FrameRun, started: Instant) -> Option<Vec<u8>> {
        let bb84 = self.bb84.as_mut()?;
        if run.window_used {
            bb84.auth.burn(run.window);
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
                bb84.auth.burn(next - 1);
                return None;
            }
            FrameEnd::WindowBehind(next) => {
                bb84.failures = bb84.failures.saturating_add(1);
                bb84.next_frame_at = Instant::now() + backoff(bb84.failures);
                let err = Error::PeerMessage(format!(
                    "{} names authentication window {next} after {}",
                    self.params.peer, run.window
                ));
                self.set_health(&Err(err));
                return None;
            }
            FrameEnd::Failed(err) => {
                // Not the channel: retry later, waiting longer after each failure in a row.
                bb84.failures = bb84.failures.saturating_add(1);
                bb84.next_frame_at = Instant::now() + backoff(bb84.failures);
                self.set_health(&Err(err));
                return None;
            }
            FrameEnd::Lost(err) => {
                // An aborted frame (counted as such, as at the Bob end) that is also a failure
                // to reach the peer: retried after the longer of the two back-offs.
                bb84.failures = bb84.failures.saturating_add(1);
                let took = bb84.frame_time(started);
                let peer = self.params.peer.clone();
                bb84.record(&peer, &bob_report, 0, took, Err(AbortReason::Timeout));
                bb84.stats.last_abort = Some(format!("message exchange failed: {err}"));
                let wait = backoff(bb84.failures.max(bb84.stats.consecutive_aborts));
                bb84.next_frame_at = Instant::now() + wait;
                self.set_health(&Err(err));
                return None;
            }
        };
        bb84.failures = 0;
        let took = bb84.frame_time(started);
        let peer = self.params.peer.clone();
        bb84.record(&peer, &bob_report, run.alice.secret_bits, took, outcome);
        let earliest = if bb84.settings.paced {
            started + bb84.physical_frame_time()
        } else {
            started
        };
        bb84.next_frame_at = earliest.max(Instant::now() + backoff(bb84.stats.consecutive_aborts));
        self.set_health(&Ok(()));
        key
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

impl Bb84End {
    pub(super) fn new(settings: Bb84Settings, engine: Addr<Bb84Engine>, auth: AuthStream) -> Self {
        Self {
            settings,
            engine,
            auth,
            next_frame_at: Instant::now(),
            recent: VecDeque::new(),
            stats: QkdHealth::default(),
            bob_started: Instant::now(),
            failures: 0,
            last_summary: None,
        }
    }

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
        outcome: std::result::Result<(), AbortReason>,
    ) {
        let stats = &mut self.stats;
        if let Some(est) = &report.estimates {
            stats.qber = Some(est.qber_sample);
            stats.qber_upper = Some(est.qber_upper);
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
                if let AbortReason::QberTooHigh { observed, upper } = reason {
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
impl Link {
    pub(super) fn bob_start(
        &mut self,
        frame_id: u64,
        window: u64,
        record: DetectionRecord,
    ) -> Reply {
        let Some(bb84) = self.bb84.as_mut() else {
            return refuse("not a BB84 link".into());
        };
        let next = bb84.auth.next_window();
        if window < next {
            // Already burned (a retried Start): tell the Alice end where to continue.
            return Box::pin(fut::ready(Ok(PeerReply {
                ok: true,
                next_window: Some(next),
                ..PeerReply::default()
            })));
        }
        if window - next > MAX_WINDOW_SKIP {
            return refuse(format!(
                "authentication window {window} is too far ahead of {next}"
            ));
        }
        let Some(material) = bb84.auth.window(window) else {
            return refuse(format!("authentication window {window} is not held here"));
        };
        bb84.auth.burn(window);
        bb84.bob_started = Instant::now();
        let engine = bb84.engine.clone();
        self.held = None;
        let store = self.store.clone();
        let burn = Op::CommitDelivery {
            peer: self.params.peer.clone(),
            owner: auth_owner(),
            position: AuthStream::position_after(window),
            block_bytes: self.params.block_bytes,
            audit: AuditRecord::new(
                "bb84_frame_started",
                serde_json::json!({
                    "peer": self.params.peer.as_str(),
                    "frame_id": frame_id,
                    "auth_window": window,
                }),
            ),
        };
        let work = async move {
            store.send(burn.into()).await??;
            let begin = BeginBob {
                frame_id,
                auth: material,
                record,
            };
            Ok(engine.send(begin).await?)
        };
        Box::pin(fut::wrap_future(work).map(
            move |progress: Result<Progress>, act: &mut Self, _| {
                act.bob_progress(frame_id, progress?)
            },
        ))
    }

    pub(super) fn bob_step(&mut self, frame_id: u64, envelopes: Vec<Envelope>) -> Reply {
        let Some(bb84) = self.bb84.as_ref() else {
            return refuse("not a BB84 link".into());
        };
        let engine = bb84.engine.clone();
        let work = async move {
            engine
                .send(Step {
                    frame_id,
                    envelopes,
                })
                .await?
        };
        Box::pin(fut::wrap_future(work).map(
            move |progress: Result<Progress>, act: &mut Self, _| {
                act.bob_progress(frame_id, progress?)
            },
        ))
    }

    fn bob_progress(&mut self, frame_id: u64, progress: Progress) -> Result<PeerReply> {
        let peer = self.params.peer.clone();
        let finished = progress.state != FrameState::Running;
        let mut held = None;
        if let Some(bb84) = self.bb84.as_mut() {
            match progress.state {
                FrameState::Running => {}
                FrameState::Done(key) => {
                    let took = bb84.frame_time(bb84.bob_started);
                    let bits = progress.report.secret_bits;
                    bb84.record(&peer, &progress.report, bits, took, Ok(()));
                    held = Some(HeldKey {
                        frame_id,
                        key,
                        file: None,
                    });
                }
                FrameState::Aborted(reason) => {
                    let took = bb84.frame_time(bb84.bob_started);
                    bb84.record(&peer, &progress.report, 0, took, Err(reason));
                }
            }
        }
        if held.is_some() {
            self.held = held;
        }
        Ok(PeerReply {
            ok: true,
            envelopes: progress.out,
            report: finished.then_some(progress.report),
            ..PeerReply::default()
        })
    }
}
