//! [`TlsStream`]: one TLS connection driven by an event loop that owns the socket.

use std::io::{self, Read, Write};
use std::net::Ipv4Addr;
use std::sync::Arc;

use rustls::server::Acceptor;
use rustls::{ClientConnection, Connection, ProtocolVersion};
use rustls_pki_types::ServerName;

use crate::context::{Configs, TlsContext};
use crate::error::TlsError;
use crate::identity::{SpiffeId, spiffe_id_from_cert};

/// The ALPN protocol by which two Shunt endpoints recognise each other.
pub const SHUNT_ALPN: &[u8] = b"shunt/1";

/// The TLS exporter label of the pairing token (RFC 5705 / RFC 8446 section 7.5).
const PAIRING_LABEL: &[u8] = b"EXPORTER-shunt-pairing-v1";

/// Who the peer is, known once the handshake has completed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// The SPIFFE id of the peer's certificate, already checked against the policy.
    pub identity: SpiffeId,
    /// The negotiated ALPN protocol, if any.
    pub alpn: Option<Vec<u8>>,
    /// The negotiated TLS version.
    pub tls_version: ProtocolVersion,
}

/// What [`TlsStream::read_plaintext`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadOutcome {
    /// This many bytes were copied into the buffer.
    Data(usize),
    /// No plaintext is available now; feed more ciphertext.
    WouldBlock,
    /// The peer sent `close_notify`, and all its data has been read.
    Closed,
    /// The transport reached end of file without `close_notify`: the data may be truncated.
    UncleanEof,
}

/// A sans-IO TLS connection: the caller moves ciphertext between the socket and
/// [`feed`](Self::feed) / [`pending_output`](Self::pending_output), and plaintext through
/// [`write_plaintext`](Self::write_plaintext) / [`read_plaintext`](Self::read_plaintext).
///
/// After each `feed`, and after writing plaintext or `close_notify`, send what
/// [`pending_output`](Self::pending_output) yields; also after an error, which usually leaves an
/// alert to send.
///
/// With TLS 1.3 a client completes its handshake before the server has checked the client's
/// certificate: a server that refuses it answers with an alert, which the client's next
/// [`feed`](Self::feed) reports as an error.
pub struct TlsStream {
    state: State,
    peer: Option<PeerInfo>,
    /// The transport reached end of file.
    eof: bool,
}

enum State {
    /// A server waiting for the whole ClientHello before choosing its configuration.
    Accepting {
        acceptor: Box<Acceptor>,
        configs: Arc<Configs>,
    },
    Connected(Box<Connection>),
    /// The ClientHello was rejected; `alert` is what remains to be sent.
    Rejected {
        error: rustls::Error,
        alert: Vec<u8>,
    },
}

impl TlsStream {
    /// Starts a client handshake. With `offer_shunt`, [`SHUNT_ALPN`] is offered before the
    /// context's ordinary protocols.
    pub fn client(context: &TlsContext, offer_shunt: bool) -> Result<Self, TlsError> {
        let configs = context.configs_for_new_connection();
        // Neither sent (no SNI for an address) nor checked (peers are identified by SPIFFE id).
        let name = ServerName::IpAddress(Ipv4Addr::UNSPECIFIED.into());
        let connection = ClientConnection::new(configs.client(offer_shunt), name)?;
        Ok(Self::with_state(State::Connected(Box::new(
            connection.into(),
        ))))
    }

    /// Starts a server handshake.
    pub fn server(context: &TlsContext) -> Self {
        Self::with_state(State::Accepting {
            acceptor: Box::default(),
            configs: context.configs_for_new_connection(),
        })
    }

    fn with_state(state: State) -> Self {
        Self {
            state,
            peer: None,
            eof: false,
        }
    }

