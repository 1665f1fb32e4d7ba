//! Helpers for the crate's unit tests.

/// A xorshift64 generator: reproducible pseudo-random inputs without a dependency.
pub(crate) struct Xorshift(pub u64);

impl Xorshift {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}
