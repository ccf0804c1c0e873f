//! bf16 linear products on the CPU where it has AMX-BF16 or AVX-512 BF16: for inference (`encode --bf16`,
//! `rerank --bf16`) each weight rounded to bf16 once at load and each row of activations at
//! each call; for training (`train --bf16`) a linear layer's forward and both gradients
//! ([`Bf16Kernels::linear`] and the two after it), their operands rounded at each call but a
//! frozen weight's, rounded once ([`Bf16FrozenWeight`]); the products of bf16 pairs summed in
//! F32 by `vdpbf16ps` (or AMX's `tdpbf16ps`, below).
//!
//! What is rounded is what PyTorch's CPU autocast rounds for a linear layer: both operands, to
//! the nearest bf16 (ties to even), a relative error of at most 2^-9 each; subnormal F32 values
//! become zeros of their sign, as both instructions take subnormal operands and as AVX-512
//! BF16's conversion (`vcvtne2ps2bf16`, which rounds rows where the CPU has it) rounds them, so
//! that every path and [`reference()`] round alike on every CPU. The product of two
//! bf16 values is exact in F32 and the sums are F32; the bias, the outputs and everything
//! between the projections (attention, normalisation, activations) stay F32.
//!
//! The kernel: `vdpbf16ps` adds to each of 16 F32 lanes the products of a pair of bf16 values
//! (Intel's manual: the odd element's product, then the even one's, each addition rounded to
//! nearest, subnormal inputs and results as zero). The weight is packed in tiles of 32
//! channels, each step of two inputs holding the tile's channels' pairs side by side; a row's
//! pair is broadcast to every lane; a tile of 8 rows x 32 channels keeps its 16 accumulators in
//! registers. [`reference()`] computes the same sums one at a time in the same order, and the
//! tests require its bits of the kernel, run on this CPU's instruction where it has one and on
//! an emulation of the instruction written from the manual's definition everywhere.
//!
//! On a CPU with AMX-BF16 (Intel Xeon from Sapphire Rapids) the products run on AMX's
//! `tdpbf16ps` instead: a 16 x 16 block of F32 sums over 16 bf16 pairs per instruction, where
//! that CPU's `vdpbf16ps` does no more multiply-adds per cycle than its F32 FMAs. The operands
//! are rounded the same way, but the hardware adds the pairs in its own order and rounding
//! (it matches neither order of Intel's pseudocode bit for bit), so AMX's sums are within F32
//! rounding of [`reference()`]'s, not equal to them (tested with a bound); the kernel's loop
//! and layout are tested bit for bit on an emulation of `tdpbf16ps` (even element, then odd).
//! AMX reads the rows row by row (a tile is 16 rows of 16 pairs), so for it [`Bf16Rows`] packs
//! them that way at once rather than in vdpbf16ps' tiles of 8 rows, every operand starts on a
//! cache line (`amx::Aligned`), and the sums start from the bias so that whole tiles are stored
//! straight into the outputs (docs/bf16.md has what each of these saved).
//!
//! A CPU without AVX-512 BF16 or AMX-BF16 has no kernel here ([`Bf16Kernels::detect`] is
//! `None`): `--bf16` on it computes in F32, which is faster there than widening bf16 operands
//! would be.

use super::fast::{par_fill, with_simd};
use tevatron_ir::amx::{self, Tiles};

/// Rows per parallel task: a multiple of [`TILE_ROWS`] and of two [`AMX_ROWS`], so that every
/// task starts on a tile and AMX's loop (`amx::products`, two row tiles a group sharing each
/// pair of weight tiles it loads) never ends a task on a group of one row tile, which loads
/// three tiles for two products where a whole group loads four for four (with 48 rows a task,
/// a third of the rows ran so).
const ROW_BLOCK: usize = 64;
const _: () =
    assert!(ROW_BLOCK.is_multiple_of(TILE_ROWS) && ROW_BLOCK.is_multiple_of(2 * AMX_ROWS));
/// Rows of a tile.
const TILE_ROWS: usize = 8;
/// Channels of a tile: two vectors of 16 F32 lanes.
const TILE_CHANNELS: usize = 32;
/// Rows of an AMX tile.
const AMX_ROWS: usize = 16;

/// The bf16 product kernel of this CPU. Only [`Bf16Kernels::detect`] makes one (and, in
/// tests, `emulated`, `emulated_amx` and `available`), so a value always names an instruction
/// this CPU runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bf16Kernels(Set);

/// Where the kernel's instruction comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Set {
    /// `vdpbf16ps` on 512 bits.
    Avx512,
    /// AMX's `tdpbf16ps` on tiles.
    Amx,
    /// The instruction emulated from its definition, so that tests run the kernel's code (and
    /// the layers that use it) on any CPU.
    #[cfg(test)]
    Emulated,
    /// `tdpbf16ps` emulated from its definition, for AMX's loop.
    #[cfg(test)]
    EmulatedAmx,
}

impl Bf16Kernels {
    /// AMX's `tdpbf16ps` when this CPU has AMX-BF16 (and the system grants the tiles), else
    /// `vdpbf16ps` on 512 bits when it has AVX-512 F and BF16.
    pub fn detect() -> Option<Self> {
        if amx::usable(amx::Product::Bf16) {
            return Some(Bf16Kernels(Set::Amx));
        }
        Self::vdpbf16ps()
    }

    /// `vdpbf16ps` on 512 bits, when this CPU has AVX-512 F and BF16.
    fn vdpbf16ps() -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx512f") && has!("avx512bf16") {
                return Some(Bf16Kernels(Set::Avx512));
            }
        }
        None
    }

    /// Whether these products outrun F32's on this CPU, so that inference (`encode --bf16`)
    /// should take them: AMX's always; `vdpbf16ps` except on Intel's CPUs, which issue it at
    /// half the rate of their F32 FMAs, so that it does no more multiply-adds a cycle and the
    /// rounding and packing come on top (0.65x our F32 encode on a Xeon of the Emerald Rapids
    /// generation, docs/bf16.md). Training takes them anyway: its alternative there is
    /// candle's products widened to F32, slower still.
    pub fn faster_than_f32(self) -> bool {
        match self.0 {
            Set::Avx512 => !intel(),
            _ => true,
        }
    }

    /// The kernel's code on an emulation of the instruction (any CPU; tests).
    #[cfg(test)]
    pub(crate) fn emulated() -> Self {
        Bf16Kernels(Set::Emulated)
    }

    /// AMX's loop on an emulation of `tdpbf16ps` (any CPU; tests).
    #[cfg(test)]
    pub(crate) fn emulated_amx() -> Self {
        Bf16Kernels(Set::EmulatedAmx)
    }

    /// Every kernel this CPU runs, [`Bf16Kernels::detect`]'s choice last (tests: `vdpbf16ps`
    /// is still what training runs where the system refuses the tiles).
    #[cfg(test)]
    pub(crate) fn available() -> Vec<Self> {
        let mut all: Vec<Self> = Self::vdpbf16ps().into_iter().collect();
        all.extend(Self::detect().filter(|k| !all.contains(k)));
        all
    }

    /// Whether the kernel runs on AMX's tiles (whose weights are padded to whole tiles).
    fn tiles(self) -> bool {
        match self.0 {
            Set::Amx => true,
            #[cfg(test)]
            Set::EmulatedAmx => true,
            _ => false,
        }
    }

    /// The packed steps (pairs of inputs) of a weight of `inputs` inputs: whole tiles of 16
    /// steps for AMX.
    fn weight_steps(self, inputs: usize) -> usize {
        let steps = inputs.div_ceil(2);
        if self.tiles() {
            steps.next_multiple_of(16)
        } else {
            steps
        }
    }

    /// A name for logs.
    pub fn name(self) -> &'static str {
        match self.0 {
            Set::Avx512 => "AVX-512 BF16 vdpbf16ps",
            Set::Amx => "AMX tdpbf16ps",
            #[cfg(test)]
            Set::Emulated => "emulated vdpbf16ps",
            #[cfg(test)]
            Set::EmulatedAmx => "emulated tdpbf16ps",
        }
    }

    /// A training step's linear layer under `--bf16` (forward `x W^T + b`): `x` rows of
    /// `inputs`, `weight` `(out, inputs)`, both rounded to bf16 and the products summed in F32,
    /// as autocast rounds them; the outputs stay F32. NaNs pass through.
    pub fn linear(
        self,
        x: &[f32],
        weight: &[f32],
        (out, inputs): (usize, usize),
        bias: Option<&[f32]>,
    ) -> Result<Vec<f32>, String> {
        Bf16Weight::packed(weight, out, inputs, self)?.forward(x, bias)
    }

    /// A frozen weight `(out, inputs)` packed once for both of its products in training
    /// ([`Bf16FrozenWeight`]).
    pub fn frozen(
        self,
        weight: &[f32],
        (out, inputs): (usize, usize),
    ) -> Result<Bf16FrozenWeight, String> {
        Ok(Bf16FrozenWeight {
            rows: Bf16Weight::packed(weight, out, inputs, self)?,
            columns: Bf16Weight::from_columns(weight, out, self)?,
        })
    }

    /// The input gradient `dy W` of [`Bf16Kernels::linear`]: `dy` rows of `out`, `weight`
    /// `(out, inputs)`; rows of `inputs` back.
    pub fn linear_input_grad(
        self,
        dy: &[f32],
        weight: &[f32],
        out: usize,
    ) -> Result<Vec<f32>, String> {
        Bf16Weight::from_columns(weight, out, self)?.forward(dy, None)
    }

    /// The weight gradient `dy^T x` `(out, inputs)` of [`Bf16Kernels::linear`], summed over
    /// the `rows` rows of `dy` and `x`.
    pub fn linear_weight_grad(
        self,
        dy: &[f32],
        x: &[f32],
        rows: usize,
    ) -> Result<Vec<f32>, String> {
        let x = Bf16Weight::from_columns(x, rows, self)?;
        x.forward_rows(&Bf16Rows::from_columns(dy, rows, self)?, None)
    }
}

