//! Data parallelism inside one link end: the stages that split into independent pieces
//! (Cascade's per-pass permutations, privacy amplification's convolution pieces) run on
//! scoped threads so one end's frame work uses every core while the other end waits for
//! its answer.

use std::num::NonZeroUsize;
use std::sync::OnceLock;

/// Threads one end uses for a stage: the machine's cores, at most 4 (more helps little
/// and a KME runs one engine per link end).
pub fn workers() -> usize {
    static WORKERS: OnceLock<usize> = OnceLock::new();
    *WORKERS.get_or_init(|| {
        std::thread::available_parallelism()
            .map_or(1, NonZeroUsize::get)
            .clamp(1, 4)
    })
}

/// `items.iter().map(f).collect()`, with the items split over [`workers`] threads; the
/// results keep the items' order. A chunk whose thread the OS refuses runs on the calling
/// thread (slower, not wrong).
pub fn map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let chunk = items.len().div_ceil(workers()).max(1);
    if items.len() <= 1 || workers() == 1 {
        return items.iter().map(f).collect();
    }
    std::thread::scope(|scope| {
        let f = &f;
        let parts: Vec<_> = items
            .chunks(chunk)
            .skip(1)
            .map(|part| {
                let worker = std::thread::Builder::new()
                    .spawn_scoped(scope, move || part.iter().map(f).collect::<Vec<R>>());
                (part, worker)
            })
            .collect();
        // The first chunk runs on the calling thread.
        let mut out: Vec<R> = items.iter().take(chunk).map(f).collect();
        for (part, worker) in parts {
            match worker.map(|handle| handle.join()) {
                Ok(Ok(results)) => out.extend(results),
                // A worker only panics if `f` does; the caller's stage then fails the same way.
                Ok(Err(payload)) => std::panic::resume_unwind(payload),
                Err(_) => out.extend(part.iter().map(f)),
            }
        }
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_keeps_order_for_every_length() {
        for len in 0..40usize {
            let items: Vec<usize> = (0..len).collect();
            let doubled = map(&items, |x| 2 * x);
            assert_eq!(doubled, items.iter().map(|x| 2 * x).collect::<Vec<_>>());
        }
    }
}
