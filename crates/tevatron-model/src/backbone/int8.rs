//! int8 linear products for inference on the CPU (`encode --int8`, `rerank --int8`): weights
//! quantized once at load, activations at each call, the products summed exactly in 32-bit
//! integers by the CPU's integer dot-product instructions, chosen at run time.
//!
//! The scheme (symmetric, no zero points):
//! - weights per output channel: `w[c][k] ≈ sw[c] W[c][k]`, `W` in [-127, 127],
//!   `sw[c] = max_k |w[c][k]| / 127`;
//! - activations per row (each token's own scale, computed at run time):
//!   `x[r][k] ≈ sx[r] X[r][k]`, `X` in [-127, 127], `sx[r] = max_k |x[r][k]| / 127`;
//! - `y[r][c] = Σ_k X[r][k] W[c][k] * (sx[r] sw[c]) + b[c]`.
//!
//! The integer sum is exact in every kernel set (`|Σ| ≤ 255 * 127 * k < 2^31` for
//! `k ≤` [`MAX_INPUTS`]), and one epilogue turns it into F32, so every set gives the same bits
//! as the portable loops (property-tested): a CPU's instructions change the speed, never the
//! embeddings. The sets:
//! - portable: plain loops, any CPU;
//! - AVX2: operands widened to i16 and multiplied by `vpmaddwd` (pairs of products into i32
//!   lanes, exact), on tiles of 6 rows x 16 channels;
//! - AVX-VNNI (256-bit) and AVX-512 VNNI: `vpdpbusd` on `X + 128` as unsigned bytes (quads of
//!   products into i32 lanes, no saturation), the offset taken back as `128 Σ_k W[c][k]`;
//!   tiles of 6 rows x 16 channels and 8 rows x 32 channels;
//! - AMX (Intel Xeon from Sapphire Rapids): `tdpbssd`, signed by signed bytes, a 16 x 16 block
//!   of sums over 64 inputs per instruction, in blocks of 32 rows x 32 channels (four sum
//!   tiles, two of rows, two of channels).
//!
//! The vector sets share one tile loop (`tile`) over the five instructions of a `Lanes`
//! implementation, and AMX's loop (`Int8Weight::amx_block`) runs over the seven tile
//! operations of a `Tiles` implementation; the tests run both loops on an emulation of each
//! set's instructions, so the code of every set, the ones this CPU lacks included, is checked
//! on any CPU.
//!
//! A row with a NaN or an infinity gives NaN outputs (as the F32 product would), not a
//! quantized stand-in.

use rayon::prelude::*;

use super::fast::{lanes_reduce, par_fill, with_simd};
use tevatron_ir::amx::{self, Tiles};

/// The widest input a projection may have: the integer sums stay below 2^31.
pub const MAX_INPUTS: usize = 65_536;

/// Rows per parallel task (a multiple of the vector kernels' row tiles, 6 and 8, and of AMX's
/// 16).
const ROW_BLOCK: usize = 48;

/// The kernel sets, by the instructions they need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Set {
    Portable,
    Avx2,
    AvxVnni,
    Avx512Vnni,
    Amx,
}

impl Set {
    fn runs_here(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            match self {
                Set::Portable => true,
                Set::Avx2 => has!("avx2"),
                Set::AvxVnni => has!("avx2") && has!("avxvnni"),
                Set::Avx512Vnni => has!("avx512f") && has!("avx512bw") && has!("avx512vnni"),
                Set::Amx => amx::usable(amx::Product::Int8),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Set::Portable
        }
    }
}

/// The int8 product kernels of one CPU. Only [`Int8Kernels::detect`] and
/// [`Int8Kernels::available`] make one, so a value always names instructions this CPU has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Int8Kernels(Set);

impl Int8Kernels {
    /// The fastest set this CPU runs.
    pub fn detect() -> Self {
        *Self::available().last().expect("the portable set runs everywhere")
    }

    /// Every set this CPU runs, the portable one first (for tests).
    pub fn available() -> Vec<Self> {
        [Set::Portable, Set::Avx2, Set::AvxVnni, Set::Avx512Vnni, Set::Amx]
            .into_iter()
            .filter(|s| s.runs_here())
            .map(Int8Kernels)
            .collect()
    }

    /// Whether these are SIMD kernels (not the portable loops, much slower than F32's gemm).
    pub fn is_simd(self) -> bool {
        self.0 != Set::Portable
    }

    /// A name for logs.
    pub fn name(self) -> &'static str {
        match self.0 {
            Set::Portable => "portable",
            Set::Avx2 => "AVX2 vpmaddwd",
            Set::AvxVnni => "AVX-VNNI vpdpbusd",
            Set::Avx512Vnni => "AVX-512 VNNI vpdpbusd",
            Set::Amx => "AMX tdpbssd",
        }
    }
}

