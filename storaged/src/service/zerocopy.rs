//! Zero-copy sends on the TCP bulk channel (`MSG_ZEROCOPY`,
//! `bulk_send_zerocopy`): each item's window goes to the kernel by
//! reference, so a NIC sends it by DMA from the staging region instead of
//! the kernel copying it into socket buffers first.
//!
//! The kernel holds the staging pages until the peer has acknowledged the
//! bytes, and says so later, on the socket's error queue (one notification
//! per range of send calls). Until then the staging region must not be
//! written: the next round of reads into it waits here ([`ZeroCopy::settle`]),
//! and a connection that ends with sends outstanding drops its staging
//! rather than give it to the next connection (whose reads would otherwise
//! change bytes the kernel may still send to this peer). Headers are sent
//! the ordinary way: they live in buffers freed as soon as the call returns.
//!
//! On loopback and veth the kernel copies the pages when it delivers them
//! to the local socket (the notification says so: `copied`), so this costs
//! more than a plain send there; it is for real NICs. BENCHMARKS.md has the
//! figures.

use std::io;
use std::os::fd::AsRawFd;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::TcpStream;

/// Sends shorter than this are copied: pinning pages and the completion
/// notification cost more than copying a few pages (the kernel's own
/// guidance is about 10 KiB).
pub(super) const ZEROCOPY_BYTES_MIN: usize = 64 << 10;

/// `SO_EE_ORIGIN_ZEROCOPY` and `SO_EE_CODE_ZEROCOPY_COPIED` from
/// `linux/errqueue.h` (not in the libc crate).
const SO_EE_ORIGIN_ZEROCOPY: u8 = 5;
const SO_EE_CODE_ZEROCOPY_COPIED: u8 = 1;

/// How long [`ZeroCopy::settle`] waits on the error queue's readiness
/// before looking again anyway (a notification whose wakeup was missed
/// costs this, not a hang).
const SETTLE_RECHECK: Duration = Duration::from_millis(20);

/// The sockets a bulk connection may run on (TCP, the Unix socket);
/// zero-copy sends need TCP.
pub trait TcpSocket {
    fn tcp(&self) -> Option<&TcpStream> {
        None
    }
}

impl TcpSocket for TcpStream {
    fn tcp(&self) -> Option<&TcpStream> {
        Some(self)
    }
}

impl TcpSocket for tokio::net::UnixStream {}

impl TcpSocket for crate::conn::read_interest::ReadInterestStream {}

/// One connection's zero-copy sends: how many were made and how many the
/// kernel has said it is done with.
#[derive(Debug, Default)]
pub(super) struct ZeroCopy {
    issued: u64,
    completed: u64,
    /// Completions the kernel reported as copied after all (loopback,
    /// veth, a device without scatter-gather).
    copied: u64,
}