/// A weight that never changes while a model trains (a LoRA base's), packed once for its two
/// products in a training step: the forward `x W^T` (its rows) and the input gradient `dy W`
/// (its columns), which [`Bf16Kernels::linear`] and [`Bf16Kernels::linear_input_grad`] pack at
/// every call for a weight that trains.
#[derive(Debug)]
pub struct Bf16FrozenWeight {
    rows: Bf16Weight,
    columns: Bf16Weight,
}

impl Bf16FrozenWeight {
    /// The weight's shape, `(out, inputs)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.rows.out, self.rows.inputs)
    }

    /// `x W^T + b`, as [`Bf16Kernels::linear`] gives it.
    pub fn forward(&self, x: &[f32], bias: Option<&[f32]>) -> Result<Vec<f32>, String> {
        self.rows.forward(x, bias)
    }

    /// `dy W`, as [`Bf16Kernels::linear_input_grad`] gives it.
    pub fn input_grad(&self, dy: &[f32]) -> Result<Vec<f32>, String> {
        self.columns.forward(dy, None)
    }
}

/// Whether this CPU is Intel's (CPUID's vendor string).
fn intel() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let leaf = std::arch::x86_64::__cpuid(0);
        // "GenuineIntel" in EBX, EDX, ECX.
        (leaf.ebx, leaf.edx, leaf.ecx) == (0x756e_6547, 0x4965_6e69, 0x6c65_746e)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `v` rounded to the nearest bf16, ties to even (the upper 16 bits of an F32); a NaN stays a
/// quiet NaN; a subnormal becomes a zero of its sign (as `vcvtne2ps2bf16` rounds it, module
/// docs). Branch-free, so that packing loops vectorise.
#[inline(always)]
pub fn to_bf16(v: f32) -> u16 {
    let b = v.to_bits();
    // Only NaNs lie within 0x8000 of u32::MAX, and they take the quiet form instead.
    let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16;
    let subnormal = b & 0x7f80_0000 == 0;
    (if v.is_nan() {
        (b >> 16) | 0x40
    } else if subnormal {
        (b >> 16) & 0x8000
    } else {
        rounded
    }) as u16
}

/// Two bf16 values as one 32-bit lane of `vdpbf16ps`: `even` in the low half.
#[inline(always)]
fn pair(even: f32, odd: f32) -> u32 {
    u32::from(to_bf16(even)) | (u32::from(to_bf16(odd)) << 16)
}

/// One row of `x` as pairs: `pairs[p]` holds inputs `2p` and `2p + 1` (0 past the end).
#[inline(always)]
fn pack_row(x: &[f32], pairs: &mut [u32]) {
    let mut chunks = x.chunks_exact(2);
    for (p, c) in pairs.iter_mut().zip(&mut chunks) {
        // [`pair`] as u64 lanes, which vectorise where pairs of f32 lanes would be shuffled.
        *p = pair_bits(u64::from(c[0].to_bits()) | (u64::from(c[1].to_bits()) << 32));
    }
    if let [last] = chunks.remainder() {
        pairs[x.len() / 2] = pair(*last, 0.0);
    }
}

/// [`pair`] of the two F32 values in `v`'s bits (`even` in the low half).
#[inline(always)]
fn pair_bits(v: u64) -> u32 {
    let half = |b: u64| {
        let b = b & 0xffff_ffff;
        // As `to_bf16`: no carry out of the half but for NaNs, which take the quiet form;
        // subnormals to zeros of their sign.
        let rounded = (b + 0x7fff + ((b >> 16) & 1)) >> 16;
        let nan = b & 0x7fff_ffff > 0x7f80_0000;
        let subnormal = b & 0x7f80_0000 == 0;
        (if nan {
            (b >> 16) | 0x40
        } else if subnormal {
            (b >> 16) & 0x8000
        } else {
            rounded
        }) & 0xffff
    };
    (half(v) | (half(v >> 32) << 16)) as u32
}

/// The kernel's operand layout, for rows (tiles of [`TILE_ROWS`]) and weights (tiles of
/// [`TILE_CHANNELS`] channels) alike: the lines of a matrix whose `inputs` values are rounded
/// and paired, in tiles of `tile` lines; within a tile, step by step (two inputs), the tile's
/// lines' pairs side by side, so that one step of a tile is one contiguous run. Lines past the
/// last are zeros.
///
/// The lines are the rows of row-major `x`, `inputs` wide (`Layout::Rows`), or its columns, `x`
/// then having `inputs` rows (`Layout::Columns`: the transpose packed without a copy). Each
/// tile has `steps` steps, `inputs.div_ceil(2)` or more (the ones past the inputs are zeros).
fn pack_tiles(
    x: &[f32],
    inputs: usize,
    layout: Layout,
    (tile, steps): (usize, usize),
    may_convert: bool,
) -> amx::Aligned<u32> {
    let lines = x.len() / inputs;
    let rounding = Rounding::new(may_convert);
    let len = lines.div_ceil(tile) * tile * steps;
    let fill = |t: usize, out: &mut [u32]| {
        let (l0, n) = (t * tile, (lines - t * tile).min(tile));
        pack_tile(out, x, (inputs, layout, tile, steps), (l0, n), rounding)
    };
    // SAFETY: `fill` writes every value of its chunk before reading any (`tile_of`).
    unsafe { amx::Aligned::filled(len, steps * tile, fill) }
}

with_simd!(
    /// [`tile_of`] in the CPU's widest vectors (a named function: as a closure for
    /// `fast::simd` it was left out of line in SSE code, 12.6% of a bf16 training step).
    fn pack_tile = tile_of(
        out: &mut [u32],
        x: &[f32],
        form: (usize, Layout, usize, usize),
        lines: (usize, usize),
        rounding: Rounding,
    )
);

/// One tile of [`pack_tiles`] (`tile` lines of `steps` steps of `x`'s lines, `inputs` wide)
/// into its chunk `out`, lines `l0..l0 + n`, written whole: every value from the zero-padded
/// lines for rows, zeros first for columns.
#[inline(always)]
fn tile_of(
    out: &mut [u32],
    x: &[f32],
    (inputs, layout, tile, steps): (usize, Layout, usize, usize),
    (l0, n): (usize, usize),
    rounding: Rounding,
) {
    let lines = x.len() / inputs;
    match layout {
        #[cfg(target_arch = "x86_64")]
        Layout::Rows if rounding.converts && tile.is_multiple_of(16) => {
            // SAFETY: `converts` said the CPU has AVX-512 F, BW and BF16.
            unsafe { x86::rows_tile_converting(out, x, (inputs, tile, steps), (l0, n)) }
        }
        Layout::Rows => {
            // The tile's lines packed one after another, then interleaved step by step
            // (contiguous stores, which measured faster than a strided scatter).
            let mut packed = vec![0u32; tile * steps];
            for (j, line) in packed.chunks_exact_mut(steps).take(n).enumerate() {
                rounding.row(&x[(l0 + j) * inputs..][..inputs], line);
            }
            for (p, out) in out.chunks_exact_mut(tile).enumerate() {
                for (j, o) in out.iter_mut().enumerate() {
                    *o = packed[j * steps + p];
                }
            }
        }
        Layout::Columns => {
            out.fill(0);
            for (p, out) in out.chunks_exact_mut(tile).take(inputs.div_ceil(2)).enumerate() {
                // Rows 2p and 2p + 1 of `x`, columns l0..l0 + n.
                let even = &x[2 * p * lines + l0..][..n];
                match x.get((2 * p + 1) * lines + l0..(2 * p + 1) * lines + l0 + n) {
                    Some(odd) => {
                        for ((o, &e), &d) in out.iter_mut().zip(even).zip(odd) {
                            *o = pair(e, d);
                        }
                    }
                    None => {
                        for (o, &e) in out.iter_mut().zip(even) {
                            *o = pair(e, 0.0);
                        }
                    }
                }
            }
        }
    }
}

