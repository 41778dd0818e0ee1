//! The in-band handshake two Shunt sidecars exchange on their TCP connection before payload.
//!
//! ```text
//! hello  (initiator -> responder), 32 bytes:  "SHNT" | version | 'H' | 0 0 | nonce[24]
//! answer (responder -> initiator),  8 bytes:  "SHNT" | version | 'A' or 'R' | reason | 0
//! doorbell, after the switch to cut-through:   'D'
//! ```
//!
//! A responder that does not see the magic in the first bytes is talking to a peer without
//! Shunt, and those bytes are the peer's payload.
//!
//! With mutual TLS there is no hello: ALPN says both ends run Shunt, the TLS exporter gives
//! both the pairing token, and each end sends one answer-shaped frame *inside* TLS. The
//! initiator's says whether it offered the pairing to its shuntd; the responder's says whether
//! shuntd paired the two. The responder's frame is the last TLS record either end sends when
//! they switch to cut-through, so record boundaries ([`tls_record_len`]) tell where TLS ends and
//! doorbells begin.

/// First bytes of every handshake frame.
pub const MAGIC: [u8; 4] = *b"SHNT";
pub const VERSION: u8 = 1;
pub const HELLO_LEN: usize = 32;
pub const ANSWER_LEN: usize = 8;
pub const NONCE_LEN: usize = 24;
/// The one byte that says "look at the FIFOs".
pub const DOORBELL: u8 = b'D';

const KIND_HELLO: u8 = b'H';
const KIND_ACCEPT: u8 = b'A';
const KIND_REFUSE: u8 = b'R';

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("not a Shunt handshake")]
    NotShunt,
    #[error("Shunt handshake version {0} is not supported")]
    Version(u8),
    #[error("unexpected handshake frame kind {0:#04x}")]
    Kind(u8),
}

/// What the first bytes of a connection say, as far as they go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniff {
    /// Too few bytes to tell.
    NeedMore,
    /// The peer speaks Shunt (plain mode).
    Shunt,
    /// The peer starts a TLS handshake.
    Tls,
    /// The peer does not: these bytes are its payload.
    Other,
}

/// TLS record content type of a handshake message: every TLS connection starts with one.
const TLS_HANDSHAKE: u8 = 0x16;
/// Bytes in a TLS record header: type, version (2), length (2).
const TLS_HEADER_LEN: usize = 5;

/// Whether `prefix` could be, or is, the start of a Shunt handshake, or of TLS.
pub fn sniff(prefix: &[u8]) -> Sniff {
    if prefix.first() == Some(&TLS_HANDSHAKE) {
        return match prefix.get(1) {
            None => Sniff::NeedMore,
            // Every TLS version's record layer says major version 3.
            Some(3) => Sniff::Tls,
            Some(_) => Sniff::Other,
        };
    }
    let n = prefix.len().min(MAGIC.len());
    if prefix[..n] != MAGIC[..n] {
        Sniff::Other
    } else if n < MAGIC.len() {
        Sniff::NeedMore
    } else {
        Sniff::Shunt
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    pub nonce: [u8; NONCE_LEN],
}

impl Hello {
    pub fn parse(b: &[u8; HELLO_LEN]) -> Result<Self, WireError> {
        check_header(&b[..6], KIND_HELLO)?;
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&b[8..]);
        Ok(Hello { nonce })
    }

    pub fn emit(&self) -> [u8; HELLO_LEN] {
        let mut b = [0u8; HELLO_LEN];
        b[..4].copy_from_slice(&MAGIC);
        b[4] = VERSION;
        b[5] = KIND_HELLO;
        b[8..].copy_from_slice(&self.nonce);
        b
    }
}

/// Why a responder declined cut-through; the connection then carries payload itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefuseReason {
    /// The responder's shuntd is unreachable.
    ShuntdDown,
    /// shuntd did not pair the two ends in time.
    Timeout,
    /// shuntd refused the pairing (a full segment, a conflict).
    Refused,
    /// shuntd's rules deny the pair: the connection must close.
    Denied,
    Unknown(u8),
}

