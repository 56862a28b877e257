//! Local files read with pread, what a data loader does today: the same
//! files from a plain directory, O_DIRECT (aligned buffers, sizes rounded up
//! to 4 KiB) or buffered after the cache was dropped, `concurrency` threads.

use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use super::Item;
use crate::results::Measurement;
use crate::stats::self_cpu_seconds;

const CHUNK_BYTES: usize = 1 << 20;

fn read_file(root: &Path, item: &Item, direct: bool, buf: &mut [u8]) -> std::io::Result<u64> {
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true);
    if direct {
        opts.custom_flags(libc::O_DIRECT);
    }
    let f = opts.open(root.join(&item.path))?;
    let mut at = 0u64;
    while at < item.size {
        let want = ((item.size - at) as usize).min(CHUNK_BYTES);
        // O_DIRECT needs the length rounded up to the block size; the
        // read returns short at the end of the file.
        let len = if direct {
            want.next_multiple_of(4096)
        } else {
            want
        };
        let n = f.read_at(&mut buf[..len], at)?;
        if n == 0 {
            break;
        }
        at += n as u64;
    }
    Ok(at)
}

/// Reads every item once with `concurrency` threads; records per-item
/// latency.
pub fn read_items(
    root: &Path,
    items: &[Item],
    concurrency: u32,
    direct: bool,
) -> anyhow::Result<Measurement> {
    let next = Arc::new(AtomicUsize::new(0));
    let items: Arc<Vec<Item>> = Arc::new(items.to_vec());
    let root = Arc::new(root.to_path_buf());
    let (cli0, t0) = (self_cpu_seconds(), Instant::now());
    let threads: Vec<_> = (0..concurrency)
        .map(|_| {
            let (next, items, root) = (Arc::clone(&next), Arc::clone(&items), Arc::clone(&root));
            std::thread::spawn(move || -> std::io::Result<(u64, Vec<f64>)> {
                let mut buf = memmap2::MmapMut::map_anon(CHUNK_BYTES)?;
                let mut bytes = 0;
                let mut lat = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(item) = items.get(i) else { break };
                    let t = Instant::now();
                    bytes += read_file(&root, item, direct, &mut buf)?;
                    lat.push(t.elapsed().as_secs_f64() * 1e6);
                }
                Ok((bytes, lat))
            })
        })
        .collect();
    let mut bytes = 0;
    let mut latencies_us = Vec::new();
    for t in threads {
        let (b, l) = t
            .join()
            .map_err(|_| anyhow::anyhow!("reader thread panicked"))??;
        bytes += b;
        latencies_us.extend(l);
    }
    Ok(Measurement {
        bytes,
        samples: items.len() as u64,
        seconds: t0.elapsed().as_secs_f64(),
        latencies_us,
        cpu_s_server: None,
        cpu_s_client: Some(self_cpu_seconds() - cli0),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_whole_files_direct_and_buffered() {
        let d = tempfile::tempdir_in(".").unwrap();
        let fs = crate::datasets::generate(
            d.path(),
            "x",
            vec![("a".into(), 5000), ("b".into(), 3 << 20)],
            1,
        )
        .unwrap();
        let items: Vec<Item> = fs
            .files
            .iter()
            .map(|(p, s)| Item {
                path: p.clone(),
                size: *s,
            })
            .collect();
        for direct in [true, false] {
            let m = read_items(&fs.root, &items, 2, direct).unwrap();
            assert_eq!(m.bytes, 5000 + (3 << 20));
            assert_eq!(m.latencies_us.len(), 2);
        }
    }
}
