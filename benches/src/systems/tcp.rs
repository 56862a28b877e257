//! The floor for any server that sends bytes over a socket: the same number
//! of bytes through a bare loopback TCP connection, 1 MiB writes and reads,
//! one thread each side. Server CPU is the writer thread's, client CPU the
//! reader's (from /proc/self/task/TID/stat). What storaged spends beyond this
//! per GiB is its own work: CRC, the gRPC encode copy, HTTP/2 framing.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Instant;

use crate::results::Measurement;

fn thread_cpu_seconds() -> f64 {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    let path = format!("/proc/self/task/{tid}/stat");
    let Ok(stat) = std::fs::read_to_string(path) else {
        return 0.0;
    };
    let Some(i) = stat.rfind(')') else { return 0.0 };
    let f: Vec<&str> = stat[i + 2..].split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    // SAFETY: sysconf with a valid name has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// Sends `bytes` through loopback TCP and measures rate and CPU per side.
pub fn loopback(bytes: u64) -> anyhow::Result<Measurement> {
    const CHUNK: usize = 1 << 20;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let t0 = Instant::now();
    let writer = std::thread::spawn(move || -> std::io::Result<f64> {
        let (mut sock, _) = listener.accept()?;
        sock.set_nodelay(true)?;
        let cpu0 = thread_cpu_seconds();
        let buf = vec![0x5au8; CHUNK];
        let mut left = bytes;
        while left > 0 {
            let n = (left as usize).min(CHUNK);
            sock.write_all(&buf[..n])?;
            left -= n as u64;
        }
        Ok(thread_cpu_seconds() - cpu0)
    });
    let mut sock = TcpStream::connect(addr)?;
    let cpu0 = thread_cpu_seconds();
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0u64;
    while got < bytes {
        let n = sock.read(&mut buf)?;
        if n == 0 {
            anyhow::bail!("loopback connection closed after {got} bytes");
        }
        got += n as u64;
    }
    let reader_cpu = thread_cpu_seconds() - cpu0;
    let seconds = t0.elapsed().as_secs_f64();
    let writer_cpu = writer
        .join()
        .map_err(|_| anyhow::anyhow!("writer thread panicked"))??;
    Ok(Measurement {
        bytes: got,
        samples: 1,
        seconds,
        cpu_s_server: Some(writer_cpu),
        cpu_s_client: Some(reader_cpu),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn moves_every_byte() {
        let m = super::loopback(64 << 20).unwrap();
        assert_eq!(m.bytes, 64 << 20);
        assert!(m.gib_per_s().unwrap() > 0.0);
    }
}