/// AMX's operand layout for rows: the lines of a matrix ([`pack_tiles`]' `Layout`: the rows of
/// `x`, `inputs` wide, or its columns) one after another, rounded and paired, each `width`
/// steps (`inputs.div_ceil(2)` or more; zeros past the inputs), and lines of zeros up to a whole
/// tile of [`AMX_ROWS`].
fn pack_lines(
    x: &[f32],
    inputs: usize,
    layout: Layout,
    width: usize,
    may_convert: bool,
) -> amx::Aligned<u32> {
    let lines = x.len() / inputs;
    let rounding = Rounding::new(may_convert);
    let len = lines.next_multiple_of(AMX_ROWS) * width;
    // Each tile's chunk written whole, padding included (`line_tile`).
    let fill = |t: usize, out: &mut [u32]| {
        let (l0, n) = (t * AMX_ROWS, (lines - t * AMX_ROWS).min(AMX_ROWS));
        pack_line_tile(out, x, (inputs, layout, width), (l0, n), rounding)
    };
    // SAFETY: `fill` writes every value of its chunk before reading any (`line_tile`).
    unsafe { amx::Aligned::filled(len, AMX_ROWS * width, fill) }
}

/// How rows are rounded into pairs: by `vcvtne2ps2bf16` where the caller allows it and
/// [`converts`] says the CPU has it, by [`pack_row`] otherwise (the same pairs).
#[derive(Clone, Copy)]
struct Rounding {
    converts: bool,
}

impl Rounding {
    fn new(may_convert: bool) -> Self {
        Self { converts: may_convert && converts() }
    }

    /// One row of `x` as pairs, as [`pack_row`].
    #[inline(always)]
    fn row(self, x: &[f32], pairs: &mut [u32]) {
        #[cfg(target_arch = "x86_64")]
        if self.converts {
            // SAFETY: `converts` said the CPU has AVX-512 F and BF16.
            return unsafe { x86::pack_row_converting(x, pairs) };
        }
        pack_row(x, pairs)
    }
}

/// Whether this CPU has AVX-512 BF16's conversion (`vcvtne2ps2bf16`: 32 F32 values rounded to
/// bf16 in one instruction), and AVX-512 BW beside it (`vpermw`, which interleaves two rows'
/// values into pairs), which [`pack_lines`] and [`pack_tiles`] then take for rows, and
/// [`pack_lines`] for columns: rounding rows for AMX pair by pair in integer lanes
/// ([`pack_row`]) was about 8% of `encode --bf16`'s time on an AMX Xeon. The instruction rounds
/// as [`to_bf16`] does (to nearest, ties to even; a NaN stays a quiet NaN; a subnormal to a
/// zero of its sign).
fn converts() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        has!("avx512f") && has!("avx512bw") && has!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

with_simd!(
    /// [`line_tile`] in the CPU's widest vectors.
    fn pack_line_tile = line_tile(
        out: &mut [u32],
        x: &[f32],
        form: (usize, Layout, usize),
        lines: (usize, usize),
        rounding: Rounding,
    )
);

/// One tile of [`pack_lines`] ([`AMX_ROWS`] lines of `width` pairs): lines `l0..l0 + n` into
/// `out`, every value written (zeros past the inputs and for the padding lines).
#[inline(always)]
fn line_tile(
    out: &mut [u32],
    x: &[f32],
    (inputs, layout, width): (usize, Layout, usize),
    (l0, n): (usize, usize),
    rounding: Rounding,
) {
    let (lines, pairs) = (x.len() / inputs, inputs.div_ceil(2));
    match layout {
        Layout::Rows => {
            for (j, line) in out.chunks_exact_mut(width).enumerate() {
                if j < n {
                    rounding.row(&x[(l0 + j) * inputs..][..inputs], line);
                    line[pairs..].fill(0);
                } else {
                    line.fill(0);
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        Layout::Columns if rounding.converts => {
            out.fill(0);
            // SAFETY: `converts` said the CPU has AVX-512 F, BW and BF16.
            unsafe { x86::columns_tile_converting(out, x, (inputs, width), (l0, n)) }
        }
        Layout::Columns => {
            out.fill(0);
            for p in 0..pairs {
                // Rows 2p and 2p + 1 of `x`, columns l0..l0 + n.
                let even = &x[2 * p * lines + l0..][..n];
                let odd = x.get((2 * p + 1) * lines + l0..(2 * p + 1) * lines + l0 + n);
                for (j, &e) in even.iter().enumerate() {
                    out[j * width + p] = pair(e, odd.map_or(0.0, |odd| odd[j]));
                }
            }
        }
    }
}

/// Whether [`pack_tiles`] and [`pack_lines`] pack a matrix's rows or its columns.
#[derive(Clone, Copy)]
enum Layout {
    Rows,
    Columns,
}

/// A projection's weight in bf16, packed for the kernel.
pub struct Bf16Weight {
    out: usize,
    inputs: usize,
    /// Tiles of [`TILE_CHANNELS`] channels as [`pack_tiles`] lays them out.
    packed: amx::Aligned<u32>,
    kernels: Bf16Kernels,
}

impl std::fmt::Debug for Bf16Weight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bf16Weight")
            .field("out", &self.out)
            .field("inputs", &self.inputs)
            .field("kernels", &self.kernels.name())
            .finish()
    }
}

/// Activations rounded for the bf16 products, laid out for the kernel that reads them
/// (`RowsLayout`) and padded with rows of zeros to whole tiles.
pub struct Bf16Rows {
    inputs: usize,
    rows: usize,
    layout: RowsLayout,
    pairs: amx::Aligned<u32>,
}

/// How [`Bf16Rows`] lays out its pairs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RowsLayout {
    /// For `vdpbf16ps`: tiles of [`TILE_ROWS`] rows, each step's pairs of the tile's rows side
    /// by side ([`pack_tiles`]).
    Tiles,
    /// For AMX: row after row, each `steps` pairs wide, as its tile loads read them
    /// ([`pack_lines`]), in whole tiles of [`AMX_ROWS`] rows.
    Lines { steps: usize },
}

impl RowsLayout {
    /// The layout `kernels` read for rows of `inputs` inputs.
    fn of(kernels: Bf16Kernels, inputs: usize) -> Self {
        if kernels.tiles() {
            Self::Lines { steps: kernels.weight_steps(inputs) }
        } else {
            Self::Tiles
        }
    }
}

impl Bf16Rows {
    /// Rounds the rows of `x`, `inputs` wide, in parallel, for `kernels`.
    fn new(x: &[f32], inputs: usize, kernels: Bf16Kernels) -> Result<Self, String> {
        if inputs == 0 || !x.len().is_multiple_of(inputs) {
            return Err(format!("bf16: inputs of {} values for rows of {inputs}", x.len()));
        }
        Ok(Self::packed(x, inputs, Layout::Rows, kernels))
    }

    /// The columns of `x` (`k` rows, row-major) as rows for `kernels`: the rows of `x^T`, each
    /// `k` inputs wide (a training step's `dy^T` in the weight gradient `dy^T x`).
    fn from_columns(x: &[f32], k: usize, kernels: Bf16Kernels) -> Result<Self, String> {
        if k == 0 || !x.len().is_multiple_of(k) {
            return Err(format!("bf16: {} values for columns of {k}", x.len()));
        }
        Ok(Self::packed(x, k, Layout::Columns, kernels))
    }

    /// The lines of `x` ([`pack_tiles`]' `Layout`), `inputs` wide, as `kernels` read them.
    fn packed(x: &[f32], inputs: usize, layout: Layout, kernels: Bf16Kernels) -> Self {
        let rows_layout = RowsLayout::of(kernels, inputs);
        let pairs = match rows_layout {
            RowsLayout::Tiles => {
                pack_tiles(x, inputs, layout, (TILE_ROWS, inputs.div_ceil(2)), true)
            }
            RowsLayout::Lines { steps } => pack_lines(x, inputs, layout, steps, true),
        };
        Self { inputs, rows: x.len() / inputs, layout: rows_layout, pairs }
    }

    /// The pairs of rows `r0..r0 + rows` (`r0` a multiple of [`ROW_BLOCK`]) through the end
    /// of their last whole tile.
    fn block(&self, r0: usize, rows: usize) -> &[u32] {
        let (per_row, tile) = match self.layout {
            RowsLayout::Tiles => (self.inputs.div_ceil(2), TILE_ROWS),
            RowsLayout::Lines { steps } => (steps, AMX_ROWS),
        };
        &self.pairs[r0 * per_row..(r0 + rows.next_multiple_of(tile)) * per_row]
    }
}

impl Bf16Weight {
    /// Rounds `weight` `(out, inputs)` row-major to bf16 and packs it. An error names a
    /// non-finite weight.
    pub fn new(
        weight: &[f32],
        out: usize,
        inputs: usize,
        kernels: Bf16Kernels,
    ) -> Result<Self, String> {
        if weight.iter().any(|w| !w.is_finite()) {
            return Err("bf16: the weights hold a NaN or an infinity".into());
        }
        Self::packed(weight, out, inputs, kernels)
    }

