//! A small seeded random generator (SplitMix64) for everything training draws at random:
//! dropout masks, negative sampling, the query order of each epoch. It is counter-friendly:
//! [`mix`] derives a stream's seed from `(seed, step, ...)`, so a resumed run or a replayed
//! GradCache chunk draws exactly the numbers of the original one, whatever ran before.

use rayon::prelude::*;

/// SplitMix64 (Steele, Lea, Flood 2014): 64 bits of state, passes BigCrush, trivially seeded.
#[derive(Clone, Debug)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator whose stream depends only on `seed`.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN);
        finalize(self.state)
    }

    /// The next `n` dropout decisions with drop probability `p` (`0 < p < 1`): 1 = keep. Each
    /// 64-bit draw gives two decisions (its low, then its high 32 bits compared with
    /// `p * 2^32`), exactly as `n` sequential calls would, but drawn in parallel: the `k`-th
    /// output of SplitMix64 is a pure function of the state and `k`. A LoRA step draws one
    /// mask per adapted projection, hundreds of millions of decisions, and drawing them one by
    /// one kept a core idle.
    pub fn keep_mask(&mut self, n: usize, p: f64) -> Vec<u8> {
        let base = self.skip_mask(n);
        keep_mask_at(base, n, p)
    }

    /// Moves the stream past a mask of `n` decisions without drawing it, and returns the
    /// state the mask starts from: [`keep_mask_at`] (or the CUDA kernel of
    /// `backbone::dropout`) computes it from there when it is needed.
    pub fn skip_mask(&mut self, n: usize) -> u64 {
        let base = self.state;
        self.state = base.wrapping_add((n.div_ceil(2) as u64).wrapping_mul(GOLDEN));
        base
    }

    /// A standard normal draw (Box-Muller on two uniform draws in `(0, 1]` and `[0, 1)`), for
    /// weights initialised as transformers initialises them.
    pub fn normal(&mut self) -> f64 {
        let unit = |x: u64| (x >> 11) as f64 / (1u64 << 53) as f64;
        let u1 = 1.0 - unit(self.next_u64());
        let u2 = unit(self.next_u64());
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// A uniform integer in `0..n` (Lemire's method with rejection, so unbiased); `n > 0`.
    pub fn below(&mut self, n: usize) -> usize {
        let n = n as u64;
        loop {
            let m = (self.next_u64() as u128) * (n as u128);
            let low = m as u64;
            if low >= n.wrapping_neg() % n {
                return (m >> 64) as usize;
            }
        }
    }

    /// Shuffles in place as CPython's `random.shuffle` does: for `i` from the end down to 1,
    /// swap with a uniform `j <= i`.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i + 1);
            items.swap(i, j);
        }
    }
}

/// The `n` dropout decisions (1 = keep, drop probability `p`) that [`SplitMix64::keep_mask`]
/// draws from state `base`: a pure function of `base`, so any device can compute it.
pub fn keep_mask_at(base: u64, n: usize, p: f64) -> Vec<u8> {
    let threshold = keep_threshold(p);
    let mut keep = vec![0u8; n];
    keep.par_chunks_mut(MASK_CHUNK)
        .enumerate()
        .for_each(|(i, out)| fill_keep(base, (i * MASK_CHUNK / 2) as u64, threshold, out));
    keep
}

/// A dropout mask named by where it starts in the seeded stream (the decisions
/// [`SplitMix64::keep_mask`] draws from `base` with drop probability `p`, `0 < p < 1`), for ops
/// that compute their mask where their data lives instead of receiving it (the fused attention's
/// GPU kernels).
#[derive(Clone, Copy, Debug)]
pub struct StreamMask {
    /// The stream state the mask starts from ([`SplitMix64::skip_mask`]).
    pub base: u64,
    /// The drop probability.
    pub p: f64,
}

impl StreamMask {
    /// The kernels' threshold ([`keep_threshold`]).
    pub fn threshold(self) -> u64 {
        keep_threshold(self.p)
    }

    /// What kept values are multiplied by, `1 / (1 - p)`.
    pub fn scale(self) -> f32 {
        (1.0 / (1.0 - self.p)) as f32
    }

    /// The first `n` decisions as bytes ([`keep_mask_at`]).
    pub fn bytes(self, n: usize) -> Vec<u8> {
        keep_mask_at(self.base, n, self.p)
    }
}

