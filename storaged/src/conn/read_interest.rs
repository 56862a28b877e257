//! A Unix stream registered with the reactor for reading only.
//!
//! tokio registers a socket for both directions, edge-triggered, and a
//! Unix socket reports EPOLLOUT each time its peer takes a message off it
//! (`unix_write_space`): on the bulk channel, where each request is
//! answered by one small reply that the peer reads at once, that was
//! nearly one reactor wakeup per request that nothing waited for
//! (BENCHMARKS.md, "Spurious wakeups on the bulk channel": 2315 of 9506
//! wakeups for 3000 files). Here the socket is registered for reading
//! only and written directly; a write that would block (the peer's buffer
//! full: a peer that stopped reading, or a reply larger than the free
//! space) registers a second descriptor of the same socket for writing,
//! waits on it, and drops it once the write went through.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

/// See the module docs.
#[derive(Debug)]
pub struct ReadInterestStream {
    stream: AsyncFd<UnixStream>,
    /// While a write waits for room: the same socket, registered for
    /// writing only.
    writable: Option<AsyncFd<UnixStream>>,
}

impl ReadInterestStream {
    /// `stream`, moved off its registration for both directions onto one
    /// for reading (on the current runtime).
    pub fn new(stream: tokio::net::UnixStream) -> io::Result<Self> {
        let stream = stream.into_std()?;
        stream.set_nonblocking(true)?;
        Ok(Self {
            stream: register(stream, Interest::READABLE)?,
            writable: None,
        })
    }
}

/// `stream` registered with the current reactor for `interest` only.
fn register(stream: UnixStream, interest: Interest) -> io::Result<AsyncFd<UnixStream>> {
    // SAFETY: the descriptor is the stream's own and the stream moves into
    // the `AsyncFd`: it stays open and the same until the `AsyncFd`
    // deregisters it and drops the stream.
    let registered = unsafe { AsyncFd::register_with_interest(stream, interest) };
    registered.map_err(|e| e.into_parts().1)
}

impl AsyncRead for ReadInterestStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut ready = ready!(self.stream.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            // `try_io` clears the readiness on WouldBlock, so the loop
            // waits for the next edge.
            match ready.try_io(|s| s.get_ref().read(unfilled)) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for ReadInterestStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            match self.stream.get_ref().write(data) {
                Ok(n) => {
                    // Deregistered: no more EPOLLOUT for this socket.
                    self.writable = None;
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
            if self.writable.is_none() {
                // Registering reports the socket's state at once, so room
                // made between the write above and here is not missed.
                let twin = self.stream.get_ref().try_clone()?;
                self.writable = Some(register(twin, Interest::WRITABLE)?);
            }
            let twin = self.writable.as_ref().expect("registered above");
            let mut ready = ready!(twin.poll_write_ready(cx))?;
            ready.clear_ready();
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.stream.get_ref().shutdown(std::net::Shutdown::Write))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(flavor = "current_thread")]
    async fn writes_that_fill_the_socket_wait_for_room_and_every_byte_arrives() {
        // Guards the write path of a socket registered for reading only: a
        // write larger than the socket's buffer must wait for the peer to
        // make room (never spin, never drop bytes), and reads and EOF work.
        let (ours, theirs) = tokio::net::UnixStream::pair().unwrap();
        let mut ours = ReadInterestStream::new(ours).unwrap();
        let mut theirs = theirs;
        let sent: Vec<u8> = (0..8u32 << 20).map(|i| (i * 7 + i / 4096) as u8).collect();
        let expected = sent.clone();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            theirs.read_to_end(&mut got).await.unwrap();
            theirs.write_all(b"thanks").await.unwrap();
            theirs.shutdown().await.unwrap();
            got
        });
        // Fails rather than hangs if a wait for room is never woken.
        let exchange = async {
            ours.write_all(&sent).await.unwrap();
            ours.shutdown().await.unwrap();
            let mut answer = Vec::new();
            ours.read_to_end(&mut answer).await.unwrap();
            answer
        };
        let answer = tokio::time::timeout(std::time::Duration::from_secs(60), exchange)
            .await
            .expect("the exchange finished");
        assert_eq!(answer, b"thanks");
        assert!(reader.await.unwrap() == expected, "bytes differ");
    }
}
