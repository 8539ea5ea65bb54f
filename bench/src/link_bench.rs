//! Unpaced link benchmark: runs simulated frames through both post-processing ends at
//! several QBERs and reports throughput, reconciliation efficiency, frame error rate and
//! per-stage times (steady state: a warm-up frame per QBER is not counted); writes the
//! per-QBER results as JSON. Also prints the simulated finite-key secret key rate against
//! the asymptotic decoy-BB84 curve for 10..100 km.
//!
//! The two ends take turns on the calling thread, as over a network; each end spreads its
//! parallel stages (Cascade's permutations, privacy amplification's pieces) over the
//! machine's cores, as it does in a running KME.
//!
//! `kme-bench link` (and `make bench-link`) run it; build with `--release`.

use kme_bb84::cascade::{add_noise, random_key, reconcile_in_process, CascadeConfig};
use kme_bb84::channel::{theoretical_key_rate, ChannelParams};
use kme_bb84::finite_key::{FiniteKey, TAGS_PER_FRAME, TAG_FORGERY};
use kme_bb84::pipeline::{run_frame_in_process, SimParams, StageTimes};
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::Serialize;

#[derive(Serialize)]
struct QberResult {
    qber: f64,
    measured_qber: f64,
    efficiency: f64,
    efficiency_cascade_only: f64,
    frame_error_rate: f64,
    cascade_frames: usize,
    cascade_frame_bits: usize,
    pipeline_frames: usize,
    aborted_frames: usize,
    sifted_bits_per_s: f64,
    secret_bits_per_s: f64,
    link_secret_bits_per_s: f64,
    secret_fraction: f64,
    cascade_rounds: f64,
    stage_ms: StageMs,
    /// Per full frame, what the finite-key bound used and gave (recompute the length from it).
    frames: Vec<FiniteKey>,
}

