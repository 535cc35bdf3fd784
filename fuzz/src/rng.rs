//! A tiny deterministic generator for the choices a target derives from a
//! seed in its input: where a byte stream is cut, how far virtual time
//! moves. A few seed bits pick the regime (byte by byte, small pieces,
//! large ones) so that libFuzzer reaches each with one mutation.

pub struct Rng {
    state: u64,
    max_chunk: usize,
}

impl Rng {
    pub fn new(seed: u16) -> Self {
        let max_chunk = match seed & 3 {
            0 => 1,
            1 => 8,
            2 => 300,
            _ => 1 << 16,
        };
        Rng {
            // xorshift must not start at zero.
            state: u64::from(seed).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1,
            max_chunk,
        }
    }

    pub fn next_u64(&mut self) -> u64 {
        // xorshift64*
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (`n > 0`), near enough.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// The size of the next piece of a stream with `remaining > 0` bytes left.
    pub fn chunk(&mut self, remaining: usize) -> usize {
        let max = self.max_chunk.min(remaining);
        1 + self.below(max as u64) as usize
    }

    /// Splits `data` into consecutive pieces.
    pub fn pieces<'a>(&mut self, mut data: &'a [u8]) -> Vec<&'a [u8]> {
        let mut out = Vec::new();
        while !data.is_empty() {
            let (piece, rest) = data.split_at(self.chunk(data.len()));
            out.push(piece);
            data = rest;
        }
        out
    }
}