/// A projection's weight in int8, laid out for one kernel set.
pub struct Int8Weight {
    out: usize,
    inputs: usize,
    /// `sw`, per output channel.
    scales: Vec<f32>,
    /// `W`, row-major `(out, inputs)`: the portable kernel's operand (empty for a SIMD set).
    codes: Vec<i8>,
    /// `W` as the SIMD set reads it (empty for the portable set): tiles of channels; in each,
    /// for each step of 4 bytes of input (2 inputs as i16 for AVX2, 4 as i8 for VNNI and AMX),
    /// the tile's channels' 4 bytes side by side; inputs and channels beyond the weight are
    /// zeros (for AMX, up to whole tiles of 16 steps, 64 inputs, and whole pairs of tiles).
    packed: amx::Aligned<u8>,
    /// VNNI: `128 Σ_k W[c][k]` per channel, what `X + 128` adds to a sum.
    offsets: Vec<i32>,
    kernels: Int8Kernels,
}

impl std::fmt::Debug for Int8Weight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Int8Weight")
            .field("out", &self.out)
            .field("inputs", &self.inputs)
            .field("kernels", &self.kernels.name())
            .finish()
    }
}

/// Activations quantized for the int8 products: `X` row by row, and each row's scale `sx`.
pub struct Int8Rows {
    inputs: usize,
    codes: Vec<i8>,
    scales: Vec<f32>,
}

impl Int8Rows {
    /// Quantizes the rows of `x`, `inputs` wide, in parallel.
    pub fn new(x: &[f32], inputs: usize) -> Result<Self, String> {
        if inputs == 0 || !x.len().is_multiple_of(inputs) {
            return Err(format!("int8: inputs of {} values for rows of {inputs}", x.len()));
        }
        let rows = x.len() / inputs;
        let mut codes = vec![0i8; x.len()];
        let mut scales = vec![0f32; rows];
        let per_task = ROW_BLOCK * inputs;
        codes
            .par_chunks_mut(per_task)
            .zip(scales.par_chunks_mut(ROW_BLOCK))
            .zip(x.par_chunks(per_task))
            .for_each(|((q, sx), x)| quantize_rows(x, q, sx, inputs));
        Ok(Self { inputs, codes, scales })
    }
}

with_simd!(
    /// [`quantize_rows_of`] in the CPU's widest vectors (as a closure for `fast::simd` it was
    /// left out of line in SSE code, converting one value at a time: 8.5% of an `encode --int8`
    /// on a Zen 3).
    fn quantize_rows = quantize_rows_of(x: &[f32], q: &mut [i8], sx: &mut [f32], inputs: usize)
);

/// Each row of `x` (`inputs` wide) quantized into `q`, its scale into `sx`.
#[inline(always)]
fn quantize_rows_of(x: &[f32], q: &mut [i8], sx: &mut [f32], inputs: usize) {
    let rows = x.chunks_exact(inputs).zip(q.chunks_exact_mut(inputs));
    for ((x, q), s) in rows.zip(sx.iter_mut()) {
        *s = quantize_row(x, q);
    }
}

/// Quantizes `x` to `q` (`X`, the module docs) and returns its scale `sx`: NaN when `x` holds
/// a NaN or an infinity, 0 for a row of zeros.
#[inline(always)]
fn quantize_row(x: &[f32], q: &mut [i8]) -> f32 {
    let max = lanes_reduce(x, 0.0, |a, v| a.max(v.abs()));
    // 0 when every value is finite, NaN otherwise (`max` skips NaN).
    let finite = lanes_reduce(x, 0.0, |a, v| a + v * 0.0);
    if max == 0.0 || finite.is_nan() {
        q.fill(0);
        return finite;
    }
    let inv = 127.0 / max;
    if inv.is_finite() {
        quantize_by(x, q, |v| v * inv);
    } else {
        // A row of values below about 3.7e-37: 127 / max overflows, the quotient does not.
        quantize_by(x, q, |v| v / max * 127.0);
    }
    max / 127.0
}

/// `q = round(scaled(x))`, half to even, for finite `scaled` values within [-127, 127] (up to
/// rounding).
#[inline(always)]
fn quantize_by(x: &[f32], q: &mut [i8], scaled: impl Fn(f32) -> f32) {
    for (q, &v) in q.iter_mut().zip(x) {
        // Round half to even with the 1.5 * 2^23 trick (vectorises, unlike `round`).
        // `max` and `min` (unlike `clamp`) map every value into [-127, 127], a NaN included;
        // the callers give finite values, for which this is the clamp.
        #[allow(clippy::manual_clamp)] // on purpose: `clamp` keeps a NaN
        let c = scaled(v).max(-127.0).min(127.0);
        let t = (c + 12_582_912.0) - 12_582_912.0;
        // SAFETY: `t` is a whole number within [-127, 127] (above), so the conversion is
        // exact. Unchecked, it is one vector instruction; the saturating `as` ran one value at
        // a time (vcvttss2si and a NaN test).
        *q = unsafe { t.to_int_unchecked::<i32>() } as i8;
    }
}

