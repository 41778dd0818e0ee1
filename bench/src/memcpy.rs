//! The memcpy baseline: what one core can copy, the ceiling for any one-copy transport.

use std::hint::black_box;
use std::time::{Duration, Instant};

/// Larger than any last-level cache here, so big copies measure memory, not cache.
const BUFFER: usize = 64 << 20;

pub(crate) struct Copied {
    pub(crate) bytes: u64,
    pub(crate) secs: f64,
}

/// Copies `msg_size` chunks from one buffer to another for about `duration` or `max_bytes`.
pub(crate) fn run(msg_size: usize, duration: Duration, max_bytes: u64) -> Copied {
    let chunk = msg_size.min(BUFFER);
    let src: Vec<u8> = (0..BUFFER).map(|i| i as u8).collect();
    let mut dst = vec![0u8; BUFFER];
    // Touch the destination once so page faults are not billed to the copy.
    dst.copy_from_slice(&src);
    let chunks = BUFFER / chunk;
    let start = Instant::now();
    let mut copied = 0u64;
    let mut i = 0usize;
    while copied < max_bytes {
        let off = i * chunk;
        // black_box on both sides keeps the compiler from merging or skipping copies.
        black_box(&mut dst[off..off + chunk]).copy_from_slice(black_box(&src[off..off + chunk]));
        copied += chunk as u64;
        i += 1;
        if i == chunks {
            i = 0;
        }
        if i.is_multiple_of(64) && start.elapsed() >= duration {
            break;
        }
    }
    black_box(&dst);
    Copied {
        bytes: copied,
        secs: start.elapsed().as_secs_f64(),
    }
}