impl RefuseReason {
    fn to_wire(self) -> u8 {
        match self {
            RefuseReason::ShuntdDown => 1,
            RefuseReason::Timeout => 2,
            RefuseReason::Refused => 3,
            RefuseReason::Denied => 4,
            RefuseReason::Unknown(n) => n,
        }
    }
    fn from_wire(n: u8) -> Self {
        match n {
            1 => RefuseReason::ShuntdDown,
            2 => RefuseReason::Timeout,
            3 => RefuseReason::Refused,
            4 => RefuseReason::Denied,
            n => RefuseReason::Unknown(n),
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            RefuseReason::ShuntdDown => "peer_shuntd_down",
            RefuseReason::Timeout => "peer_pairing_timeout",
            RefuseReason::Refused => "peer_pairing_refused",
            RefuseReason::Denied => "pairing_denied",
            RefuseReason::Unknown(_) => "peer_unknown_reason",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Accept,
    Refuse(RefuseReason),
}

impl Answer {
    pub fn parse(b: &[u8; ANSWER_LEN]) -> Result<Self, WireError> {
        check_header(&b[..5], 0)?;
        match b[5] {
            KIND_ACCEPT => Ok(Answer::Accept),
            KIND_REFUSE => Ok(Answer::Refuse(RefuseReason::from_wire(b[6]))),
            k => Err(WireError::Kind(k)),
        }
    }

    pub fn emit(&self) -> [u8; ANSWER_LEN] {
        let mut b = [0u8; ANSWER_LEN];
        b[..4].copy_from_slice(&MAGIC);
        b[4] = VERSION;
        match self {
            Answer::Accept => b[5] = KIND_ACCEPT,
            Answer::Refuse(r) => {
                b[5] = KIND_REFUSE;
                b[6] = r.to_wire();
            }
        }
        b
    }
}

/// The length, header included, of the TLS record at the start of `buf`, once all of it is
/// there. The length field is the peer's word: an oversized record is left for TLS to refuse.
pub fn tls_record_len(buf: &[u8]) -> Option<usize> {
    let header = buf.get(..TLS_HEADER_LEN)?;
    let len = TLS_HEADER_LEN + usize::from(u16::from_be_bytes([header[3], header[4]]));
    (buf.len() >= len).then_some(len)
}

/// Checks magic, version and (when `kind` is not 0) the frame kind.
fn check_header(b: &[u8], kind: u8) -> Result<(), WireError> {
    if b[..4] != MAGIC {
        return Err(WireError::NotShunt);
    }
    if b[4] != VERSION {
        return Err(WireError::Version(b[4]));
    }
    if kind != 0 && b[5] != kind {
        return Err(WireError::Kind(b[5]));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let h = Hello {
            nonce: [9; NONCE_LEN],
        };
        assert_eq!(Hello::parse(&h.emit()), Ok(h));
        for a in [
            Answer::Accept,
            Answer::Refuse(RefuseReason::Timeout),
            Answer::Refuse(RefuseReason::Unknown(77)),
        ] {
            assert_eq!(Answer::parse(&a.emit()), Ok(a));
        }
    }

    #[test]
    fn rejects_other_versions_and_kinds() {
        let mut h = Hello {
            nonce: [0; NONCE_LEN],
        }
        .emit();
        h[4] = 2;
        assert_eq!(Hello::parse(&h), Err(WireError::Version(2)));
        let a = Answer::Accept.emit();
        let mut as_hello = [0u8; HELLO_LEN];
        as_hello[..ANSWER_LEN].copy_from_slice(&a);
        assert_eq!(Hello::parse(&as_hello), Err(WireError::Kind(b'A')));
        let mut a = Answer::Accept.emit();
        a[5] = b'Z';
        assert_eq!(Answer::parse(&a), Err(WireError::Kind(b'Z')));
    }

    #[test]
    fn sniff_decides_on_the_first_differing_byte() {
        assert_eq!(sniff(b""), Sniff::NeedMore);
        assert_eq!(sniff(b"SH"), Sniff::NeedMore);
        assert_eq!(sniff(b"SHNT"), Sniff::Shunt);
        assert_eq!(sniff(b"GET / HTTP/1.1"), Sniff::Other);
        assert_eq!(sniff(b"SHX"), Sniff::Other);
        assert_eq!(sniff(&[0x16]), Sniff::NeedMore);
        assert_eq!(sniff(&[0x16, 0x03, 0x01]), Sniff::Tls, "a TLS ClientHello");
        assert_eq!(sniff(&[0x16, 0x04]), Sniff::Other);
    }

    #[test]
    fn tls_records_end_where_their_header_says() {
        assert_eq!(tls_record_len(&[0x17, 3, 3, 0]), None, "header incomplete");
        assert_eq!(
            tls_record_len(&[0x17, 3, 3, 0, 2, 9]),
            None,
            "body incomplete"
        );
        assert_eq!(tls_record_len(&[0x17, 3, 3, 0, 2, 9, 9]), Some(7));
        assert_eq!(
            tls_record_len(&[0x17, 3, 3, 0, 0, b'D', b'D']),
            Some(5),
            "what follows a record is not part of it"
        );
    }
}