/// The one epilogue of every kernel set: the exact integer sum back to F32.
#[inline(always)]
fn finish(dot: i32, sx: f32, sw: f32, bias: f32) -> f32 {
    dot as f32 * (sx * sw) + bias
}

/// How a SIMD set lays out its operands: the inputs in each 4-byte step, the channels of a
/// tile (two vectors of i32 lanes; one AMX tile of weights) and the rows of a tile.
#[derive(Clone, Copy)]
struct Layout {
    /// Inputs per 4-byte step: 2 (i16) or 4 (i8).
    per_step: usize,
    tile_channels: usize,
    tile_rows: usize,
    /// The steps of a tile are padded to a multiple of this (AMX reads 16 at a time).
    step_multiple: usize,
    /// The tiles of channels are padded to a multiple of this (AMX reads two at a time).
    tile_multiple: usize,
}

impl Set {
    fn layout(self) -> Option<Layout> {
        match self {
            Set::Portable => None,
            Set::Avx2 => Some(Layout::vector(2, 16, 6)),
            Set::AvxVnni => Some(Layout::vector(4, 16, 6)),
            Set::Avx512Vnni => Some(Layout::vector(4, 32, 8)),
            Set::Amx => Some(Layout {
                per_step: 4,
                tile_channels: 16,
                tile_rows: 16,
                step_multiple: 16,
                tile_multiple: 2,
            }),
        }
    }

    /// Whether the set multiplies unsigned activations `X + 128` (VNNI's `vpdpbusd`), whose
    /// offset each channel takes back.
    fn offset_activations(self) -> bool {
        matches!(self, Set::AvxVnni | Set::Avx512Vnni)
    }

    /// One input value `X` (or `W`) as the set's bytes: i16 for AVX2 (2 bytes); for VNNI, an
    /// activation plus 128 as an unsigned byte, a weight as is (the first byte); for AMX,
    /// both as they are.
    fn bytes(self, v: i8, activation: bool) -> [u8; 2] {
        match self {
            Set::Avx2 => i16::from(v).to_le_bytes(),
            _ if activation && self.offset_activations() => [(v as u8) ^ 0x80, 0],
            _ => [v as u8, 0],
        }
    }
}

impl Layout {
    /// A vector set's layout: no padding beyond whole steps and tiles.
    const fn vector(per_step: usize, tile_channels: usize, tile_rows: usize) -> Self {
        Layout { per_step, tile_channels, tile_rows, step_multiple: 1, tile_multiple: 1 }
    }

    /// The packed steps of a tile for `inputs` inputs.
    fn steps(self, inputs: usize) -> usize {
        inputs.div_ceil(self.per_step).next_multiple_of(self.step_multiple)
    }
}

impl Int8Weight {
    /// Quantizes `weight` `(out, inputs)` row-major for `kernels`. An error names what is
    /// beyond reach (a non-finite weight, more than [`MAX_INPUTS`] inputs).
    pub fn new(
        weight: &[f32],
        out: usize,
        inputs: usize,
        kernels: Int8Kernels,
    ) -> Result<Self, String> {
        if inputs == 0 || inputs > MAX_INPUTS || weight.len() != out * inputs {
            return Err(format!(
                "int8: a projection of {out} x {inputs} is beyond the int8 kernels (1 to {MAX_INPUTS} inputs)"
            ));
        }
        let mut codes = vec![0i8; out * inputs];
        let mut scales = Vec::with_capacity(out);
        for (w, q) in weight.chunks_exact(inputs).zip(codes.chunks_exact_mut(inputs)) {
            let s = quantize_row(w, q);
            if s.is_nan() {
                return Err("int8: the weights hold a NaN or an infinity".into());
            }
            scales.push(s);
        }
        let (mut packed, mut offsets) = (amx::Aligned::zeroed(0), Vec::new());
        if let Some(l) = kernels.0.layout() {
            let steps = l.steps(inputs);
            let tile = l.tile_channels;
            let tiles = out.div_ceil(tile).next_multiple_of(l.tile_multiple);
            packed = amx::Aligned::zeroed(tiles * steps * tile * 4);
            let width = 4 / l.per_step;
            for (c, w) in codes.chunks_exact(inputs).enumerate() {
                let (t, lane) = (c / tile, c % tile);
                for (k, &v) in w.iter().enumerate() {
                    let (p, j) = (k / l.per_step, k % l.per_step);
                    let at = ((t * steps + p) * tile + lane) * 4 + j * width;
                    packed[at..at + width].copy_from_slice(&kernels.0.bytes(v, false)[..width]);
                }
            }
            if kernels.0.offset_activations() {
                offsets = codes
                    .chunks_exact(inputs)
                    .map(|w| 128 * w.iter().map(|&v| i32::from(v)).sum::<i32>())
                    .collect();
            }
            codes = Vec::new();
        }
        Ok(Self { out, inputs, scales, codes, packed, offsets, kernels })
    }

    /// Inputs per row.
    pub fn inputs(&self) -> usize {
        self.inputs
    }