impl ZeroCopy {
    /// Turns `SO_ZEROCOPY` on for `sock`.
    pub fn enable(sock: &TcpStream) -> io::Result<Self> {
        let one: libc::c_int = 1;
        // SAFETY: a valid socket, and a pointer to an int of the size given.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_ZEROCOPY,
                std::ptr::from_ref(&one).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self::default())
    }

    /// Sends sent and not yet given back by the kernel.
    pub fn outstanding(&self) -> u64 {
        self.issued - self.completed
    }

    /// (Zero-copy sends made, those the kernel copied after all.)
    pub fn counts(&self) -> (u64, u64) {
        (self.issued, self.copied)
    }

    /// Sends what it can of `payload` by reference (at least one byte
    /// unless the socket is closed): `MSG_ZEROCOPY`, or a plain send when
    /// the socket's budget for pinned pages is spent (`ENOBUFS`).
    pub fn poll_send(
        &mut self,
        cx: &mut Context<'_>,
        sock: &TcpStream,
        payload: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(sock.poll_write_ready(cx))?;
            let sent = sock.try_io(Interest::WRITABLE, || {
                match send(sock, payload, libc::MSG_ZEROCOPY) {
                    Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                        send(sock, payload, 0).map(|n| (n, false))
                    }
                    other => other.map(|n| (n, true)),
                }
            });
            match sent {
                Ok((n, by_reference)) => {
                    if by_reference && n > 0 {
                        self.issued += 1;
                    }
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Waits until the kernel has given back every page sent so far (the
    /// peer acknowledged the bytes). The caller bounds the wait.
    pub async fn settle(&mut self, sock: &TcpStream) -> io::Result<()> {
        loop {
            // Forget readiness already seen, then read the queue: a
            // notification arriving after this read wakes the wait below.
            let _ = sock.try_io(Interest::ERROR, || {
                Err::<(), _>(io::Error::from(io::ErrorKind::WouldBlock))
            });
            self.reap(sock)?;
            if self.outstanding() == 0 {
                return Ok(());
            }
            let _ = tokio::time::timeout(SETTLE_RECHECK, sock.ready(Interest::ERROR)).await;
        }
    }

    /// Reads every notification on the socket's error queue now.
    pub fn reap(&mut self, sock: &TcpStream) -> io::Result<()> {
        loop {
            // Room for one IP_RECVERR / IPV6_RECVERR message with its
            // sock_extended_err (and the offender address the kernel may
            // add), u64-aligned as cmsg needs.
            let mut control = [0u64; 16];
            // SAFETY: zeroed msghdr is valid (no name, no data buffers).
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = std::mem::size_of_val(&control);
            // SAFETY: a valid socket and a msghdr whose control buffer
            // lives across the call.
            let rc = unsafe {
                libc::recvmsg(
                    sock.as_raw_fd(),
                    &mut msg,
                    libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT,
                )
            };
            if rc < 0 {
                let e = io::Error::last_os_error();
                return match e.kind() {
                    io::ErrorKind::WouldBlock => Ok(()),
                    io::ErrorKind::Interrupted => continue,
                    _ => Err(e),
                };
            }
            // SAFETY: msg was filled by recvmsg; CMSG_* walk its control
            // buffer within msg_controllen.
            let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
            while !cmsg.is_null() {
                // SAFETY: a header within the control buffer (above).
                let (level, kind) = unsafe { ((*cmsg).cmsg_level, (*cmsg).cmsg_type) };
                let recv_err = (level == libc::SOL_IP && kind == libc::IP_RECVERR)
                    || (level == libc::SOL_IPV6 && kind == libc::IPV6_RECVERR);
                if recv_err {
                    // SAFETY: an IP(V6)_RECVERR message carries a
                    // sock_extended_err; read unaligned, as cmsg data may be.
                    let err: libc::sock_extended_err =
                        unsafe { std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast()) };
                    if err.ee_origin == SO_EE_ORIGIN_ZEROCOPY && err.ee_errno == 0 {
                        // Send calls [ee_info, ee_data] are done (the ids
                        // are 32-bit and wrap).
                        let n = u64::from(err.ee_data.wrapping_sub(err.ee_info)) + 1;
                        self.completed += n;
                        if err.ee_code & SO_EE_CODE_ZEROCOPY_COPIED != 0 {
                            self.copied += n;
                        }
                    }
                }
                // SAFETY: as above.
                cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
            }
        }
    }
}

/// One `send(2)` of `payload` on `sock` with `flags`.
fn send(sock: &TcpStream, payload: &[u8], flags: libc::c_int) -> io::Result<usize> {
    // SAFETY: a valid socket and a buffer of the length given; with
    // MSG_ZEROCOPY the kernel keeps references to the pages, which the
    // caller keeps unwritten until `settle` (see the module docs).
    let rc = unsafe {
        libc::send(
            sock.as_raw_fd(),
            payload.as_ptr().cast(),
            payload.len(),
            flags | libc::MSG_NOSIGNAL,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn every_byte_arrives_and_every_send_is_given_back() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let reader = tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            got
        });
        let (sock, _) = listener.accept().await.unwrap();
        let mut zc = ZeroCopy::enable(&sock).unwrap();
        let payload: Vec<u8> = (0..4 << 20).map(|i| (i * 7 % 251) as u8).collect();
        let mut at = 0;
        while at < payload.len() {
            at += std::future::poll_fn(|cx| zc.poll_send(cx, &sock, &payload[at..]))
                .await
                .unwrap();
        }
        assert!(zc.counts().0 > 0, "sends went by reference");
        tokio::time::timeout(Duration::from_secs(30), zc.settle(&sock))
            .await
            .expect("the kernel gives every page back")
            .unwrap();
        assert_eq!(zc.outstanding(), 0);
        // Loopback delivers by copying, and says so.
        assert_eq!(zc.counts().1, zc.counts().0);
        drop(sock);
        assert_eq!(reader.await.unwrap(), payload);
    }
}