/// A decision keeps its element when its 32 random bits are at least this (`p * 2^32`).
pub fn keep_threshold(p: f64) -> u64 {
    (p * 4_294_967_296.0) as u64
}

const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// Decisions per parallel task of [`SplitMix64::keep_mask`] (even: a task starts on a draw).
const MASK_CHUNK: usize = 1 << 16;

/// SplitMix64's output function.
#[inline(always)]
fn finalize(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Writes the decisions of draws `first..` after state `base` into `out`, two per draw.
fn fill_keep(base: u64, first: u64, threshold: u64, out: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512dq")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vl")
    {
        // SAFETY: the CPU has the features the function is compiled for.
        return unsafe { fill_keep_avx512(base, first, threshold, out) };
    }
    fill_keep_body(base, first, threshold, out)
}

/// [`fill_keep_body`] compiled for AVX-512 (64-bit multiplies in vector registers).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl")]
unsafe fn fill_keep_avx512(base: u64, first: u64, threshold: u64, out: &mut [u8]) {
    fill_keep_body(base, first, threshold, out)
}

#[inline(always)]
fn fill_keep_body(base: u64, first: u64, threshold: u64, out: &mut [u8]) {
    let half = (out.len() / 2) as u64;
    let mut pairs = out.chunks_exact_mut(2);
    for (k, pair) in (&mut pairs).enumerate() {
        let bits = finalize(base.wrapping_add((first + k as u64 + 1).wrapping_mul(GOLDEN)));
        pair[0] = u8::from(bits & 0xffff_ffff >= threshold);
        pair[1] = u8::from(bits >> 32 >= threshold);
    }
    if let [last] = pairs.into_remainder() {
        let bits = finalize(base.wrapping_add((first + half + 1).wrapping_mul(GOLDEN)));
        *last = u8::from(bits & 0xffff_ffff >= threshold);
    }
}

/// Combines a seed with counters into a new, well-spread seed.
pub fn mix(seed: u64, parts: &[u64]) -> u64 {
    let mut h = SplitMix64::new(seed ^ 0x5851_f42d_4c95_7f2d).next_u64();
    for &p in parts {
        h = SplitMix64::new(h ^ p.wrapping_mul(0x2545_f491_4f6c_dd1d)).next_u64();
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The parallel mask equals the sequential draws it stands for (odd lengths, lengths over
    /// one task, and two masks in a row), and leaves the stream where they would.
    #[test]
    fn keep_mask_equals_sequential_draws() {
        let p = 0.1;
        let threshold = (p * 4_294_967_296.0) as u64;
        let sequential = |r: &mut SplitMix64, n: usize| {
            let mut keep = Vec::with_capacity(n);
            while keep.len() < n {
                let bits = r.next_u64();
                for half in [bits & 0xffff_ffff, bits >> 32] {
                    if keep.len() < n {
                        keep.push(u8::from(half >= threshold));
                    }
                }
            }
            keep
        };
        for n in [0, 1, 7, MASK_CHUNK + 3, 3 * MASK_CHUNK] {
            let (mut a, mut b) = (SplitMix64::new(42), SplitMix64::new(42));
            assert_eq!(a.keep_mask(n, p), sequential(&mut b, n), "n = {n}");
            assert_eq!(a.keep_mask(5, p), sequential(&mut b, 5), "after n = {n}");
            assert_eq!(a.next_u64(), b.next_u64());
        }
        let kept =
            SplitMix64::new(1).keep_mask(100_000, p).iter().map(|&k| k as usize).sum::<usize>();
        assert!((89_000..91_000).contains(&kept), "{kept}");
    }

    #[test]
    fn below_is_in_range_and_roughly_uniform() {
        let mut r = SplitMix64::new(7);
        let mut counts = [0usize; 5];
        for _ in 0..50_000 {
            counts[r.below(5)] += 1;
        }
        for c in counts {
            assert!((9_000..11_000).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn shuffle_is_a_seeded_permutation() {
        let shuffled = |seed| {
            let mut v: Vec<u32> = (0..20).collect();
            SplitMix64::new(seed).shuffle(&mut v);
            v
        };
        let a = shuffled(1);
        assert_eq!(a, shuffled(1));
        assert_ne!(a, shuffled(2));
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..20).collect::<Vec<_>>());
        assert_ne!(mix(1, &[2, 3]), mix(1, &[3, 2]));
    }
}