    /// [`Bf16Weight::new`] without the check for finite weights (a training step's operands,
    /// whose NaNs must reach the loss as they would in F32).
    fn packed(
        weight: &[f32],
        out: usize,
        inputs: usize,
        kernels: Bf16Kernels,
    ) -> Result<Self, String> {
        if inputs == 0 || out == 0 || weight.len() != out * inputs {
            return Err(format!(
                "bf16: {} weights for a projection of {out} x {inputs}",
                weight.len()
            ));
        }
        let steps = kernels.weight_steps(inputs);
        let packed = pack_tiles(weight, inputs, Layout::Rows, (TILE_CHANNELS, steps), true);
        Ok(Self { out, inputs, packed, kernels })
    }

    /// The weight `x^T` for `x` of `k` rows, row-major: channels are `x`'s columns, inputs its
    /// rows (a training step's `W^T` in the input gradient `dy W`, and `x^T` in the weight
    /// gradient `dy^T x`), packed without a transposed copy.
    fn from_columns(x: &[f32], k: usize, kernels: Bf16Kernels) -> Result<Self, String> {
        if k == 0 || x.is_empty() || !x.len().is_multiple_of(k) {
            return Err(format!("bf16: {} values for columns of {k}", x.len()));
        }
        let tiles = (TILE_CHANNELS, kernels.weight_steps(k));
        let packed = pack_tiles(x, k, Layout::Columns, tiles, true);
        Ok(Self { out: x.len() / k, inputs: k, packed, kernels })
    }

    /// Inputs per row.
    pub fn inputs(&self) -> usize {
        self.inputs
    }

    /// The rows of `x` (as wide as the weight's inputs) rounded and laid out for this weight's
    /// kernel, once for every projection that reads them (attention's Q, K and V).
    pub fn rows(&self, x: &[f32]) -> Result<Bf16Rows, String> {
        Bf16Rows::new(x, self.inputs, self.kernels)
    }

    /// `x W^T + b` over the rows of `x` (as wide as the weight's inputs).
    pub fn forward(&self, x: &[f32], bias: Option<&[f32]>) -> Result<Vec<f32>, String> {
        self.forward_rows(&self.rows(x)?, bias)
    }

    /// [`Bf16Weight::forward`] over rows already rounded by [`Bf16Weight::rows`] of a weight
    /// with the same inputs and kernel.
    pub fn forward_rows(&self, x: &Bf16Rows, bias: Option<&[f32]>) -> Result<Vec<f32>, String> {
        self.forward_by(x, bias, |x, rows, b, y| match self.kernels.0 {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `kernels` names an instruction this CPU has (`Bf16Kernels::detect`).
            Set::Avx512 => unsafe { x86::block(self, x, rows, b, y) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above (`detect` asked `amx::usable`).
            Set::Amx => unsafe { self.amx_block::<amx::Bf16Tiles>(x, rows, b, y) },
            #[cfg(not(target_arch = "x86_64"))]
            Set::Avx512 | Set::Amx => unreachable!("no bf16 kernels off x86-64"),
            #[cfg(test)]
            // SAFETY: the emulated instruction runs on any CPU.
            Set::Emulated => unsafe { self.simd_block::<tests::Emulated>(x, rows, b, y) },
            #[cfg(test)]
            // SAFETY: as above.
            Set::EmulatedAmx => unsafe { self.amx_block::<tests::EmulatedAmx>(x, rows, b, y) },
        })
    }

    /// [`Bf16Weight::forward_rows`] with the kernel over one block of rows given: the block's
    /// pairs (whole tiles), its number of real rows, the bias (zeros where there is none,
    /// padded with zeros to whole tiles of channels, as AMX's kernel loads it) and the block's
    /// outputs.
    fn forward_by(
        &self,
        x: &Bf16Rows,
        bias: Option<&[f32]>,
        block: impl Fn(&[u32], usize, &[f32], &mut [f32]) + Sync,
    ) -> Result<Vec<f32>, String> {
        if x.inputs != self.inputs {
            return Err(format!(
                "bf16: rows of {} inputs for a projection of {}",
                x.inputs, self.inputs
            ));
        }
        if x.layout != RowsLayout::of(self.kernels, self.inputs) {
            return Err("bf16: rows laid out for another kernel".into());
        }
        if bias.is_some_and(|b| b.len() != self.out) {
            return Err(format!("bf16: a bias for other than {} channels", self.out));
        }
        let out = self.out;
        // Padded once here, not in each block.
        let mut padded = amx::Aligned::<f32>::zeroed(out.next_multiple_of(TILE_CHANNELS));
        if let Some(bias) = bias {
            padded[..out].copy_from_slice(bias);
        }
        let bias = &padded[..];
        // The kernel writes each output of its block (every row and channel), as par_fill
        // requires; a block's pairs run to its last whole tile of rows (`Bf16Rows` pads them).
        Ok(par_fill(x.rows * out, ROW_BLOCK * out, |start, y| {
            let (r0, rows) = (start / out, y.len() / out);
            block(x.block(r0, rows), rows, bias, y)
        }))
    }

    /// The kernel's code over one block of rows, the instruction given by `L` (the CPU's, or the
    /// tests' emulation of it).
    ///
    /// # Safety
    /// The CPU runs `L`'s instructions.
    #[inline(always)]
    unsafe fn simd_block<L: Lanes>(&self, x: &[u32], rows: usize, bias: &[f32], y: &mut [f32]) {
        let steps = self.inputs.div_ceil(2);
        assert!(x.len() >= rows.div_ceil(TILE_ROWS) * TILE_ROWS * steps, "whole tiles of rows");
        for (t, w) in self.packed.chunks_exact(steps * TILE_CHANNELS).enumerate() {
            let c0 = t * TILE_CHANNELS;
            for r0 in (0..rows).step_by(TILE_ROWS) {
                let acc = tile::<L>(&x[r0 * steps..], w, steps);
                self.write_tile(&acc, (r0, c0), rows, Some(bias), y);
            }
        }
    }
}

impl Bf16Weight {
    /// AMX's kernel over one block of rows (its pairs as [`Bf16Rows`] lays them out for AMX:
    /// row by row, in whole tiles of 16 rows of 16 pairs), the tile operations given by `T`
    /// (the CPU's, or the tests' emulation): AMX's loop ([`amx::products`]) over the tiles of
    /// 32 channels (two weight tiles, 128 bytes a step), its sums starting from the bias.
    ///
    /// # Safety
    /// The CPU runs `T`'s operations; the weight was packed for AMX (`weight_steps`).
    #[inline(always)]
    unsafe fn amx_block<T: Tiles>(&self, x: &[u32], rows: usize, bias: &[f32], y: &mut [f32]) {
        // `products` stores whole tiles into `y` unchecked.
        let (channels, bias_len) = (self.out, self.out.next_multiple_of(TILE_CHANNELS));
        assert!(y.len() >= rows * channels && bias.len() >= bias_len, "the block's outputs");
        let padded = self.kernels.weight_steps(self.inputs);
        assert!(x.len() >= rows.next_multiple_of(AMX_ROWS) * padded, "whole tiles of lines");
        let tile_u32 = padded * TILE_CHANNELS;
        assert!(self.packed.len() >= self.out.div_ceil(TILE_CHANNELS) * tile_u32, "AMX packing");
        // A tile of 32 channels is two weight tiles side by side: 128 bytes a step, the second
        // 64 bytes in; the row bytes from `at` are the steps from `at / 4`.
        let w = self.packed.as_ptr().cast::<u8>();
        let weights =
            |c0: usize, j: usize, at: usize| w.add((c0 / 32 * tile_u32 + at * 8 + 16 * j) * 4);
        let x = (bytemuck::cast_slice(x), padded * 4, rows);
        // Every row's sums start from the bias (as PyTorch's addmm starts from it), so that
        // whole tiles go straight into `y`; only the part tiles (a block's last rows, and the
        // last channels where they are not a multiple of 32) pass through `write_tile`.
        let (out, len) = (y.as_mut_ptr(), y.len());
        let sums = amx::Sums { start: Some(bias.as_ptr().cast()), out: Some(out.cast()) };
        amx::products::<T, f32>(x, self.out, (weights, TILE_CHANNELS * 4), sums, |r0, c0, sums| {
            // SAFETY: `y`'s values, which `products` writes only between calls of this.
            let y = std::slice::from_raw_parts_mut(out, len);
            self.write_tile(sums, (r0, c0), rows, None, y)
        });
    }

