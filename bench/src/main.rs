//! `kme-bench`: the benchmarks of kme, apart from the server. `load` drives running KMEs over
//! mTLS as SAEs do (`make bench`); `link` runs the BB84 post-processing of one link unpaced,
//! in process (`make bench-link`).
//!
//! | file | what |
//! |---|---|
//! | `loadgen.rs` | the load generator (mTLS, keep-alive, verified enc/dec pairs, latency histograms) |
//! | `link_bench.rs` | BB84 post-processing per QBER, and key rate vs distance |

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

mod link_bench;
mod loadgen;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// mimalloc, as in the `kme` binary: the load generator allocates per request on several
/// threads too.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "kme-bench",
    version,
    about = "Benchmarks of the kme KME runtime"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load generator: drive running KMEs over mTLS and print keys/s and latency percentiles.
    /// Exit status 2 if any key differed between enc_keys and dec_keys, 3 if nothing succeeded.
    Load(Box<loadgen::LoadOptions>),
    /// Benchmark the BB84 post-processing of one link, unpaced, at QBER 1, 2, 3, 5 and 8 %.
    Link {
        /// JSON report (per QBER: qber, efficiency, frame_error_rate, sifted/secret bits/s).
        #[arg(long, default_value = "var/bench/link.json")]
        out: PathBuf,
        /// Full frames (simulation + all stages) per QBER.
        #[arg(long, default_value_t = 8)]
        frames: usize,
        /// Cascade-only frames of 2^20 bits per QBER, for the frame error rate.
        #[arg(long, default_value_t = 1000)]
        cascade_frames: usize,
    },
}

fn main() -> ExitCode {
    env_logger::init_from_env(env_logger::Env::new().default_filter_or("info"));
    match Cli::parse().command {
        Command::Load(options) => load(&options),
        Command::Link {
            out,
            frames,
            cascade_frames,
        } => match link_bench::run(&out, frames, cascade_frames) {
            Ok(()) => ExitCode::SUCCESS,
            Err(message) => {
                eprintln!("kme-bench link: {message}");
                ExitCode::FAILURE
            }
        },
    }
}

/// The load run has exit codes of its own (mismatch, nothing succeeded).
fn load(options: &loadgen::LoadOptions) -> ExitCode {
    match loadgen::run(options) {
        Ok(report) => {
            report.print_human();
            if let Some(path) = &options.json_out {
                println!("  report      {}", path.display());
            }
            if report.mismatches > 0 {
                ExitCode::from(2)
            } else if report.requests == 0 {
                eprintln!(
                    "kme-bench load: no request succeeded ({} failed)",
                    report.errors_total()
                );
                ExitCode::from(3)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(err) => {
            eprintln!("kme-bench load: {err}");
            ExitCode::FAILURE
        }
    }
}
