//! Passing file descriptors (segments, wake-up channels) over Unix sockets with `SCM_RIGHTS`.
//!
//! # Rules
//!
//! * Received descriptors become [`OwnedFd`]s immediately, inside this function, so no early
//!   return can leak one; they arrive close-on-exec (`MSG_CMSG_CLOEXEC`), so a concurrent
//!   `fork`+`exec` elsewhere in the process cannot inherit them.
//! * The control buffer is sized for the kernel's per-message maximum ([`MAX_FDS_PER_MESSAGE`]),
//!   so a peer that sends more descriptors than the caller expects does not make the kernel
//!   truncate the control data; descriptors beyond `max_fds` are closed here and the call
//!   succeeds with the first `max_fds`.
//! * A truncated message — payload (`MSG_TRUNC`, datagram/seqpacket sockets) or control data
//!   (`MSG_CTRUNC`) — is an error: the message cannot be interpreted, and every descriptor that did
//!   arrive with it is closed.
//! * Works on `SOCK_SEQPACKET` and `SOCK_STREAM`, blocking or not; `WouldBlock` is returned as is
//!   and `EINTR` is retried. Sends use `MSG_NOSIGNAL`, so a vanished peer is an `EPIPE` error rather
//!   than a process-killing `SIGPIPE`.
//!
//! `rustix` builds and parses the control messages, so this module needs no `unsafe`.

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};

use rustix::io::Errno;
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketFlags, SocketType, recvmsg,
    sendmsg, socketpair,
};

/// The kernel's limit on descriptors in one `SCM_RIGHTS` message (`SCM_MAX_FD`).
pub const MAX_FDS_PER_MESSAGE: usize = 253;

const SEND_SPACE: usize = rustix::cmsg_space!(ScmRights(MAX_FDS_PER_MESSAGE));
const RECV_SPACE: usize = rustix::cmsg_space!(ScmRights(MAX_FDS_PER_MESSAGE), ScmCredentials(1));

/// Sends `data` with `fds` attached; returns the number of data bytes sent.
///
/// `data` must be non-empty when `fds` is (a stream socket cannot carry ancillary data without
/// at least one byte). On a stream socket the send may be partial; the descriptors travel with the
/// first byte, so send the rest without them.
pub fn send_with_fds(
    sock: BorrowedFd<'_>,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<usize> {
    send_with_flags(sock, data, fds, SendFlags::NOSIGNAL)
}

/// Like [`send_with_fds`], but never blocks, whatever the socket's own flags say
/// (`MSG_DONTWAIT`): a full socket is `WouldBlock`. shuntd sends to apps this way, so that no
/// app can make it wait.
pub fn try_send_with_fds(
    sock: BorrowedFd<'_>,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<usize> {
    send_with_flags(sock, data, fds, SendFlags::NOSIGNAL | SendFlags::DONTWAIT)
}

fn send_with_flags(
    sock: BorrowedFd<'_>,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
    flags: SendFlags,
) -> io::Result<usize> {
    if fds.len() > MAX_FDS_PER_MESSAGE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} fds exceed the per-message limit of {MAX_FDS_PER_MESSAGE}",
                fds.len()
            ),
        ));
    }
    if data.is_empty() && !fds.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "file descriptors need at least one byte of data to travel with",
        ));
    }
    let mut space = [MaybeUninit::<u8>::uninit(); SEND_SPACE];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::other("control buffer too small for SCM_RIGHTS"));
    }
    let iov = [IoSlice::new(data)];
    loop {
        match sendmsg(sock, &iov, &mut control, flags) {
            Err(Errno::INTR) => continue,
            other => return other.map_err(io::Error::from),
        }
    }
}

/// Receives one message into `buf` and up to `max_fds` descriptors sent with it.
///
/// Returns `(bytes, fds)`; `(0, [])` on a stream or seqpacket socket means the peer closed its
/// end. Descriptors beyond `max_fds` are closed. A message that did not fit `buf` (seqpacket) or
/// whose control data was truncated is an `InvalidData` error, with all its descriptors closed.
pub fn recv_with_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    max_fds: usize,
) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut space = [MaybeUninit::<u8>::uninit(); RECV_SPACE];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = loop {
        match recvmsg(sock, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC) {
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
            Ok(msg) => break msg,
        }
    };
    // Own every descriptor before looking at anything else.
    let mut fds: Vec<OwnedFd> = Vec::new();
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = m {
            fds.extend(received);
        }
    }
    if msg.flags.contains(ReturnFlags::CTRUNC) {
        drop(fds);
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "control data truncated (MSG_CTRUNC)",
        ));
    }
    if msg.flags.contains(ReturnFlags::TRUNC) {
        drop(fds);
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "message larger than the {}-byte buffer (MSG_TRUNC)",
                iov[0].len()
            ),
        ));
    }
    // Closes the extras.
    fds.truncate(max_fds);
    Ok((msg.bytes, fds))
}