#[derive(Serialize, Default)]
struct StageMs {
    sifting: f64,
    estimation: f64,
    cascade: f64,
    verification: f64,
    privacy: f64,
    auth: f64,
    total: f64,
    channel_sim: f64,
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Runs `frames` full frames and `ec_frames` Cascade-only frames per QBER; writes JSON to
/// `out_path`.
pub fn run(out_path: &std::path::Path, frames: usize, ec_frames: usize) -> Result<(), String> {
    let mut rng = StdRng::seed_from_u64(2024);
    let mut results = Vec::new();
    let defaults = SimParams::default();
    let eps = defaults.pp.estimation.eps;
    println!(
        "Finite-key bound: Lim et al., PRA 89, 022307 (2014); eps_sec = {:.0e} (each of its \
         bounds {:.1e}), eps_cor = {:.0e} (or the verification hash's collision bound if \
         larger), authentication <= {TAGS_PER_FRAME} tags x {:.1e}; a frame fails with \
         probability <= {:.2e}. Cascade leakage counted: {:?}.\n",
        eps.eps_sec,
        eps.per_bound(),
        eps.eps_cor,
        TAG_FORGERY,
        eps.total(),
        defaults.pp.cascade_leakage
    );
    println!(
        "{:>5} {:>7} {:>6} {:>6} {:>9} {:>10} {:>10} {:>10} {:>6} | ms/frame: {:>5} {:>5} {:>6} {:>5} {:>6} {:>5}",
        "QBER", "meas", "f_pipe", "f_ec", "FER", "sift Mb/s", "sec Mb/s", "link kb/s", "rounds",
        "sift", "est", "casc", "ver", "PA", "auth"
    );
    for target in [0.01, 0.02, 0.03, 0.05, 0.08] {
        let mut p = SimParams::default();
        // Dark counts add ~3e-5 at 20 km; misalignment sets the QBER.
        p.channel.misalignment = target;
        let mut times = StageTimes::default();
        let (mut sifted, mut secret, mut pulses, mut f_sum, mut q_sum, mut rounds) =
            (0u64, 0u64, 0u64, 0.0, 0.0, 0.0);
        let mut aborted = 0usize;
        let mut ok = 0usize;
        let mut chan = std::time::Duration::ZERO;
        let mut bounds = Vec::new();
        // One frame first, not counted: it builds the transform plans and buffers that a
        // running link keeps from frame to frame.
        run_frame_in_process(&p, &mut rng).map_err(|err| format!("channel parameters: {err}"))?;
        for _ in 0..frames {
            let o = run_frame_in_process(&p, &mut rng)
                .map_err(|err| format!("channel parameters: {err}"))?;
            if o.alice_key != o.bob_key {
                return Err(format!("KEY MISMATCH at QBER {target}"));
            }
            times = times.add(&o.stage_times);
            chan += o.channel_time;
            sifted += o.sifted_bits;
            secret += o.secret_bits;
            pulses += p.pulses;
            if o.aborted.is_some() {
                aborted += 1;
            }
            bounds.extend(o.finite_key);
            if o.n_key > 0 && o.efficiency > 0.0 {
                ok += 1;
                f_sum += o.efficiency;
                q_sum += o.qber;
                rounds += f64::from(o.rounds);
            }
        }
        // Cascade-only runs for FER and efficiency statistics on many frames.
        let n = 1usize << 20;
        let cfg = CascadeConfig::default();
        let (mut fails, mut leaked, mut hsum) = (0usize, 0u64, 0.0);
        for t in 0..ec_frames {
            let a = random_key(n, &mut rng);
            let b = add_noise(&a, target, &mut rng);
            match reconcile_in_process(&a, &b, target, &cfg, rng.next_u64() ^ t as u64) {
                Ok((c, st)) => {
                    if c != a {
                        fails += 1;
                    }
                    leaked += st.leaked;
                    hsum += n as f64 * kme_bb84::math::h2(st.corrected as f64 / n as f64);
                }
                Err(_) => fails += 1,
            }
        }
        let total = times.total().as_secs_f64();
        let nf = frames as f64;
        let r = QberResult {
            qber: target,
            measured_qber: if ok > 0 { q_sum / ok as f64 } else { 0.0 },
            efficiency: if ok > 0 { f_sum / ok as f64 } else { 0.0 },
            efficiency_cascade_only: if hsum > 0.0 {
                leaked as f64 / hsum
            } else {
                0.0
            },
            frame_error_rate: fails as f64 / ec_frames.max(1) as f64,
            cascade_frames: ec_frames,
            cascade_frame_bits: n,
            pipeline_frames: frames,
            aborted_frames: aborted,
            sifted_bits_per_s: sifted as f64 / total,
            secret_bits_per_s: secret as f64 / total,
            link_secret_bits_per_s: secret as f64 / (pulses as f64 / p.channel.pulse_rate_hz),
            secret_fraction: secret as f64 / sifted.max(1) as f64,
            cascade_rounds: if ok > 0 { rounds / ok as f64 } else { 0.0 },
            stage_ms: StageMs {
                sifting: ms(times.sifting) / nf,
                estimation: ms(times.estimation) / nf,
                cascade: ms(times.cascade) / nf,
                verification: ms(times.verification) / nf,
                privacy: ms(times.privacy) / nf,
                auth: ms(times.auth) / nf,
                total: ms(times.total()) / nf,
                channel_sim: ms(chan) / nf,
            },
            frames: bounds,
        };
        println!(
            "{:>5.3} {:>7.4} {:>6.3} {:>6.3} {:>9.2e} {:>10.2} {:>10.2} {:>10.1} {:>6.0} | ms/frame: {:>5.1} {:>5.1} {:>6.1} {:>5.1} {:>6.1} {:>5.1}  (aborted {}/{})",
            r.qber, r.measured_qber, r.efficiency, r.efficiency_cascade_only, r.frame_error_rate,
            r.sifted_bits_per_s / 1e6, r.secret_bits_per_s / 1e6, r.link_secret_bits_per_s / 1e3,
            r.cascade_rounds, r.stage_ms.sifting, r.stage_ms.estimation, r.stage_ms.cascade,
            r.stage_ms.verification, r.stage_ms.privacy, r.stage_ms.auth, aborted, frames
        );
        results.push(r);
    }
    let json = serde_json::to_string_pretty(&results).map_err(|err| err.to_string())?;
    if let Some(dir) = out_path.parent() {
        std::fs::create_dir_all(dir).map_err(|err| format!("{}: {err}", dir.display()))?;
    }
    std::fs::write(out_path, json).map_err(|err| format!("{}: {err}", out_path.display()))?;
    println!("\nreport: {}", out_path.display());
    println!(
        "\nSecret key rate vs fibre length (mis 1%, ~1.1 Mbit sifted key bits per frame, 1 GHz),\n\
         against the asymptotic rate (infinite frames) with Cascade's leakage counted once and\n\
         twice (both ends' parities, as the finite-key bound here counts it):"
    );
    println!(
        "{:>4} {:>14} {:>16} {:>18}",
        "km", "sim bit/s", "asym. f=1.10", "asym. 2 x 1.10"
    );
    for km in (10..=100).step_by(10) {
        let ch = ChannelParams {
            fibre_km: f64::from(km),
            ..ChannelParams::default()
        };
        let p = SimParams {
            pulses: ch.pulses_for_sifted(1_100_000.0),
            channel: ch.clone(),
            ..SimParams::default()
        };
        let mut secret = 0u64;
        let runs = 2u64;
        for _ in 0..runs {
            if let Ok(o) = run_frame_in_process(&p, &mut rng) {
                secret += o.secret_bits;
            }
        }
        let sim = secret as f64 / (runs as f64 * p.pulses as f64 / ch.pulse_rate_hz);
        println!(
            "{:>4} {:>14.0} {:>16.0} {:>18.0}",
            km,
            sim,
            theoretical_key_rate(&ch, 1.10) * ch.pulse_rate_hz,
            theoretical_key_rate(&ch, 2.2) * ch.pulse_rate_hz
        );
    }
    Ok(())
}
