//! The streamed payload and its check, so a transport that loses, duplicates or reorders bytes
//! fails instead of reporting a number.
//!
//! The byte at stream offset `i` is `i mod PERIOD`. The writer precomputes one buffer and
//! slides a window over it, so producing the stream costs nothing; the reader checks a sparse
//! sample of every read (plus its last byte) so checking costs next to nothing either, yet any
//! shift of the stream by a non-multiple of the period is caught at once and the byte count
//! catches the rest.

/// A prime, so runs of any power-of-two length never line up with it.
const PERIOD: usize = 251;
/// Also prime and coprime with PERIOD, so the samples visit every phase of the pattern.
const STRIDE: usize = 509;

/// The writer's side: windows of `msg_size` bytes continuing the stream.
pub(crate) struct Source {
    buf: Vec<u8>,
    msg_size: usize,
    phase: usize,
}

impl Source {
    pub(crate) fn new(msg_size: usize) -> Self {
        let buf = (0..msg_size + PERIOD).map(|i| (i % PERIOD) as u8).collect();
        Self {
            buf,
            msg_size,
            phase: 0,
        }
    }

    /// The next `len` (at most `msg_size`) bytes of the stream.
    pub(crate) fn next(&mut self, len: usize) -> &[u8] {
        let len = len.min(self.msg_size);
        let start = self.phase;
        self.phase = (self.phase + len) % PERIOD;
        &self.buf[start..start + len]
    }
}

/// The reader's side.
#[derive(Default)]
pub(crate) struct Checker {
    offset: u64,
}

impl Checker {
    /// Checks one read of `chunk` at the current offset and advances past it.
    pub(crate) fn feed(&mut self, chunk: &[u8]) -> anyhow::Result<()> {
        if chunk.is_empty() {
            return Ok(());
        }
        let base = (self.offset % PERIOD as u64) as usize;
        let mut phase = base;
        let mut i = 0;
        while i < chunk.len() {
            if chunk[i] != phase as u8 {
                anyhow::bail!(
                    "payload corrupt at stream offset {}: got {:#04x}, expected {:#04x}",
                    self.offset + i as u64,
                    chunk[i],
                    phase
                );
            }
            i += STRIDE;
            phase = (phase + STRIDE) % PERIOD;
        }
        let last = chunk.len() - 1;
        let want = ((base + last) % PERIOD) as u8;
        if chunk[last] != want {
            anyhow::bail!(
                "payload corrupt at stream offset {}",
                self.offset + last as u64
            );
        }
        self.offset += chunk.len() as u64;
        Ok(())
    }

    pub(crate) fn bytes(&self) -> u64 {
        self.offset
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_split_of_the_stream_checks() {
        let mut src = Source::new(1000);
        let mut stream = Vec::new();
        for len in [1, 999, 1000, 7, 250, 251, 252] {
            stream.extend_from_slice(src.next(len));
        }
        let mut c = Checker::default();
        for piece in stream.chunks(613) {
            c.feed(piece).unwrap();
        }
        assert_eq!(c.bytes(), stream.len() as u64);
    }

    #[test]
    fn lost_bytes_are_caught() {
        let mut src = Source::new(4096);
        let a = src.next(4096).to_vec();
        let _lost = src.next(100).to_vec();
        let b = src.next(4096).to_vec();
        let mut c = Checker::default();
        c.feed(&a).unwrap();
        assert!(c.feed(&b).is_err());
    }
}