    /// Takes ciphertext received from the peer and processes it. Returns how much was taken:
    /// less than `ciphertext.len()` when received plaintext is waiting to be read (read it,
    /// then feed the rest). Input after the peer's `close_notify` is discarded.
    ///
    /// An error is fatal for the connection; [`TlsError::failure`] classifies it.
    pub fn feed(&mut self, ciphertext: &[u8]) -> Result<usize, TlsError> {
        let mut taken = 0;
        if let State::Accepting { acceptor, configs } = &mut self.state {
            match accept(acceptor, configs, ciphertext, &mut taken) {
                Ok(None) => return Ok(taken),
                Ok(Some(connection)) => self.state = State::Connected(Box::new(connection)),
                Err((error, alert)) => {
                    self.state = State::Rejected {
                        error: error.clone(),
                        alert,
                    };
                    return Err(error.into());
                }
            }
        }
        let connection = match &mut self.state {
            State::Connected(connection) => connection,
            State::Rejected { error, .. } => return Err(error.clone().into()),
            State::Accepting { .. } => unreachable!("left above"),
        };
        // The acceptor may have buffered records after the ClientHello.
        connection.process_new_packets()?;
        taken += take_records(connection, &ciphertext[taken..])?;
        if self.peer.is_none() && !connection.is_handshaking() {
            self.peer = Some(peer_info(connection)?);
        }
        Ok(taken)
    }

    /// Records that the transport reached end of file. Unless the peer sent `close_notify`,
    /// [`read_plaintext`](Self::read_plaintext) then reports [`ReadOutcome::UncleanEof`] once
    /// the buffered data has been read.
    pub fn feed_eof(&mut self) {
        self.eof = true;
    }

    /// Appends to `out` the ciphertext to send to the peer.
    pub fn pending_output(&mut self, out: &mut Vec<u8>) {
        match &mut self.state {
            State::Accepting { .. } => {}
            State::Connected(connection) => {
                while connection.wants_write() {
                    // Writing to a Vec cannot fail.
                    if connection.write_tls(out).is_err() {
                        break;
                    }
                }
            }
            State::Rejected { alert, .. } => out.append(alert),
        }
    }

    /// Whether [`pending_output`](Self::pending_output) has something to send.
    pub fn wants_write(&self) -> bool {
        match &self.state {
            State::Accepting { .. } => false,
            State::Connected(connection) => connection.wants_write(),
            State::Rejected { alert, .. } => !alert.is_empty(),
        }
    }

    /// Whether the handshake has yet to complete (also true after it failed).
    pub fn is_handshaking(&self) -> bool {
        self.peer.is_none()
    }

    /// The peer, once the handshake has completed.
    pub fn peer(&self) -> Option<&PeerInfo> {
        self.peer.as_ref()
    }

    /// Whether both ends agreed on [`SHUNT_ALPN`].
    pub fn negotiated_shunt(&self) -> bool {
        self.peer
            .as_ref()
            .is_some_and(|peer| peer.alpn.as_deref() == Some(SHUNT_ALPN))
    }

    /// A secret both ends derive from this TLS session (the exporter with label
    /// `EXPORTER-shunt-pairing-v1` and no context): equal at both ends of a connection, different
    /// for every connection. Available once the handshake has completed.
    pub fn pairing_token(&self) -> Result<[u8; 32], TlsError> {
        match &self.state {
            State::Connected(connection) if self.peer.is_some() => {
                Ok(connection.export_keying_material([0; 32], PAIRING_LABEL, None)?)
            }
            _ => Err(rustls::Error::HandshakeNotComplete.into()),
        }
    }

    /// Queues plaintext for the peer and returns how much was taken (bounded by rustls' buffer
    /// limit; zero when full). Data written during the handshake is sent when it completes.
    pub fn write_plaintext(&mut self, plaintext: &[u8]) -> usize {
        match &mut self.state {
            State::Connected(connection) => connection.writer().write(plaintext).unwrap_or(0),
            State::Accepting { .. } | State::Rejected { .. } => 0,
        }
    }

