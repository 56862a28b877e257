//! Floors for any server that sends bytes over a socket, measured in the
//! same run as storaged:
//!
//! - [`loopback`]: the same number of bytes through a bare loopback TCP
//!   connection, 1 MiB writes and reads, one thread each side.
//! - [`device_floor`]: the least any remote read path can do per byte: one
//!   thread per stream `pread`s the device files (O_DIRECT, 1 MiB) into a
//!   huge-page buffer and writes it to a loopback socket; one thread per
//!   stream receives into a huge-page buffer and computes the CRC of every
//!   32 KiB block (what a verifying client must). No protocol, no
//!   framing, one read at a time: with the devices on tmpfs, where a read
//!   is a CPU copy, it is the CPU floor of a copying TCP path (the device
//!   copy, the send copy, the receive copy and the CRC); on a disk it is
//!   latency-bound and means little.
//!
//! Server CPU is the writer threads', client CPU the readers' (from
//! /proc/self/task/TID/stat). What storaged spends beyond these per GiB is
//! its own work.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
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

/// One piece of a device file for [`device_floor`].
#[derive(Debug, Clone, PartialEq, Eq)]
struct Piece {
    file: usize,
    offset: u64,
    len: usize,
}

/// Bytes of one read and one receive in [`device_floor`].
const FLOOR_PIECE_BYTES: u64 = 1 << 20;

/// What a verifying client checks at a time.
const FLOOR_CRC_BLOCK_BYTES: usize = 32 << 10;

/// `[offset, offset + size)` of every file in 1 MiB pieces, the files taken
/// in turn (as a stripe lays them out), dealt to `streams` streams in turn.
/// Lengths are rounded up to 4 KiB for O_DIRECT.
fn floor_pieces(files: usize, offset: u64, size: u64, streams: usize) -> Vec<Vec<Piece>> {
    let mut out = vec![Vec::new(); streams.max(1)];
    let mut n = 0;
    let mut at = offset;
    while at < offset + size {
        let len = (offset + size - at)
            .min(FLOOR_PIECE_BYTES)
            .next_multiple_of(4096) as usize;
        for file in 0..files {
            let stream = n % out.len();
            out[stream].push(Piece {
                file,
                offset: at,
                len,
            });
            n += 1;
        }
        at += FLOOR_PIECE_BYTES;
    }
    out
}

/// A 2 MiB-aligned anonymous mapping of `len` bytes, huge pages asked for
/// (as storaged's staging and the client's regions are).
fn huge_page_buffer(len: usize) -> anyhow::Result<memmap2::MmapMut> {
    let mut map = memmap2::MmapOptions::new().len(len).map_anon()?;
    // Advice only: where THP is off the buffer is plain pages.
    let _ = map.advise(memmap2::Advice::HugePage);
    map.fill(0);
    Ok(map)
}

/// Reads `[offset, offset + size)` of each of `files` over `streams`
/// loopback TCP connections as described in the module docs.
pub fn device_floor(
    files: &[PathBuf],
    offset: u64,
    size: u64,
    streams: usize,
) -> anyhow::Result<Measurement> {
    let plan = floor_pieces(files.len(), offset, size, streams);
    let t0 = Instant::now();
    let mut senders = Vec::new();
    let mut receivers = Vec::new();
    for pieces in plan {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let files = files.to_vec();
        senders.push(std::thread::spawn(move || -> anyhow::Result<f64> {
            let opened = files
                .iter()
                .map(|f| {
                    std::fs::OpenOptions::new()
                        .read(true)
                        .custom_flags(libc::O_DIRECT)
                        .open(f)
                })
                .collect::<Result<Vec<_>, _>>()?;
            let (mut sock, _) = listener.accept()?;
            sock.set_nodelay(true)?;
            let mut buf = huge_page_buffer(2 << 20)?;
            let cpu0 = thread_cpu_seconds();
            for p in pieces {
                let n = opened[p.file].read_at(&mut buf[..p.len], p.offset)?;
                sock.write_all(&buf[..n])?;
            }
            Ok(thread_cpu_seconds() - cpu0)
        }));
        receivers.push(std::thread::spawn(
            move || -> anyhow::Result<(u64, f64, u32)> {
                let mut sock = TcpStream::connect(addr)?;
                let mut buf = huge_page_buffer(2 << 20)?;
                let piece = FLOOR_PIECE_BYTES as usize;
                let cpu0 = thread_cpu_seconds();
                let (mut got, mut crcs) = (0u64, 0u32);
                loop {
                    let mut filled = 0;
                    while filled < piece {
                        match sock.read(&mut buf[filled..piece])? {
                            0 => break,
                            n => filled += n,
                        }
                    }
                    for block in buf[..filled].chunks(FLOOR_CRC_BLOCK_BYTES) {
                        crcs ^= crc32fast::hash(block);
                    }
                    got += filled as u64;
                    if filled < piece {
                        break;
                    }
                }
                Ok((got, thread_cpu_seconds() - cpu0, crcs))
            },
        ));
    }
    let (mut bytes, mut cpu_client, mut cpu_server) = (0u64, 0.0, 0.0);
    for r in receivers {
        let (got, cpu, crcs) = r
            .join()
            .map_err(|_| anyhow::anyhow!("receiver thread panicked"))??;
        std::hint::black_box(crcs);
        bytes += got;
        cpu_client += cpu;
    }
    let seconds = t0.elapsed().as_secs_f64();
    for s in senders {
        cpu_server += s
            .join()
            .map_err(|_| anyhow::anyhow!("sender thread panicked"))??;
    }
    Ok(Measurement {
        bytes,
        samples: 1,
        seconds,
        cpu_s_server: Some(cpu_server),
        cpu_s_client: Some(cpu_client),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn pieces_cover_every_file_once_dealt_to_the_streams() {
        let plan = super::floor_pieces(3, 1 << 20, (2 << 20) + 100, 2);
        let all: Vec<_> = plan.iter().flatten().cloned().collect();
        assert_eq!(all.len(), 9);
        assert_eq!(plan[0].len(), 5);
        assert_eq!(plan[1].len(), 4);
        for f in 0..3 {
            let mut mine: Vec<_> = all.iter().filter(|p| p.file == f).collect();
            mine.sort_by_key(|p| p.offset);
            assert_eq!(mine[0].offset, 1 << 20);
            assert_eq!(mine.len(), 3);
            assert_eq!(mine[2].offset, 3 << 20);
            assert_eq!(mine[2].len, 4096, "100 bytes round up to one 4 KiB read");
        }
    }

    #[test]
    fn the_device_floor_moves_every_byte_of_every_file() {
        let dir = tempfile::tempdir().unwrap();
        let files: Vec<_> = (0..2)
            .map(|i| {
                let p = dir.path().join(format!("dev{i}"));
                std::fs::write(&p, vec![i as u8 + 1; 3 << 20]).unwrap();
                p
            })
            .collect();
        // Buffered files on a plain filesystem take O_DIRECT where the
        // filesystem does (tmpfs and ext4 both here).
        let m = super::device_floor(&files, 1 << 20, 2 << 20, 2).unwrap();
        assert_eq!(m.bytes, 4 << 20);
        assert!(m.cpu_s_server.is_some() && m.cpu_s_client.is_some());
    }

    #[test]
    fn moves_every_byte() {
        let m = super::loopback(64 << 20).unwrap();
        assert_eq!(m.bytes, 64 << 20);
        assert!(m.gib_per_s().unwrap() > 0.0);
    }
}
