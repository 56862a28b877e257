//! Deterministic test data, one generator for unit tests, integration
//! tests, the power-loss matrix and the benchmark harness: the same seed
//! gives the same bytes everywhere, so a failure names what to rerun.

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
