//! What unit tests, integration tests, the power-loss matrix and the
//! benchmark harness share: one generator of deterministic data (the same
//! seed gives the same bytes everywhere, so a failure names what to
//! rerun), and one way to start a `storaged serve` process and learn its
//! address.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// xorshift64: fast, reproducible, never zero.
#[derive(Debug, Clone)]
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A number below `n` (`n` 0 counts as 1).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// `len` pseudo-random bytes from `seed`.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = XorShift::new(seed);
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        v.extend_from_slice(&rng.next_u64().to_le_bytes());
    }
    v.truncate(len);
    v
}

/// The line `storaged serve` prints on stdout once it listens.
pub const LISTENING_PREFIX: &str = "storaged listening on ";

/// A started `storaged serve` and the gRPC address it printed.
#[derive(Debug)]
pub struct Launched {
    pub child: Child,
    pub addr: String,
}

/// Why a process did not come up.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("starting {bin}: {source}")]
    Spawn { bin: String, source: std::io::Error },
    #[error("it exited before it was ready ({code:?})")]
    Exited { code: Option<i32> },
    #[error("it was not ready within {0:?}")]
    Timeout(Duration),
    #[error("unexpected line on its stdout: {0:?}")]
    Unexpected(String),
}

/// Runs `bin` with `args` (a `serve` command line) and `env` added, its
/// stderr into `stderr`, and waits up to `timeout` for its listening line.
/// Its stdout is drained afterwards, so it never blocks on a full pipe.
pub fn launch(
    bin: &Path,
    args: &[String],
    env: &[(&str, &str)],
    stderr: std::fs::File,
    timeout: Duration,
) -> Result<Launched, LaunchError> {
    let mut command = Command::new(bin);
    command.args(args).envs(env.iter().copied()).stderr(stderr);
    // The first line must be the listening line.
    let (child, addr) = spawn_until_ready(command, timeout, |line| {
        match line.strip_prefix(LISTENING_PREFIX) {
            Some(addr) => Ok(Some(addr.trim().to_owned())),
            None => Err(line.to_owned()),
        }
    })?;
    Ok(Launched { child, addr })
}

/// Spawns `command` with its stdout piped and reads its lines until
/// `ready` takes one (`Ok(Some(value))`; `Ok(None)` reads on, `Err(line)`
/// gives up with it), for at most `timeout`. Its stdout is drained
/// afterwards, so it never blocks on a full pipe. The launcher of the
/// daemon, and of `storagectl mount` (whose line ends in "ready"), for
/// tests and benches.
pub fn spawn_until_ready<T>(
    mut command: Command,
    timeout: Duration,
    mut ready: impl FnMut(&str) -> Result<Option<T>, String>,
) -> Result<(Child, T), LaunchError> {
    let mut child =
        command
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|source| LaunchError::Spawn {
                bin: command.get_program().to_string_lossy().into_owned(),
                source,
            })?;
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            // Once the waiter has its line, the rest is only drained.
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + timeout;
    let fail = |child: &mut Child, e: LaunchError| {
        let _ = child.kill();
        let _ = child.wait();
        Err(e)
    };
    loop {
        match rx.recv_timeout(Duration::from_millis(20)) {
            Ok(line) => match ready(&line) {
                Ok(Some(value)) => return Ok((child, value)),
                Ok(None) => continue,
                Err(line) => return fail(&mut child, LaunchError::Unexpected(line)),
            },
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                // Stdout closed before the line: it exited (or is exiting).
                let status = child.wait().ok();
                return Err(LaunchError::Exited {
                    code: status.and_then(|s| s.code()),
                });
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(LaunchError::Exited {
                code: status.code(),
            });
        }
        if Instant::now() > deadline {
            return fail(&mut child, LaunchError::Timeout(timeout));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Guards against a generator whose output drifts between calls or
    /// seeds that collide.
    #[test]
    fn patterns_are_deterministic_and_distinct() {
        assert_eq!(pattern(7, 1000), pattern(7, 1000));
        assert_ne!(pattern(7, 64), pattern(8, 64));
        assert_eq!(&pattern(7, 1000)[..13], &pattern(7, 13)[..]);
        assert!(pattern(0, 0).is_empty());
        let mut r = XorShift::new(0);
        assert!((0..100).all(|_| r.below(10) < 10));
    }
}