    /// Copies received plaintext into `buf`.
    pub fn read_plaintext(&mut self, buf: &mut [u8]) -> Result<ReadOutcome, TlsError> {
        let connection = match &mut self.state {
            State::Connected(connection) => connection,
            State::Accepting { .. } => return Ok(self.nothing_to_read()),
            State::Rejected { error, .. } => return Err(error.clone().into()),
        };
        match connection.reader().read(buf) {
            Ok(0) if !buf.is_empty() => Ok(ReadOutcome::Closed),
            Ok(n) => Ok(ReadOutcome::Data(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(self.nothing_to_read()),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(ReadOutcome::UncleanEof),
            Err(e) => Err(TlsError::Input(e)),
        }
    }

    fn nothing_to_read(&self) -> ReadOutcome {
        if self.eof {
            ReadOutcome::UncleanEof
        } else {
            ReadOutcome::WouldBlock
        }
    }

    /// Queues a `close_notify` alert: no more plaintext will be written.
    pub fn send_close_notify(&mut self) {
        if let State::Connected(connection) = &mut self.state {
            connection.send_close_notify();
        }
    }
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &self.state {
            State::Accepting { .. } => "accepting",
            State::Connected(connection) if connection.is_handshaking() => "handshaking",
            State::Connected(_) => "connected",
            State::Rejected { .. } => "rejected",
        };
        f.debug_struct("TlsStream")
            .field("state", &state)
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

/// Feeds the acceptor until the ClientHello is complete, then starts the server connection
/// with the configuration matching the client's ALPN offer.
fn accept(
    acceptor: &mut Acceptor,
    configs: &Configs,
    ciphertext: &[u8],
    taken: &mut usize,
) -> Result<Option<Connection>, (rustls::Error, Vec<u8>)> {
    let rejected = |error, mut alert: rustls::server::AcceptedAlert| {
        let mut bytes = Vec::new();
        // Writing to a Vec cannot fail.
        let _ = alert.write_all(&mut bytes);
        (error, bytes)
    };
    while *taken < ciphertext.len() {
        let mut input = &ciphertext[*taken..];
        match acceptor.read_tls(&mut input) {
            Ok(0) => break,
            Ok(n) => *taken += n,
            Err(e) => {
                let error = rustls::Error::General(format!("reading ClientHello: {e}"));
                return Err((error, Vec::new()));
            }
        }
        match acceptor.accept() {
            Ok(None) => {}
            Ok(Some(accepted)) => {
                let config = configs.server(accepted.client_hello().alpn());
                return match accepted.into_connection(config) {
                    Ok(connection) => Ok(Some(connection.into())),
                    Err((error, alert)) => Err(rejected(error, alert)),
                };
            }
            Err((error, alert)) => return Err(rejected(error, alert)),
        }
    }
    Ok(None)
}

/// Moves records into the connection and processes them; returns how many bytes were taken.
fn take_records(connection: &mut Connection, ciphertext: &[u8]) -> Result<usize, TlsError> {
    let mut taken = 0;
    while taken < ciphertext.len() {
        let mut input = &ciphertext[taken..];
        match connection.read_tls(&mut input) {
            // Only after close_notify: nothing more is accepted from the peer.
            Ok(0) => return Ok(ciphertext.len()),
            Ok(n) => taken += n,
            // rustls refuses input while too much plaintext waits to be read.
            Err(e) if e.kind() == io::ErrorKind::Other => break,
            Err(e) => return Err(TlsError::Input(e)),
        }
        connection.process_new_packets()?;
    }
    Ok(taken)
}

fn peer_info(connection: &Connection) -> Result<PeerInfo, TlsError> {
    let leaf = connection
        .peer_certificates()
        .and_then(<[_]>::first)
        .ok_or(crate::identity::IdentityError::NoSpiffeId)?;
    Ok(PeerInfo {
        identity: spiffe_id_from_cert(leaf)?,
        alpn: connection.alpn_protocol().map(<[u8]>::to_vec),
        tls_version: connection
            .protocol_version()
            .unwrap_or(ProtocolVersion::Unknown(0)),
    })
}