    /// Writes one tile's sums plus the bias (none where the sums started from it):
    /// `sums[i][j]` for row `r0 + i` and channel `c0 + j`, for the rows below `rows` and the
    /// channels that exist (the shared epilogue of every kernel).
    #[inline(always)]
    fn write_tile(
        &self,
        sums: &[[f32; TILE_CHANNELS]],
        (r0, c0): (usize, usize),
        rows: usize,
        bias: Option<&[f32]>,
        y: &mut [f32],
    ) {
        let n = (self.out - c0).min(TILE_CHANNELS);
        for (i, sums) in sums.iter().enumerate().take(rows - r0) {
            let y = &mut y[(r0 + i) * self.out + c0..][..n];
            match bias {
                Some(bias) => {
                    for ((y, s), b) in y.iter_mut().zip(sums).zip(&bias[c0..c0 + n]) {
                        *y = s + b;
                    }
                }
                None => y.copy_from_slice(&sums[..n]),
            }
        }
    }
}

/// What a tile needs of the instruction set, over vectors of 16 F32 lanes.
trait Lanes {
    type V: Copy;
    /// # Safety
    /// The CPU runs the set (for each method of the trait).
    unsafe fn zero() -> Self::V;
    /// # Safety
    /// `p` points to 16 readable values.
    unsafe fn load(p: *const u32) -> Self::V;
    /// `v` in every lane.
    unsafe fn splat(v: u32) -> Self::V;
    /// `acc` plus, in each lane, the products of `x`'s and `w`'s bf16 pairs in that lane.
    unsafe fn dot(acc: Self::V, x: Self::V, w: Self::V) -> Self::V;
    /// # Safety
    /// `out` has room for 16 values.
    unsafe fn store(v: Self::V, out: *mut f32);
}

/// The sums of a tile: `acc[i][j] = Σ_p x[p][i] · w[p][j]` over `steps` steps, for one packed
/// tile of [`TILE_ROWS`] rows (each step's pairs of the tile's rows side by side, as
/// [`pack_tiles`] lays them out) and one packed tile of channels.
///
/// # Safety
/// As [`Lanes`].
#[inline(always)]
unsafe fn tile<L: Lanes>(x: &[u32], w: &[u32], steps: usize) -> [[f32; TILE_CHANNELS]; TILE_ROWS] {
    assert!(x.len() >= TILE_ROWS * steps && w.len() >= steps * TILE_CHANNELS, "a whole tile");
    let mut a = [[L::zero(); 2]; TILE_ROWS];
    let (xp, wp) = (x.as_ptr(), w.as_ptr());
    for p in 0..steps {
        let w0 = L::load(wp.add(p * TILE_CHANNELS));
        let w1 = L::load(wp.add(p * TILE_CHANNELS + 16));
        for (i, a) in a.iter_mut().enumerate() {
            let b = L::splat(*xp.add(p * TILE_ROWS + i));
            a[0] = L::dot(a[0], b, w0);
            a[1] = L::dot(a[1], b, w1);
        }
    }
    let mut acc = [[0f32; TILE_CHANNELS]; TILE_ROWS];
    for (a, out) in a.iter().zip(acc.iter_mut()) {
        L::store(a[0], out.as_mut_ptr());
        L::store(a[1], out.as_mut_ptr().add(16));
    }
    acc
}

/// One lane of `vdpbf16ps` by the manual's definition: `acc` plus the odd elements' product,
/// then plus the even elements', each sum rounded to nearest; subnormal inputs and results are
/// zero.
pub fn dot_pair(acc: f32, x: u32, w: u32) -> f32 {
    let widen = |h: u32| {
        let b = h << 16;
        f32::from_bits(if b & 0x7f80_0000 == 0 { b & 0x8000_0000 } else { b })
    };
    let flush = |v: f32| if v.is_subnormal() { 0f32.copysign(v) } else { v };
    // Each product is exact in F32 (8-bit significands), so product then sum rounds once.
    let acc = flush(flush(acc) + widen(x >> 16) * widen(w >> 16));
    flush(acc + widen(x & 0xffff) * widen(w & 0xffff))
}

/// The kernel's sums one at a time: `x W^T + b` with both operands rounded to bf16 and each
/// pair added as [`dot_pair`] adds it. What `vdpbf16ps`' kernel must equal, bit for bit (AMX's
/// loop equals the same sums in `tdpbf16ps`' order, started from the bias, on its emulation,
/// and comes within F32 rounding of these on the hardware; the module docs).
pub fn reference(weight: &[f32], inputs: usize, x: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
    reference_sums(weight, inputs, x, bias, false)
}

/// [`reference`], the sums starting from the bias when `bias_first` (AMX's kernel's order)
/// rather than the bias added to them.
fn reference_sums(
    weight: &[f32],
    inputs: usize,
    x: &[f32],
    bias: Option<&[f32]>,
    bias_first: bool,
) -> Vec<f32> {
    let steps = inputs.div_ceil(2);
    let pack = |v: &[f32]| {
        let mut p = vec![0u32; steps];
        pack_row(v, &mut p);
        p
    };
    let w: Vec<Vec<u32>> = weight.chunks_exact(inputs).map(pack).collect();
    x.chunks_exact(inputs)
        .flat_map(|x| {
            let x = pack(x);
            w.iter().enumerate().map(move |(c, w)| {
                let b = bias.map_or(0.0, |b| b[c]);
                let start = if bias_first { b } else { 0.0 };
                let dot = x.iter().zip(w).fold(start, |a, (&x, &w)| dot_pair(a, x, w));
                if bias_first {
                    dot
                } else {
                    dot + b
                }
            })
        })
        .collect()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{pack_row, Bf16Weight, Lanes};

    /// [`pack_row`] by `vcvtne2ps2bf16`, 32 values at a time (the rest by [`pack_row`]); the
    /// same pairs but for subnormal inputs, which become zeros ([`super::converts`]).
    ///
    /// # Safety
    /// The CPU has AVX-512 F and BF16.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn pack_row_converting(x: &[f32], pairs: &mut [u32]) {
        let whole = x.len() / 32;
        assert!(pairs.len() >= x.len().div_ceil(2), "room for every pair");
        for c in 0..whole {
            let lo = _mm512_loadu_ps(x.as_ptr().add(32 * c));
            let hi = _mm512_loadu_ps(x.as_ptr().add(32 * c + 16));
            _mm512_storeu_si512(pairs.as_mut_ptr().add(16 * c).cast(), round_pairs(lo, hi));
        }
        pack_row(&x[32 * whole..], &mut pairs[16 * whole..]);
    }