/// A connected pair of close-on-exec `SOCK_SEQPACKET` Unix sockets.
pub fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?)
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::doorbell::{Doorbell, wait_readable};
    use std::os::fd::AsFd;
    use std::time::Duration;

    fn is_hung_up(fd: BorrowedFd<'_>) -> bool {
        wait_readable(fd, Some(Duration::ZERO)).unwrap()
    }

    #[test]
    #[cfg_attr(miri, ignore = "socket syscalls")]
    fn passes_a_doorbell_over_seqpacket() {
        let (a, b) = seqpacket_pair().unwrap();
        let bell = Doorbell::new().unwrap();
        assert_eq!(
            send_with_fds(a.as_fd(), b"bell", &[bell.as_fd()]).unwrap(),
            4
        );
        let mut buf = [0u8; 16];
        let (n, mut fds) = recv_with_fds(b.as_fd(), &mut buf, 4).unwrap();
        assert_eq!(&buf[..n], b"bell");
        assert_eq!(fds.len(), 1);
        let fd = fds.pop().unwrap();
        let flags = rustix::io::fcntl_getfd(&fd).unwrap();
        assert!(flags.contains(rustix::io::FdFlags::CLOEXEC));
        let remote = Doorbell::from_fd(fd).unwrap();
        remote.ring().unwrap();
        assert_eq!(bell.drain().unwrap(), 1);
    }

    #[test]
    #[cfg_attr(miri, ignore = "socket syscalls")]
    fn message_without_fds() {
        let (a, b) = seqpacket_pair().unwrap();
        assert_eq!(send_with_fds(a.as_fd(), b"plain", &[]).unwrap(), 5);
        let mut buf = [0u8; 8];
        let (n, fds) = recv_with_fds(b.as_fd(), &mut buf, 2).unwrap();
        assert_eq!(&buf[..n], b"plain");
        assert!(fds.is_empty());
    }

    #[test]
    #[cfg_attr(miri, ignore = "socket syscalls")]
    fn extra_fds_are_closed() {
        let (a, b) = seqpacket_pair().unwrap();
        let pipes: Vec<_> = (0..3).map(|_| rustix::pipe::pipe().unwrap()).collect();
        let writers: Vec<_> = pipes.iter().map(|(_, w)| w.as_fd()).collect();
        send_with_fds(a.as_fd(), b"x", &writers).unwrap();
        let readers: Vec<OwnedFd> = pipes.into_iter().map(|(r, _w)| r).collect();
        // Our own write ends are gone now; only the in-flight copies keep the pipes open.
        let mut buf = [0u8; 4];
        let (n, fds) = recv_with_fds(b.as_fd(), &mut buf, 1).unwrap();
        assert_eq!(n, 1);
        assert_eq!(fds.len(), 1);
        assert!(!is_hung_up(readers[0].as_fd()), "kept fd must stay open");
        assert!(is_hung_up(readers[1].as_fd()), "extra fd must be closed");
        assert!(is_hung_up(readers[2].as_fd()), "extra fd must be closed");
        drop(fds);
        assert!(is_hung_up(readers[0].as_fd()));
    }

    #[test]
    #[cfg_attr(miri, ignore = "socket syscalls")]
    fn truncated_message_is_an_error_and_closes_fds() {
        let (a, b) = seqpacket_pair().unwrap();
        let (r, w) = rustix::pipe::pipe().unwrap();
        send_with_fds(a.as_fd(), &[7u8; 100], &[w.as_fd()]).unwrap();
        drop(w);
        let mut small = [0u8; 10];
        let err = recv_with_fds(b.as_fd(), &mut small, 4).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(
            is_hung_up(r.as_fd()),
            "fd of a truncated message must be closed"
        );
    }

    #[test]
    #[cfg_attr(miri, ignore = "socket syscalls")]
    fn nonblocking_socket_reports_would_block() {
        let (a, b) = socketpair(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
            None,
        )
        .unwrap();
        let mut buf = [0u8; 4];
        let err = recv_with_fds(b.as_fd(), &mut buf, 1).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        send_with_fds(a.as_fd(), b"ok", &[]).unwrap();
        assert_eq!(recv_with_fds(b.as_fd(), &mut buf, 1).unwrap().0, 2);
    }

    #[test]
    #[cfg_attr(miri, ignore = "socket syscalls")]
    fn works_on_stream_sockets() {
        let (a, b) = socketpair(
            AddressFamily::UNIX,
            SocketType::STREAM,
            SocketFlags::CLOEXEC,
            None,
        )
        .unwrap();
        let bell = Doorbell::new().unwrap();
        send_with_fds(a.as_fd(), b"s", &[bell.as_fd(), bell.as_fd()]).unwrap();
        let mut buf = [0u8; 4];
        let (n, fds) = recv_with_fds(b.as_fd(), &mut buf, 8).unwrap();
        assert_eq!(n, 1);
        assert_eq!(fds.len(), 2);
    }

    #[test]
    #[cfg_attr(miri, ignore = "socket syscalls")]
    fn invalid_sends_are_refused() {
        let (a, b) = seqpacket_pair().unwrap();
        let bell = Doorbell::new().unwrap();
        let err = send_with_fds(a.as_fd(), b"", &[bell.as_fd()]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        let many = vec![bell.as_fd(); MAX_FDS_PER_MESSAGE + 1];
        let err = send_with_fds(a.as_fd(), b"x", &many).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        // The maximum itself goes through.
        let max = vec![bell.as_fd(); MAX_FDS_PER_MESSAGE];
        send_with_fds(a.as_fd(), b"x", &max).unwrap();
        let mut buf = [0u8; 4];
        let (_, fds) = recv_with_fds(b.as_fd(), &mut buf, MAX_FDS_PER_MESSAGE).unwrap();
        assert_eq!(fds.len(), MAX_FDS_PER_MESSAGE);
    }

    #[test]
    #[cfg_attr(miri, ignore = "socket syscalls")]
    fn closed_peer_reads_as_eof_and_send_is_epipe() {
        let (a, b) = seqpacket_pair().unwrap();
        drop(a);
        let mut buf = [0u8; 4];
        let (n, fds) = recv_with_fds(b.as_fd(), &mut buf, 1).unwrap();
        assert_eq!(n, 0);
        assert!(fds.is_empty());
        let err = send_with_fds(b.as_fd(), b"x", &[]).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(Errno::PIPE.raw_os_error()));
    }
}