    /// `x W^T + b` over the rows of `x` (as wide as the weight's inputs), in parallel blocks
    /// of rows.
    pub fn forward(&self, x: &[f32], bias: Option<&[f32]>) -> Result<Vec<f32>, String> {
        self.forward_rows(&Int8Rows::new(x, self.inputs)?, bias)
    }

    /// [`Int8Weight::forward`] over rows already quantized (shared by the projections that read
    /// the same input: attention's Q, K and V).
    pub fn forward_rows(&self, x: &Int8Rows, bias: Option<&[f32]>) -> Result<Vec<f32>, String> {
        self.forward_by(x, bias, |q, sx, b, y| self.block(q, sx, b, y))
    }

    /// [`Int8Weight::forward_rows`] with the kernel over one block of quantized rows given.
    fn forward_by(
        &self,
        x: &Int8Rows,
        bias: Option<&[f32]>,
        block: impl Fn(&[i8], &[f32], &[f32], &mut [f32]) + Sync,
    ) -> Result<Vec<f32>, String> {
        let k = self.inputs;
        if x.inputs != k {
            return Err(format!("int8: rows of {} inputs for a projection of {k}", x.inputs));
        }
        if bias.is_some_and(|b| b.len() != self.out) {
            return Err(format!("int8: a bias for other than {} channels", self.out));
        }
        let out = self.out;
        let zeros = if bias.is_none() { vec![0f32; out] } else { Vec::new() };
        let bias = bias.unwrap_or(&zeros);
        // Every kernel writes each output of its block (every row and channel), as par_fill
        // requires.
        Ok(par_fill(x.scales.len() * out, ROW_BLOCK * out, |start, y| {
            let (r0, r1) = (start / out, (start + y.len()) / out);
            block(&x.codes[r0 * k..r1 * k], &x.scales[r0..r1], bias, y)
        }))
    }

