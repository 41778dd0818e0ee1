//! The properties every session-API decoder must have on arbitrary input, shared by the
//! `cargo fuzz` targets (`fuzz/`) and the test that replays their corpus on stable Rust.
//!
//! Each function panics if a property fails, which is how a fuzzer recognises a finding:
//! - decoding never panics, whatever the bytes;
//! - whatever decodes re-encodes to something that decodes to the same value, so shuntd and
//!   apps never disagree about a message they both accept.

use crate::event::{Event, RECORD_LEN};
use crate::message::{DaemonReply, Request};

/// An app-to-shuntd datagram.
pub fn request(bytes: &[u8]) {
    if let Ok((id, request)) = Request::decode(bytes) {
        let again = Request::decode(&request.encode(id));
        assert_eq!(again, Ok((id, request)), "request does not round-trip");
    }
}

/// A shuntd-to-app datagram.
pub fn daemon_reply(bytes: &[u8]) {
    if let Ok((id, reply)) = DaemonReply::decode(bytes) {
        let again = DaemonReply::decode(&reply.encode(id));
        assert_eq!(again, Ok((id, reply)), "reply does not round-trip");
    }
}

/// An event-queue record; input shorter than a record is zero-padded, longer is cut.
pub fn event(bytes: &[u8]) {
    let mut record = [0u8; RECORD_LEN];
    let n = bytes.len().min(RECORD_LEN);
    record[..n].copy_from_slice(&bytes[..n]);
    if let Ok(event) = Event::decode(&record) {
        assert_eq!(
            Event::decode(&event.encode()),
            Ok(event),
            "event does not round-trip"
        );
    }
}