    /// The 32 values of `lo` then `hi` rounded to bf16 by `vcvtne2ps2bf16`, in that order
    /// (sixteen pairs of consecutive values, as [`pack_row`] pairs them).
    #[inline(always)]
    unsafe fn round_pairs(lo: __m512, hi: __m512) -> __m512i {
        // The second operand fills the low 16 words.
        // SAFETY: __m512bh and __m512i are the same 64 bytes.
        std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo))
    }

    /// The first `m` of 16 lanes (all of them from 16 on).
    #[inline(always)]
    fn first_lanes(m: usize) -> __mmask16 {
        if m >= 16 {
            0xffff
        } else {
            (1u16 << m) - 1
        }
    }

    /// The pairs of rows `2p` and `2p + 1` of `x` (`lines` columns, row-major), columns `l0..l0 +
    /// n` (`n` at most 16), for sixteen `p` from `p0` (zeros past `inputs` rows or `pairs`
    /// pairs), transposed: vector `j` holds column `l0 + j`'s pairs `p0..p0 + 16`, as
    /// [`super::pair`] makes them (`vcvtne2ps2bf16`, the same rounding: [`super::converts`]).
    #[inline(always)]
    unsafe fn column_pairs(
        x: &[f32],
        (inputs, lines): (usize, usize),
        (l0, n): (usize, usize),
        p0: usize,
    ) -> [__m512i; 16] {
        let mask = first_lanes(n);
        // Word 2j of a pair vector is even row's value j, word 2j + 1 the odd row's.
        let interleave = _mm512_set_epi16(
            31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20,
            4, 19, 3, 18, 2, 17, 1, 16, 0,
        );
        let row = |r: usize| {
            if r < inputs {
                _mm512_maskz_loadu_ps(mask, x.as_ptr().add(r * lines + l0))
            } else {
                _mm512_setzero_ps()
            }
        };
        let mut v = [_mm512_setzero_si512(); 16];
        for (k, v) in v.iter_mut().enumerate() {
            let p = p0 + k;
            if 2 * p >= inputs {
                break;
            }
            let bits = round_pairs(row(2 * p), row(2 * p + 1));
            *v = _mm512_permutexvar_epi16(interleave, bits);
        }
        transpose(&mut v);
        v
    }

    /// Transposes 16 x 16 four-byte values in place: value `j` of vector `i` becomes value `i`
    /// of vector `j`.
    #[inline(always)]
    unsafe fn transpose(r: &mut [__m512i; 16]) {
        let mut t = [_mm512_setzero_si512(); 16];
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
        }
        for i in 0..4 {
            let b = 4 * i;
            r[b] = _mm512_unpacklo_epi64(t[b], t[b + 2]);
            r[b + 1] = _mm512_unpackhi_epi64(t[b], t[b + 2]);
            r[b + 2] = _mm512_unpacklo_epi64(t[b + 1], t[b + 3]);
            r[b + 3] = _mm512_unpackhi_epi64(t[b + 1], t[b + 3]);
        }
        for h in 0..2 {
            let b = 8 * h;
            for i in 0..4 {
                t[b + i] = _mm512_shuffle_i32x4::<0x88>(r[b + i], r[b + 4 + i]);
                t[b + 4 + i] = _mm512_shuffle_i32x4::<0xdd>(r[b + i], r[b + 4 + i]);
            }
        }
        for i in 0..8 {
            r[i] = _mm512_shuffle_i32x4::<0x88>(t[i], t[8 + i]);
            r[8 + i] = _mm512_shuffle_i32x4::<0xdd>(t[i], t[8 + i]);
        }
    }

    /// [`super::tile_of`] for rows (rows `l0..l0 + n` of `x`, `inputs` wide, as a tile of
    /// `tile` lines, a multiple of 16, in `steps` steps) sixteen lines by sixteen steps at a
    /// time: each line's 32 values rounded by `vcvtne2ps2bf16` into its sixteen pairs, sixteen
    /// lines transposed in registers, each step's sixteen lines stored as one run (the portable
    /// interleave reads one pair from each line's buffer at a time: a weight's packing at every
    /// training step, about a tenth of a bf16 step). Writes every value of `out`, zeros past
    /// the rows and the pairs.
    ///
    /// # Safety
    /// The CPU has AVX-512 F, BW and BF16.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub unsafe fn rows_tile_converting(
        out: &mut [u32],
        x: &[f32],
        (inputs, tile, steps): (usize, usize, usize),
        (l0, n): (usize, usize),
    ) {
        let pairs = inputs.div_ceil(2);
        assert!(tile.is_multiple_of(16) && n <= tile && pairs <= steps);
        assert!(out.len() >= tile * steps && (l0 + n) * inputs <= x.len());
        for j0 in (0..tile).step_by(16) {
            for p0 in (0..steps).step_by(16) {
                let mut v = [_mm512_setzero_si512(); 16];
                if p0 < pairs {
                    // Values 2 p0 .. 2 p0 + 32 of each line, zeros past its end.
                    let (at, m) = (2 * p0, inputs - 2 * p0);
                    let (lo_lanes, hi_lanes) = (first_lanes(m), first_lanes(m.saturating_sub(16)));
                    for (j, v) in v.iter_mut().enumerate().take(n.saturating_sub(j0)) {
                        let line = x.as_ptr().add((l0 + j0 + j) * inputs + at);
                        let lo = _mm512_maskz_loadu_ps(lo_lanes, line);
                        let hi = _mm512_maskz_loadu_ps(hi_lanes, line.add(16));
                        *v = round_pairs(lo, hi);
                    }
                }
                transpose(&mut v);
                for (p, v) in v.iter().enumerate().take(steps - p0) {
                    _mm512_storeu_si512(out.as_mut_ptr().add((p0 + p) * tile + j0).cast(), *v);
                }
            }
        }
    }

    /// [`super::line_tile`] for `Layout::Columns` (the lines are `x`'s columns `l0..l0 + n`,
    /// `n` at most 16), sixteen pairs of each line at a time: the pairs of two rows rounded by
    /// `vcvtne2ps2bf16` and transposed in registers, so that each line's pairs are stored as
    /// one run instead of one four-byte store per pair into sixteen lines (8% of a bf16
    /// training step). `out` (16 lines of `width` pairs) must hold zeros; the lines' pairs
    /// past `inputs` stay so.
    ///
    /// # Safety
    /// The CPU has AVX-512 F, BW and BF16.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub unsafe fn columns_tile_converting(
        out: &mut [u32],
        x: &[f32],
        (inputs, width): (usize, usize),
        (l0, n): (usize, usize),
    ) {
        let (lines, pairs) = (x.len() / inputs, inputs.div_ceil(2));
        assert!(n <= 16 && l0 + n <= lines && pairs <= width && out.len() >= n * width);
        for p0 in (0..pairs).step_by(16) {
            let v = column_pairs(x, (inputs, lines), (l0, n), p0);
            let store = first_lanes(pairs - p0);
            for (j, v) in v.iter().enumerate().take(n) {
                _mm512_mask_storeu_epi32(out.as_mut_ptr().add(j * width + p0).cast(), store, *v);
            }
        }
    }

    /// `vdpbf16ps` on 512 bits.
    struct Avx512Bf16;

    impl Lanes for Avx512Bf16 {
        type V = __m512;
        #[inline(always)]
        unsafe fn zero() -> __m512 {
            _mm512_setzero_ps()
        }
        #[inline(always)]
        unsafe fn load(p: *const u32) -> __m512 {
            _mm512_castsi512_ps(_mm512_loadu_si512(p as *const _))
        }
        #[inline(always)]
        unsafe fn splat(v: u32) -> __m512 {
            _mm512_castsi512_ps(_mm512_set1_epi32(v as i32))
        }
        #[inline(always)]
        unsafe fn dot(acc: __m512, x: __m512, w: __m512) -> __m512 {
            // SAFETY: __m512 and __m512bh are the same 64 bytes.
            let bf = |v| std::mem::transmute::<__m512, __m512bh>(v);
            _mm512_dpbf16_ps(acc, bf(x), bf(w))
        }
        #[inline(always)]
        unsafe fn store(v: __m512, out: *mut f32) {
            _mm512_storeu_ps(out, v)
        }
    }

    /// # Safety
    /// The CPU has AVX-512 F and BF16.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn block(weight: &Bf16Weight, x: &[u32], rows: usize, b: &[f32], y: &mut [f32]) {
        weight.simd_block::<Avx512Bf16>(x, rows, b, y)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::testing::{kernel_values, projection_case, same_bits};

    /// `vcvtne2ps2bf16` rounds rows to the pairs [`pack_row`] makes, bit for bit: values of
    /// every magnitude, ties (to even), NaNs (quieted), infinities, zeros, values that round up
    /// to infinity, subnormals (to zeros of their sign, the largest included, which rounding
    /// would otherwise take up to 2^-126), rows that are not whole 32-value chunks. Where the
    /// CPU has AVX-512 BF16.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_conversion_instruction_packs_rows_as_pack_row_does() {
        if !converts() {
            eprintln!("skipped: this CPU has no AVX-512 BF16");
            return;
        }
        let mut x = kernel_values(1000, 7);
        let special = [
            f32::NAN,
            -f32::NAN,
            f32::from_bits(0x7f80_0001), // a signalling NaN
            f32::INFINITY,
            f32::NEG_INFINITY,
            0.0,
            -0.0,
            f32::MAX,
            f32::from_bits(0x7f7f_8000), // a tie that rounds up to infinity
            f32::from_bits(0x3f80_8000), // 1 + 2^-8: a tie to even (down)
            f32::from_bits(0x3f81_8000), // a tie to even (up)
            f32::MIN_POSITIVE,
            f32::from_bits(1),            // the smallest subnormal
            -f32::from_bits(0x0040_0000), // a subnormal
            f32::from_bits(0x007f_ffff),  // the largest subnormal
            1e30,
            -3e-30,
        ];
        for (i, v) in special.iter().enumerate() {
            x[37 * i + 3] = *v;
        }
        for len in [1000, 999, 32, 31, 64, 65] {
            let row = &x[..len];
            let mut want = vec![0u32; len.div_ceil(2)];
            let mut got = vec![0u32; len.div_ceil(2)];
            pack_row(row, &mut want);
            // SAFETY: `converts` said the CPU has AVX-512 F and BF16.
            unsafe { super::x86::pack_row_converting(row, &mut got) };
            assert_eq!(got, want, "row of {len}");
        }
        assert_eq!(to_bf16(f32::from_bits(0x807f_ffff)), 0x8000, "a subnormal's sign is kept");
    }

    /// Rows packed with and without the conversion instruction give the same buffers, padding
    /// included (zeros past each row's pairs and in the rows after the last), for AMX's lines
    /// and `vdpbf16ps`' tiles: odd widths, steps padded past the inputs, a partial last tile.
    /// Both branches run where the CPU has AVX-512 BF16; elsewhere both are the portable one.
    #[test]
    fn packing_with_and_without_the_conversion_is_the_same() {
        for (rows, inputs) in [(1, 1), (5, 63), (17, 384), (40, 70), (33, 31)] {
            let x = kernel_values(rows * inputs, rows as u64);
            let pairs = inputs.div_ceil(2);
            let width = pairs.next_multiple_of(16) + 16;
            let lines = [false, true].map(|c| pack_lines(&x, inputs, Layout::Rows, width, c));
            assert_eq!(&lines[0][..], &lines[1][..], "lines of {rows} x {inputs}");
            for (r, line) in lines[1].chunks_exact(width).enumerate() {
                let real = if r < rows { pairs } else { 0 };
                assert!(line[real..].iter().all(|&p| p == 0), "padding of line {r}");
            }
            let steps = pairs + 3;
            let tiles =
                [false, true].map(|c| pack_tiles(&x, inputs, Layout::Rows, (TILE_ROWS, steps), c));
            assert_eq!(&tiles[0][..], &tiles[1][..], "tiles of {rows} x {inputs}");
            // Weight tiles of 32 lines, which the conversion packs sixteen lines by sixteen
            // steps through a transpose in registers: step p of tile t holds line t * 32 + j's
            // pair p at j, zeros past the lines and the pairs.
            let tiles = [false, true]
                .map(|c| pack_tiles(&x, inputs, Layout::Rows, (TILE_CHANNELS, steps), c));
            assert_eq!(&tiles[0][..], &tiles[1][..], "weight tiles of {rows} x {inputs}");
            for (t, tile) in tiles[1].chunks_exact(TILE_CHANNELS * steps).enumerate() {
                for (p, step) in tile.chunks_exact(TILE_CHANNELS).enumerate() {
                    for (j, &v) in step.iter().enumerate() {
                        let r = t * TILE_CHANNELS + j;
                        let at =
                            |i: usize| if r < rows && i < inputs { x[r * inputs + i] } else { 0.0 };
                        let want = if p < pairs { pair(at(2 * p), at(2 * p + 1)) } else { 0 };
                        assert_eq!(v, want, "{rows} x {inputs}: tile {t}, step {p}, line {j}");
                    }
                }
            }
        }
        // Columns as lines (a training step's transposed operands), which the conversion
        // packs sixteen pairs at a time through a transpose in registers: `k` rows of `cols`,
        // odd `k` (a last pair without its odd row), columns not a multiple of 16, more than
        // sixteen pairs, and values the rounding treats apart.
        let specials = [f32::NAN, -0.0, 1e-40, -1e-40, f32::INFINITY, 1.0 + 2f32.powi(-8), 3.4e38];
        for (k, cols) in [(1, 1), (5, 63), (33, 17), (40, 70), (384, 40), (3, 16)] {
            let mut x = kernel_values(k * cols, (k * cols) as u64);
            for (i, v) in specials.iter().enumerate() {
                if let Some(x) = x.get_mut(i * 7) {
                    *x = *v;
                }
            }
            let pairs = k.div_ceil(2);
            let width = pairs.next_multiple_of(16) + 16;
            let lines = [false, true].map(|c| pack_lines(&x, k, Layout::Columns, width, c));
            let same = lines[0].iter().zip(&lines[1][..]).all(|(a, b)| a == b);
            assert!(same && lines[0].len() == lines[1].len(), "columns of {k} x {cols}");
            for (j, line) in lines[1].chunks_exact(width).enumerate() {
                let real = if j < cols { pairs } else { 0 };
                assert!(line[real..].iter().all(|&p| p == 0), "padding of column {j}");
                if j < cols {
                    // Pair p of column j: rows 2p and 2p + 1.
                    let at = |r: usize| if r < k { x[r * cols + j] } else { 0.0 };
                    assert!((0..pairs).all(|p| line[p] == pair(at(2 * p), at(2 * p + 1))));
                }
            }
            // The same columns as weight tiles: step p of tile t holds column t * 32 + j's
            // pair p at j, zeros past the columns and the pairs.
            let steps = pairs + 5;
            let tiles = [false, true]
                .map(|c| pack_tiles(&x, k, Layout::Columns, (TILE_CHANNELS, steps), c));
            assert_eq!(&tiles[0][..], &tiles[1][..], "column tiles of {k} x {cols}");
            assert_eq!(tiles[0].len(), cols.div_ceil(TILE_CHANNELS) * TILE_CHANNELS * steps);
            for (t, tile) in tiles[1].chunks_exact(TILE_CHANNELS * steps).enumerate() {
                for (p, step) in tile.chunks_exact(TILE_CHANNELS).enumerate() {
                    for (j, &v) in step.iter().enumerate() {
                        let c = t * TILE_CHANNELS + j;
                        let at = |r: usize| if r < k && c < cols { x[r * cols + c] } else { 0.0 };
                        let want = if p < pairs { pair(at(2 * p), at(2 * p + 1)) } else { 0 };
                        assert_eq!(v, want, "{k} x {cols}: tile {t}, step {p}, column {j}");
                    }
                }
            }
        }
    }

    /// The tests' stand-in for `vdpbf16ps`, lane by lane from [`dot_pair`].
    pub(super) struct Emulated;

    impl Lanes for Emulated {
        type V = [u32; 16];
        unsafe fn zero() -> Self::V {
            [0; 16]
        }
        unsafe fn load(p: *const u32) -> Self::V {
            std::ptr::read_unaligned(p as *const Self::V)
        }
        unsafe fn splat(v: u32) -> Self::V {
            [v; 16]
        }
        unsafe fn dot(acc: Self::V, x: Self::V, w: Self::V) -> Self::V {
            std::array::from_fn(|i| dot_pair(f32::from_bits(acc[i]), x[i], w[i]).to_bits())
        }
        unsafe fn store(v: Self::V, out: *mut f32) {
            for (i, v) in v.iter().enumerate() {
                *out.add(i) = f32::from_bits(*v);
            }
        }
    }

    /// `tdpbf16ps` from Intel's pseudocode: for each step, the even elements' product, then
    /// the odd ones', each sum rounded to nearest; subnormal inputs and results are zero.
    pub(super) struct Tdpbf16ps;
    pub(super) type EmulatedAmx = tevatron_ir::amx::emulation::Emulated<Tdpbf16ps>;

    /// One sum of `tdpbf16ps` by its definition (the pseudocode's order, even element first).
    fn dot_pair_even_first(acc: f32, x: u32, w: u32) -> f32 {
        let swap = |v: u32| v.rotate_left(16);
        dot_pair(acc, swap(x), swap(w))
    }

    impl tevatron_ir::amx::emulation::EmulatedProduct for Tdpbf16ps {
        fn step(sum: [u8; 4], x: [u8; 4], w: [u8; 4]) -> [u8; 4] {
            let (x, w) = (u32::from_le_bytes(x), u32::from_le_bytes(w));
            dot_pair_even_first(f32::from_le_bytes(sum), x, w).to_le_bytes()
        }
    }

    /// [`reference`] with the pairs added as `tdpbf16ps`' definition adds them, from the bias:
    /// what the AMX loop on the emulated instruction must equal, bit for bit.
    fn reference_even_first(
        weight: &[f32],
        inputs: usize,
        x: &[f32],
        bias: Option<&[f32]>,
    ) -> Vec<f32> {
        let swap_pairs = |v: &[f32]| -> Vec<f32> {
            let mut v = v.to_vec();
            v.resize(inputs.next_multiple_of(2), 0.0);
            v.chunks_exact(2).flat_map(|p| [p[1], p[0]]).collect()
        };
        let padded = inputs.next_multiple_of(2);
        let w: Vec<f32> = weight.chunks_exact(inputs).flat_map(swap_pairs).collect();
        let x: Vec<f32> = x.chunks_exact(inputs).flat_map(swap_pairs).collect();
        super::reference_sums(&w, padded, &x, bias, true)
    }

    /// Whether `got` is `want` (the reference's sums, on the same rounded operands) up to the
    /// order and rounding of the F32 sums: within `(2 steps + 2) 2^-23` of the sum of the
    /// products' and the bias' magnitudes (each of the `2 steps + 1` additions of one order,
    /// the bias first or last, rounds by at most 2^-24 of that sum, so two orders differ by at
    /// most twice that), and an ulp of the result. A layout or tile mistake costs whole
    /// products, far more.
    fn within_sum_rounding(got: &[f32], want: &[f32], (w, inputs, x, bias): Operands) -> bool {
        let abs = |v: &[f32]| v.iter().map(|v| v.abs()).collect::<Vec<_>>();
        let magnitude = reference(&abs(w), inputs, &abs(x), bias.map(abs).as_deref());
        let scale = (2 * inputs.div_ceil(2) + 2) as f32 * 2f32.powi(-23);
        got.len() == want.len()
            && got.iter().zip(want).zip(&magnitude).all(|((g, e), m)| {
                (g - e).abs() <= scale * m + 2f32.powi(-23) * e.abs() + f32::MIN_POSITIVE
                    || g.is_nan() && e.is_nan()
            })
    }

    /// A product's operands: the weight, its inputs, the rows and the bias.
    type Operands<'a> = (&'a [f32], usize, &'a [f32], Option<&'a [f32]>);

    /// Checks `got` against `want` as `kernels` promise: the reference's bits, or for AMX's
    /// hardware within the rounding of its sums.
    fn matches(kernels: Bf16Kernels, got: &[f32], want: &[f32], operands: Operands) -> bool {
        match kernels.0 {
            Set::Amx => within_sum_rounding(got, want, operands),
            _ => same_bits(got, want),
        }
    }

    fn emulated_forward(
        w: &[f32],
        out: usize,
        inputs: usize,
        x: &[f32],
        bias: Option<&[f32]>,
    ) -> Vec<f32> {
        let q = Bf16Weight::new(w, out, inputs, Bf16Kernels::emulated()).unwrap();
        q.forward(x, bias).unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// The kernel's code gives the reference's bits, on the emulated instruction on any CPU
        /// and on this CPU's own where it has one; shapes cover partial tiles, odd inputs, a
        /// zero row, and rows of one block and of several.
        #[test]
        fn the_kernel_gives_the_reference_bits(
            rows in 0usize..110,
            inputs in 1usize..70,
            out in 1usize..70,
            seed in any::<u64>(),
            with_bias in any::<bool>(),
        ) {
            let (w, x, b) = projection_case(rows, inputs, out, seed);
            let bias = with_bias.then_some(&b[..]);
            let want = reference(&w, inputs, &x, bias);
            let same = |got: &[f32]| same_bits(got, &want);
            prop_assert!(same(&emulated_forward(&w, out, inputs, &x, bias)), "emulated kernel");
            let amx = Bf16Weight::new(&w, out, inputs, Bf16Kernels::emulated_amx()).unwrap();
            let want_amx = reference_even_first(&w, inputs, &x, bias);
            prop_assert!(
                same_bits(&amx.forward(&x, bias).unwrap(), &want_amx),
                "AMX's loop on emulated tdpbf16ps"
            );
            for k in Bf16Kernels::available() {
                let got = Bf16Weight::new(&w, out, inputs, k).unwrap().forward(&x, bias).unwrap();
                // The kernel's code passed on the emulation just above, so a difference here is
                // this CPU's instruction computing otherwise than the manual defines it (for
                // AMX, beyond the rounding of its sums).
                prop_assert!(
                    matches(k, &got, &want, (&w, inputs, &x, bias)),
                    "this CPU's {} differs from Intel's definition: largest difference {}",
                    k.name(),
                    crate::testing::max_abs_diff_of(&got, &want)
                );
            }
        }
    }

    /// `x` `(rows, cols)` row-major, transposed.
    fn transpose(x: &[f32], cols: usize) -> Vec<f32> {
        let rows = x.len() / cols;
        (0..cols).flat_map(|c| (0..rows).map(move |r| x[r * cols + c])).collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// A training step's three products (forward, input gradient, weight gradient) give
        /// the reference's bits of the same products over explicitly transposed operands,
        /// however many rows (odd counts pair the last with a zero) and channels.
        #[test]
        fn the_training_products_give_the_reference_bits(
            rows in 1usize..75,
            inputs in 1usize..40,
            out in 1usize..100,
            seed in any::<u64>(),
        ) {
            let (w, x, b) = projection_case(rows, inputs, out, seed);
            let dy = kernel_values(rows * out, seed ^ 1);
            let mut kernels = vec![Bf16Kernels::emulated(), Bf16Kernels::emulated_amx()];
            kernels.extend(Bf16Kernels::available());
            let (wt, xt, dyt) = (transpose(&w, inputs), transpose(&x, inputs), transpose(&dy, out));
            for k in kernels {
                // The reference each kernel must give: its order of the pairs' sums.
                let reference = |w: &[f32], inputs: usize, x: &[f32], b: Option<&[f32]>| {
                    if k == Bf16Kernels::emulated_amx() {
                        reference_even_first(w, inputs, x, b)
                    } else {
                        reference(w, inputs, x, b)
                    }
                };
                let y = k.linear(&x, &w, (out, inputs), Some(&b)).unwrap();
                let want = reference(&w, inputs, &x, Some(&b));
                prop_assert!(matches(k, &y, &want, (&w, inputs, &x, Some(&b))), "{}: forward", k.name());
                let dx = k.linear_input_grad(&dy, &w, out).unwrap();
                let want_dx = reference(&wt, out, &dy, None);
                prop_assert!(matches(k, &dx, &want_dx, (&wt, out, &dy, None)), "{}: input gradient", k.name());
                // A frozen weight packed once gives the same two products.
                let frozen = k.frozen(&w, (out, inputs)).unwrap();
                prop_assert!(same_bits(&frozen.forward(&x, Some(&b)).unwrap(), &y), "frozen forward");
                prop_assert!(same_bits(&frozen.input_grad(&dy).unwrap(), &dx), "frozen dx");
                let dw = k.linear_weight_grad(&dy, &x, rows).unwrap();
                let want = reference(&xt, rows, &dyt, None);
                prop_assert!(matches(k, &dw, &want, (&xt, rows, &dyt, None)), "{}: weight gradient", k.name());
            }
        }
    }

    /// The row packing's pairs (`pair_bits`, on u64 lanes) are [`pair`]'s, on ties, NaNs of
    /// either sign, infinities, the largest F32 and the values around them.
    #[test]
    fn paired_bits_are_the_rounded_pair() {
        let edges = [
            0.0,
            -0.0,
            1.0,
            1.0 + 1.0 / 256.0,
            1.0 + 3.0 / 256.0,
            -(1.0 + 1.0 / 256.0),
            f32::MAX,
            -f32::MAX,
            f32::MIN_POSITIVE,
            f32::from_bits(1),
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            f32::from_bits(0x7f80_0001),
            f32::from_bits(0xffff_ffff),
        ];
        let values: Vec<f32> = edges.into_iter().chain(kernel_values(200, 5)).collect();
        for &a in &values {
            for &b in &values {
                let bits = u64::from(a.to_bits()) | (u64::from(b.to_bits()) << 32);
                assert_eq!(pair_bits(bits), pair(a, b), "{a:e} {b:e}");
            }
        }
    }

    /// The rounding is to nearest, ties to even, and keeps NaN and infinities; the reference is
    /// near the F32 product (each operand within a relative 2^-9).
    #[test]
    fn rounding_and_the_reference_near_f32() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to the even 1.
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: to the even 1 + 2^-6.
        assert_eq!(to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0 + 1.0 / 65536.0), 0x3f81);
        assert_eq!(to_bf16(-2.0), 0xc000);
        assert_eq!(to_bf16(f32::INFINITY), 0x7f80);
        assert!(f32::from_bits(u32::from(to_bf16(f32::NAN)) << 16).is_nan());
        assert!(f32::from_bits(u32::from(to_bf16(-f32::NAN)) << 16).is_nan());
        // f32::MAX rounds up past bf16's largest finite value.
        assert_eq!(to_bf16(f32::MAX), 0x7f80);

        let (rows, inputs, out) = (13, 37, 21);
        let w = kernel_values(out * inputs, 7);
        let x = kernel_values(rows * inputs, 8);
        let got = reference(&w, inputs, &x, None);
        for r in 0..rows {
            for c in 0..out {
                let (x, w) = (&x[r * inputs..][..inputs], &w[c * inputs..][..inputs]);
                let exact: f64 = x.iter().zip(w).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum();
                let bound: f64 = x
                    .iter()
                    .zip(w)
                    .map(|(&a, &b)| (f64::from(a) * f64::from(b)).abs())
                    .sum::<f64>()
                    * (2.0 * 2f64.powi(-8) + 1e-6);
                let g = f64::from(got[r * out + c]);
                assert!((g - exact).abs() <= bound, "{r},{c}: {g} vs {exact} > {bound}");
            }
        }
    }

    #[test]
    fn a_row_with_a_nan_gives_nans_there_and_bad_weights_are_refused() {
        let (inputs, out) = (9, 5);
        let w = kernel_values(out * inputs, 3);
        let mut x = kernel_values(3 * inputs, 4);
        x[inputs + 2] = f32::NAN;
        let want = reference(&w, inputs, &x, None);
        for (r, row) in want.chunks(out).enumerate() {
            assert!(row.iter().all(|v| v.is_nan() == (r == 1)), "row {r}");
        }
        let got = emulated_forward(&w, out, inputs, &x, None);
        assert!(got
            .iter()
            .zip(&want)
            .all(|(a, b)| a.to_bits() == b.to_bits() || a.is_nan() && b.is_nan()));
        let amx = Bf16Weight::new(&w, out, inputs, Bf16Kernels::emulated_amx()).unwrap();
        for (r, row) in amx.forward(&x, None).unwrap().chunks(out).enumerate() {
            assert!(row.iter().all(|v| v.is_nan() == (r == 1)), "AMX's loop, row {r}");
        }
        let mut bad = w.clone();
        bad[4] = f32::INFINITY;
        assert!(Bf16Weight::new(&bad, out, inputs, Bf16Kernels::emulated()).is_err());
        assert!(Bf16Weight::new(&w, out, inputs + 1, Bf16Kernels::emulated()).is_err());
        assert!(Bf16Weight::new(&[], 0, inputs, Bf16Kernels::emulated()).is_err());
        let q = Bf16Weight::new(&w, out, inputs, Bf16Kernels::emulated()).unwrap();
        assert!(q.forward_rows(&q.rows(&x[..2 * inputs]).unwrap(), Some(&[0.0])).is_err());
        assert!(q.rows(&x[..inputs + 1]).is_err());
        // Rows are laid out for one kernel: AMX's lines are refused by vdpbf16ps' and back.
        assert!(q.forward_rows(&q.rows(&x).unwrap(), None).is_ok());
        assert!(q.forward_rows(&amx.rows(&x).unwrap(), None).is_err());
        assert!(amx.forward_rows(&q.rows(&x).unwrap(), None).is_err());
    }
}