    /// One block of quantized rows `q` with scales `sx` into `y`, on this weight's set.
    fn block(&self, q: &[i8], sx: &[f32], bias: &[f32], y: &mut [f32]) {
        match self.kernels.0 {
            Set::Portable => self.portable_block(q, sx, bias, y),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: a weight's `kernels` name a set this CPU runs, and it packed for them.
            Set::Avx2 => unsafe { x86::avx2_block(self, q, sx, bias, y) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Set::AvxVnni => unsafe { x86::avx_vnni_block(self, q, sx, bias, y) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Set::Avx512Vnni => unsafe { x86::vnni_block(self, q, sx, bias, y) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Set::Amx => unsafe { self.amx_block::<amx::Int8Tiles>(q, sx, bias, y) },
            #[cfg(not(target_arch = "x86_64"))]
            _ => self.portable_block(q, sx, bias, y),
        }
    }

    /// The reference: plain loops over the row-major codes.
    fn portable_block(&self, q: &[i8], sx: &[f32], bias: &[f32], y: &mut [f32]) {
        let k = self.inputs;
        for ((x, &sx), y) in q.chunks_exact(k).zip(sx).zip(y.chunks_exact_mut(self.out)) {
            for (c, (w, y)) in self.codes.chunks_exact(k).zip(y.iter_mut()).enumerate() {
                let dot: i32 = x.iter().zip(w).map(|(&a, &b)| i32::from(a) * i32::from(b)).sum();
                *y = finish(dot, sx, self.scales[c], bias[c]);
            }
        }
    }

    /// A SIMD set's kernel over one block of rows, the instructions given by `L` (the CPU's,
    /// or the tests' emulation of them): the rows laid out as the set reads them, then tile by
    /// tile, the integer sums and the shared epilogue.
    ///
    /// # Safety
    /// The CPU runs `L`'s instructions; `R` and `C` are the set's tile (`Layout`), with `C`
    /// twice `L`'s lanes.
    #[inline(always)]
    unsafe fn simd_block<L: Lanes, const R: usize, const C: usize>(
        &self,
        q: &[i8],
        sx: &[f32],
        bias: &[f32],
        y: &mut [f32],
    ) {
        let l = self.kernels.0.layout().expect("a SIMD set");
        const { assert!(C == 2 * L::BYTES / 4, "a tile is two vectors of channels") };
        assert!(l.tile_rows == R && l.tile_channels == C, "the set's own tile");
        let k = self.inputs;
        let steps = l.steps(k);
        let rows = sx.len();
        let width = 4 / l.per_step;
        // The rows in the set's bytes, padded to whole steps and tiles with X = 0.
        let zero = self.kernels.0.bytes(0, true)[0];
        let mut x = vec![zero; rows.div_ceil(R) * R * steps * 4];
        for (dst, src) in x.chunks_exact_mut(steps * 4).zip(q.chunks_exact(k)) {
            if width == 2 {
                for (d, &v) in dst.chunks_exact_mut(2).zip(src) {
                    d.copy_from_slice(&i16::from(v).to_le_bytes());
                }
            } else {
                for (d, &v) in dst.iter_mut().zip(src) {
                    *d = (v as u8) ^ 0x80;
                }
            }
        }
        let offsets = (!self.offsets.is_empty()).then_some(&self.offsets[..]);
        for (t, w) in self.packed.chunks_exact(steps * C * 4).enumerate() {
            for r0 in (0..rows).step_by(R) {
                let mut acc = [[0i32; C]; R];
                tile::<L, R, C>(&x[r0 * steps * 4..], w, steps, &mut acc);
                self.write_tile(&acc, (r0, t * C), offsets, (sx, bias), y);
            }
        }
    }

    /// AMX's kernel over one block of rows, the tile operations given by `T` (the CPU's, or the
    /// tests' emulation of them): the rows as signed bytes padded to whole tiles (16 rows of 64
    /// inputs), then AMX's loop ([`amx::products`]) with each tile's sums finished by the
    /// shared epilogue.
    ///
    /// # Safety
    /// The CPU runs `T`'s operations; the weight was packed for the AMX set.
    #[inline(always)]
    unsafe fn amx_block<T: Tiles>(&self, q: &[i8], sx: &[f32], bias: &[f32], y: &mut [f32]) {
        let k = self.inputs;
        let width = Set::Amx.layout().expect("a tile set").steps(k) * 4;
        let rows = sx.len();
        let mut x = amx::Aligned::<u8>::zeroed(rows.next_multiple_of(16) * width);
        for (dst, src) in x.chunks_exact_mut(width).zip(q.chunks_exact(k)) {
            for (d, &v) in dst.iter_mut().zip(src) {
                *d = v as u8;
            }
        }
        // One tile of 16 channels: `width / 64` tiles of 16 steps of 64 bytes, one after another.
        let tile_bytes = width * 16;
        assert!(self.packed.len() >= self.out.div_ceil(32) * 2 * tile_bytes, "AMX packing");
        let w = self.packed.as_ptr();
        let weights = |c0: usize, j: usize, at: usize| w.add((c0 / 16 + j) * tile_bytes + at * 16);
        let (sums, x) = (amx::Sums { start: None, out: None }, (&x[..], width, rows));
        amx::products::<T, i32>(x, self.out, (weights, 64), sums, |r0, c0, sums| {
            self.write_tile(sums, (r0, c0), None, (sx, bias), y)
        });
    }

    /// Writes one tile's sums: `acc[i][j]` for row `r0 + i`, channel `c0 + j`, less
    /// `offsets[c0 + j]` when given, for the rows and channels that exist.
    #[inline(always)]
    fn write_tile<const R: usize, const C: usize>(
        &self,
        acc: &[[i32; C]; R],
        (r0, c0): (usize, usize),
        offsets: Option<&[i32]>,
        (sx, bias): (&[f32], &[f32]),
        y: &mut [f32],
    ) {
        let rows = (sx.len() - r0).min(R);
        let n = (self.out - c0).min(C);
        let sw = &self.scales[c0..c0 + n];
        let b = &bias[c0..c0 + n];
        for (i, acc) in acc.iter().enumerate().take(rows) {
            let sx = sx[r0 + i];
            let y = &mut y[(r0 + i) * self.out + c0..][..n];
            match offsets {
                Some(off) => {
                    let off = &off[c0..c0 + n];
                    for j in 0..n {
                        y[j] = finish(acc[j] - off[j], sx, sw[j], b[j]);
                    }
                }
                None => {
                    for j in 0..n {
                        y[j] = finish(acc[j], sx, sw[j], b[j]);
                    }
                }
            }
        }
    }
}

/// The five instructions a tile needs of a SIMD set, over vectors of `BYTES / 4` i32 lanes.
trait Lanes {
    type V: Copy;
    /// Bytes per vector.
    const BYTES: usize;
    /// # Safety
    /// The CPU runs the set (for each method of the trait).
    unsafe fn zero() -> Self::V;
    /// # Safety
    /// `p` points to `BYTES` readable bytes.
    unsafe fn load(p: *const u8) -> Self::V;
    /// The 4 bytes at `p` in every lane.
    /// # Safety
    /// `p` points to 4 readable bytes.
    unsafe fn splat(p: *const u8) -> Self::V;
    /// `acc` plus, in each lane, the products of `x`'s and `w`'s values in that lane summed.
    unsafe fn dot(acc: Self::V, x: Self::V, w: Self::V) -> Self::V;
    /// # Safety
    /// `out` has room for `BYTES / 4` values.
    unsafe fn store(v: Self::V, out: *mut i32);
}

/// `acc[i][j] = Σ_p x[i][p] · w[p][j]` for a tile of `R` rows and `C` channels (two vectors),
/// `x` rows of `steps` 4-byte steps, `w` one packed tile.
///
/// # Safety
/// As [`Lanes`]; `x` holds `R` rows and `w` `steps` steps of two vectors.
#[inline(always)]
unsafe fn tile<L: Lanes, const R: usize, const C: usize>(
    x: &[u8],
    w: &[u8],
    steps: usize,
    acc: &mut [[i32; C]; R],
) {
    assert!(x.len() >= R * steps * 4 && w.len() >= steps * 2 * L::BYTES, "a whole tile");
    let mut a = [[L::zero(); 2]; R];
    let (xp, wp) = (x.as_ptr(), w.as_ptr());
    for p in 0..steps {
        let w0 = L::load(wp.add(p * 2 * L::BYTES));
        let w1 = L::load(wp.add(p * 2 * L::BYTES + L::BYTES));
        for (i, a) in a.iter_mut().enumerate() {
            let b = L::splat(xp.add((i * steps + p) * 4));
            a[0] = L::dot(a[0], b, w0);
            a[1] = L::dot(a[1], b, w1);
        }
    }
    for (a, out) in a.iter().zip(acc.iter_mut()) {
        L::store(a[0], out.as_mut_ptr());
        L::store(a[1], out.as_mut_ptr().add(L::BYTES / 4));
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Int8Weight, Lanes};

    /// A [`Lanes`] set over one vector type: its width in bytes, zero, unaligned load, 32-bit
    /// broadcast and store, and its dot-product step.
    macro_rules! lanes {
        ($(#[$doc:meta])* $name:ident, $v:ty, $bytes:literal, $zero:ident, $load:ident,
         $set1:ident, $store:ident, |$acc:ident, $x:ident, $w:ident| $dot:expr) => {
            $(#[$doc])*
            pub struct $name;

            impl Lanes for $name {
                type V = $v;
                const BYTES: usize = $bytes;
                #[inline(always)]
                unsafe fn zero() -> $v {
                    $zero()
                }
                #[inline(always)]
                unsafe fn load(p: *const u8) -> $v {
                    $load(p as *const _)
                }
                #[inline(always)]
                unsafe fn splat(p: *const u8) -> $v {
                    $set1((p as *const i32).read_unaligned())
                }
                #[inline(always)]
                unsafe fn dot($acc: $v, $x: $v, $w: $v) -> $v {
                    $dot
                }
                #[inline(always)]
                unsafe fn store(v: $v, out: *mut i32) {
                    $store(out as *mut _, v)
                }
            }
        };
    }

    lanes!(
        /// AVX2: i16 pairs, `vpmaddwd` then `vpaddd`.
        Avx2, __m256i, 32, _mm256_setzero_si256, _mm256_loadu_si256, _mm256_set1_epi32,
        _mm256_storeu_si256, |acc, x, w| _mm256_add_epi32(acc, _mm256_madd_epi16(x, w))
    );
    lanes!(
        /// AVX-VNNI: unsigned times signed byte quads, `vpdpbusd` on 256 bits.
        AvxVnni, __m256i, 32, _mm256_setzero_si256, _mm256_loadu_si256, _mm256_set1_epi32,
        _mm256_storeu_si256, |acc, x, w| _mm256_dpbusd_avx_epi32(acc, x, w)
    );
    lanes!(
        /// AVX-512 VNNI: unsigned times signed byte quads, `vpdpbusd`.
        Vnni, __m512i, 64, _mm512_setzero_si512, _mm512_loadu_si512, _mm512_set1_epi32,
        _mm512_storeu_si512, |acc, x, w| _mm512_dpbusd_epi32(acc, x, w)
    );

    /// # Safety
    /// The CPU has AVX2; `weight` was packed for the AVX2 set.
    #[target_feature(enable = "avx2")]
    pub unsafe fn avx2_block(weight: &Int8Weight, q: &[i8], sx: &[f32], b: &[f32], y: &mut [f32]) {
        weight.simd_block::<Avx2, 6, 16>(q, sx, b, y)
    }

    /// # Safety
    /// The CPU has AVX2 and AVX-VNNI; `weight` was packed for the AVX-VNNI set.
    #[target_feature(enable = "avx2,avxvnni")]
    pub unsafe fn avx_vnni_block(
        weight: &Int8Weight,
        q: &[i8],
        sx: &[f32],
        b: &[f32],
        y: &mut [f32],
    ) {
        weight.simd_block::<AvxVnni, 6, 16>(q, sx, b, y)
    }

    /// # Safety
    /// The CPU has AVX-512 F, BW and VNNI; `weight` was packed for the AVX-512 VNNI set.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn vnni_block(weight: &Int8Weight, q: &[i8], sx: &[f32], b: &[f32], y: &mut [f32]) {
        weight.simd_block::<Vnni, 8, 32>(q, sx, b, y)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::testing::{kernel_values, projection_case};

    /// The tests' stand-ins for the SIMD instructions, lane by lane from their definitions, so
    /// that each set's kernel code (layouts, tiles, offsets, epilogue) runs on any CPU; only
    /// the five instruction wrappers of `x86` are not covered by them.
    struct EmuAvx2;
    struct EmuAvxVnni;
    struct EmuVnni;
    type EmuAmx = tevatron_ir::amx::emulation::Emulated<tevatron_ir::amx::emulation::Tdpbssd>;

    fn lane(v: &[u8], i: usize) -> i32 {
        i32::from_le_bytes([v[4 * i], v[4 * i + 1], v[4 * i + 2], v[4 * i + 3]])
    }

    macro_rules! emulated {
        ($name:ident, $bytes:literal, |$x:ident, $w:ident, $i:ident| $products:expr) => {
            impl Lanes for $name {
                type V = [u8; $bytes];
                const BYTES: usize = $bytes;
                unsafe fn zero() -> Self::V {
                    [0; $bytes]
                }
                unsafe fn load(p: *const u8) -> Self::V {
                    std::ptr::read_unaligned(p as *const Self::V)
                }
                unsafe fn splat(p: *const u8) -> Self::V {
                    let four = std::ptr::read_unaligned(p as *const [u8; 4]);
                    std::array::from_fn(|i| four[i % 4])
                }
                unsafe fn dot(acc: Self::V, $x: Self::V, $w: Self::V) -> Self::V {
                    let mut out = [0u8; $bytes];
                    for $i in 0..$bytes / 4 {
                        let v = lane(&acc, $i).wrapping_add($products);
                        out[4 * $i..4 * $i + 4].copy_from_slice(&v.to_le_bytes());
                    }
                    out
                }
                unsafe fn store(v: Self::V, out: *mut i32) {
                    for i in 0..$bytes / 4 {
                        *out.add(i) = lane(&v, i);
                    }
                }
            }
        };
    }
    // vpmaddwd + vpaddd: two signed i16 products per lane.
    emulated!(EmuAvx2, 32, |x, w, i| (0..2)
        .map(|j| {
            let at = 4 * i + 2 * j;
            let a = i16::from_le_bytes([x[at], x[at + 1]]);
            let b = i16::from_le_bytes([w[at], w[at + 1]]);
            i32::from(a) * i32::from(b)
        })
        .sum::<i32>());
    // vpdpbusd: four unsigned-by-signed byte products per lane, on 256 and 512 bits.
    emulated!(EmuAvxVnni, 32, |x, w, i| (0..4)
        .map(|j| i32::from(x[4 * i + j]) * i32::from(w[4 * i + j] as i8))
        .sum::<i32>());
    emulated!(EmuVnni, 64, |x, w, i| (0..4)
        .map(|j| i32::from(x[4 * i + j]) * i32::from(w[4 * i + j] as i8))
        .sum::<i32>());

    /// The SIMD sets, each checked on emulated instructions on any CPU.
    const SIMD_SETS: [Set; 4] = [Set::Avx2, Set::AvxVnni, Set::Avx512Vnni, Set::Amx];

    /// [`Int8Weight::forward`] of `w` packed for the SIMD `set`, its kernel code run on the
    /// emulation of the set's instructions.
    fn emulated_forward(
        set: Set,
        (w, out, inputs): (&[f32], usize, usize),
        x: &[f32],
        bias: Option<&[f32]>,
    ) -> Vec<f32> {
        let q = Int8Weight::new(w, out, inputs, Int8Kernels(set)).unwrap();
        let rows = Int8Rows::new(x, inputs).unwrap();
        // SAFETY: the emulated instructions run on any CPU.
        q.forward_by(&rows, bias, |a, s, b, y| unsafe {
            match set {
                Set::Avx2 => q.simd_block::<EmuAvx2, 6, 16>(a, s, b, y),
                Set::AvxVnni => q.simd_block::<EmuAvxVnni, 6, 16>(a, s, b, y),
                Set::Avx512Vnni => q.simd_block::<EmuVnni, 8, 32>(a, s, b, y),
                Set::Amx => q.amx_block::<EmuAmx>(a, s, b, y),
                Set::Portable => unreachable!("not a SIMD set"),
            }
        })
        .unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Every kernel set gives the portable loops' bits: the sets this CPU runs on its own
        /// instructions, and every SIMD set's kernel code on emulated ones (the VNNI kernels
        /// included, where the CPU has no VNNI); on shapes that cover partial tiles, odd
        /// inputs, whole zero rows and rows of one block and of several.
        #[test]
        fn every_kernel_set_gives_the_portable_bits(
            rows in 0usize..110,
            inputs in 1usize..70,
            out in 1usize..70,
            seed in any::<u64>(),
            with_bias in any::<bool>(),
        ) {
            let (w, x, b) = projection_case(rows, inputs, out, seed);
            let bias = with_bias.then_some(&b[..]);
            let reference = Int8Weight::new(&w, out, inputs, Int8Kernels(Set::Portable)).unwrap();
            let want = reference.forward(&x, bias).unwrap();
            let same = |got: &[f32]| crate::testing::same_bits(got, &want);
            for kernels in Int8Kernels::available() {
                let got = Int8Weight::new(&w, out, inputs, kernels).unwrap().forward(&x, bias).unwrap();
                prop_assert!(same(&got), "{} differs from the portable loops", kernels.name());
            }
            for set in SIMD_SETS {
                let got = emulated_forward(set, (&w, out, inputs), &x, bias);
                prop_assert!(same(&got), "emulated {:?} differs from the portable loops", set);
            }
        }
    }

    /// At the widest input allowed, with every value at full scale and both signs, the sums
    /// stay exact in every set (`255 * 127 * MAX_INPUTS` is just below 2^31 for VNNI's
    /// unsigned activations).
    #[test]
    fn the_widest_input_at_full_scale_stays_exact() {
        let k = MAX_INPUTS;
        let w: Vec<f32> = (0..2 * k).map(|i| if i < k { 1.0 } else { -1.0 }).collect();
        let x: Vec<f32> = (0..2 * k).map(|i| if i < k { -0.5 } else { 0.5 }).collect();
        let portable = Int8Weight::new(&w, 2, k, Int8Kernels(Set::Portable)).unwrap();
        let want = portable.forward(&x, None).unwrap();
        for (got, sign) in want.iter().zip([-1.0, 1.0, 1.0, -1.0]) {
            let exact = sign * 0.5 * k as f32;
            assert!((got - exact).abs() <= 1e-5 * exact.abs(), "{got} vs {exact}");
        }
        for set in SIMD_SETS {
            assert_eq!(emulated_forward(set, (&w, 2, k), &x, None), want, "emulated {set:?}");
        }
        for kernels in Int8Kernels::available() {
            let q = Int8Weight::new(&w, 2, k, kernels).unwrap();
            assert_eq!(q.forward(&x, None).unwrap(), want, "{}", kernels.name());
        }
    }

    /// The portable reference is the scheme of the module docs, computed here in f64 from its
    /// definition; and it stays near the F32 product (each factor within half a step).
    #[test]
    fn the_reference_is_the_documented_scheme_and_near_f32() {
        let (rows, inputs, out) = (13, 37, 21);
        let w = kernel_values(out * inputs, 7);
        let x = kernel_values(rows * inputs, 8);
        let b = kernel_values(out, 9);
        let got = Int8Weight::new(&w, out, inputs, Int8Kernels(Set::Portable))
            .unwrap()
            .forward(&x, Some(&b))
            .unwrap();
        let quant = |v: &[f32]| {
            let max = v.iter().fold(0f64, |m, &a| m.max(f64::from(a).abs()));
            let codes: Vec<f64> =
                v.iter().map(|&a| (f64::from(a) * 127.0 / max).round_ties_even()).collect();
            (codes, max / 127.0)
        };
        for r in 0..rows {
            let (xq, sx) = quant(&x[r * inputs..(r + 1) * inputs]);
            for c in 0..out {
                let (wq, sw) = quant(&w[c * inputs..(c + 1) * inputs]);
                let dot: f64 = xq.iter().zip(&wq).map(|(a, b)| a * b).sum();
                let want = dot * sx * sw + f64::from(b[c]);
                let g = f64::from(got[r * out + c]);
                assert!((g - want).abs() <= 1e-5 * want.abs().max(1.0), "{r},{c}: {g} vs {want}");
                let exact: f64 = (0..inputs)
                    .map(|k| f64::from(x[r * inputs + k]) * f64::from(w[c * inputs + k]))
                    .sum::<f64>()
                    + f64::from(b[c]);
                // |error| <= sum_k (|x| dw + |w| dx + dx dw), half a step each.
                let bound: f64 = (0..inputs)
                    .map(|k| {
                        let (xa, wa) = (
                            f64::from(x[r * inputs + k]).abs(),
                            f64::from(w[c * inputs + k]).abs(),
                        );
                        xa * sw / 2.0 + wa * sx / 2.0 + sx * sw / 4.0
                    })
                    .sum();
                assert!((g - exact).abs() <= bound + 1e-5, "{r},{c}: {g} vs {exact} > {bound}");
            }
        }
    }

    #[test]
    fn a_row_with_a_nan_or_an_infinity_gives_nans_and_only_there() {
        let (inputs, out) = (9, 5);
        let w = kernel_values(out * inputs, 3);
        let mut x = kernel_values(4 * inputs, 4);
        x[inputs + 2] = f32::NAN;
        x[3 * inputs] = f32::INFINITY;
        for kernels in Int8Kernels::available() {
            let y = Int8Weight::new(&w, out, inputs, kernels).unwrap().forward(&x, None).unwrap();
            for (r, row) in y.chunks(out).enumerate() {
                let nan = r == 1 || r == 3;
                assert!(row.iter().all(|v| v.is_nan() == nan), "{}: row {r}", kernels.name());
            }
        }
        let mut bad = w.clone();
        bad[4] = f32::NAN;
        assert!(Int8Weight::new(&bad, out, inputs, Int8Kernels::detect()).is_err());
        assert!(Int8Weight::new(&w, out, inputs + 1, Int8Kernels::detect()).is_err());
    }
}
