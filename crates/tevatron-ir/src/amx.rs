//! Intel AMX (Advanced Matrix Extensions, Xeon from Sapphire Rapids) for the int8 and bf16
//! products on the CPU: whether this process may use the tiles, and the tile operations their
//! kernels share (the model's int8 and bf16 projections, `tdpbssd` and `tdpbf16ps`, and the
//! int8 scan of compact search, [`crate::quantize`]). It lives in this crate, the lowest one,
//! so that search and the model share one home for it.
//!
//! The kernels see eight fixed tiles of 16 rows x 64 bytes: sums `C(i, j)` (i, j in 0..2) in
//! tmm `2i + j`, rows `A(i)` in tmm `4 + i`, weights `B(j)` in tmm `6 + j`; one product
//! instruction adds `A(i) B(j)` into `C(i, j)`. No other code of this program uses the tile
//! registers, so they hold from one operation to the next.
//!
//! The loop the kernels share ([`products`]) is written over the [`Tiles`] trait, so that the
//! tests run it on an emulation of the operations ([`emulation::Emulated`]) on any CPU.
//!
//! Each call of [`products`] configures the tiles and releases them at its end, so no tile
//! state outlives a call on a worker thread. (candle's own AMX code, for quantized GGUF
//! weights, configures a thread's tiles once and remembers it; no path of this program runs
//! it, and mixing the two on one thread would need that remembered state cleared.)

use rayon::prelude::*;

/// A buffer of `T` whose first element starts a cache line (64 bytes), for the operands
/// AMX's tile loads read: a tile row of 64 bytes that straddles two lines made the bf16
/// products 1.5-1.9x slower on a Xeon (Emerald Rapids) than the same loads aligned.
pub struct Aligned<T> {
    lines: Vec<Line>,
    len: usize,
    _values: std::marker::PhantomData<T>,
}

/// One cache line of a [`Aligned`] buffer.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line([u8; 64]);

impl<T: bytemuck::Pod> Aligned<T> {
    /// `len` zeros.
    pub fn zeroed(len: usize) -> Self {
        const { assert!(std::mem::align_of::<T>() <= 64) };
        let bytes = len.checked_mul(std::mem::size_of::<T>()).expect("a buffer that fits memory");
        let n = bytes.div_ceil(64);
        let lines = if n == 0 {
            Vec::new()
        } else {
            // Zeroed by the allocator: for 64-byte alignment std's system allocator cannot take
            // calloc's zeroed pages and writes the zeros itself, a pass over the buffer
            // ([`Aligned::filled`] skips it where every value is written anyway).
            let layout = std::alloc::Layout::array::<Line>(n).expect("a buffer that fits memory");
            // SAFETY: `layout` is not empty; zero bytes are a valid `Line`; a `Vec` of `n` lines
            // allocates with this same layout, so it may own and free the allocation.
            unsafe {
                let p = std::alloc::alloc_zeroed(layout).cast::<Line>();
                if p.is_null() {
                    std::alloc::handle_alloc_error(layout);
                }
                Vec::from_raw_parts(p, n, n)
            }
        };
        Self { lines, len, _values: std::marker::PhantomData }
    }
}

impl<T: bytemuck::Pod + Send> Aligned<T> {
    /// `len` values written by `fill`, which is given the buffer in parallel chunks of
    /// `per_task` values (the last may be shorter; `fill(i, chunk)` for chunk `i`). The memory
    /// is not zeroed first: for operands rounded from activations, which a kernel then reads at
    /// once, zeroing a buffer of megabytes ([`Aligned::zeroed`]'s pass) was 4% of `encode
    /// --bf16`'s samples on an AMX Xeon.
    ///
    /// # Safety
    /// `fill` writes every value of its chunk before reading any: the chunk is uninitialised
    /// memory until then.
    pub unsafe fn filled(
        len: usize,
        per_task: usize,
        fill: impl Fn(usize, &mut [T]) + Sync,
    ) -> Self {
        const { assert!(std::mem::align_of::<T>() <= 64) };
        let bytes = len.checked_mul(std::mem::size_of::<T>()).expect("a buffer that fits memory");
        let n = bytes.div_ceil(64);
        let mut lines: Vec<Line> = Vec::with_capacity(n);
        let spare = lines.spare_capacity_mut().as_mut_ptr().cast::<T>();
        // SAFETY: the spare capacity holds `n` lines, at least `len` values' bytes, aligned for
        // `T`; `fill` writes each value before any read of it (the caller's contract), so no
        // uninitialised value is ever observed. The bytes past `len` in the last line are never
        // read as values; they are set below.
        let values = unsafe { std::slice::from_raw_parts_mut(spare, len) };
        values.par_chunks_mut(per_task.max(1)).enumerate().for_each(|(i, c)| fill(i, c));
        if n > 0 {
            let tail = n * 64 - bytes;
            // SAFETY: the last line's bytes past the values, within the capacity.
            unsafe { std::ptr::write_bytes(spare.cast::<u8>().add(bytes), 0, tail) };
        }
        // SAFETY: every byte of the `n` lines was written (the values by `fill`, the rest
        // just above).
        unsafe { lines.set_len(n) };
        Self { lines, len, _values: std::marker::PhantomData }
    }
}

impl<T: bytemuck::Pod> std::ops::Deref for Aligned<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: the lines hold at least `len` values' bytes, aligned for `T` (64 bytes at
        // least as strict), and any bytes are a valid `T` (`Pod`).
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast(), self.len) }
    }
}

impl<T: bytemuck::Pod> std::ops::DerefMut for Aligned<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in `deref`, and `&mut self` borrows the lines uniquely.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast(), self.len) }
    }
}

/// Which AMX product a kernel needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Product {
    /// `tdpbssd`: signed bytes, i32 sums (AMX-INT8).
    Int8,
    /// `tdpbf16ps`: bf16 pairs, F32 sums (AMX-BF16).
    Bf16,
}

/// Whether this CPU has AMX tiles with `product` and the operating system lets this process
/// use them: on Linux a process asks once for the tiles' state
/// (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`), without which its first tile
/// instruction faults. Asked once per process; the answer holds for all its threads.
pub fn usable(product: Product) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static GRANTED: OnceLock<bool> = OnceLock::new();
        let leaf = std::arch::x86_64::__cpuid_count(7, 0);
        let bit = |b: u32| (leaf.edx >> b) & 1 == 1;
        let has = bit(24)
            && match product {
                Product::Int8 => bit(25),
                Product::Bf16 => bit(22),
            };
        has && *GRANTED.get_or_init(tile_state_granted)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = product;
        false
    }
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn tile_state_granted() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a request about this process's own state; it changes nothing else.
    unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
}

#[cfg(all(target_arch = "x86_64", not(target_os = "linux")))]
fn tile_state_granted() -> bool {
    false
}

/// The tile operations of an AMX kernel, on the fixed tiles of the module docs.
pub trait Tiles {
    /// Sets every tile to 16 rows of 64 bytes and zeroes them (`ldtilecfg`), before any other
    /// operation of a kernel call on this thread.
    /// # Safety
    /// The CPU runs the operations and [`usable`] said so (for each method of the trait).
    unsafe fn configure();
    /// Frees the tiles (`tilerelease`), at the end of a kernel call.
    /// # Safety
    /// The tiles are configured on this thread ([`Tiles::configure`]).
    unsafe fn release();
    /// Every `C(i, j)` to zero.
    /// # Safety
    /// The tiles are configured on this thread ([`Tiles::configure`]).
    unsafe fn zero_sums();
    /// `C(i, j)` from 16 rows of 16 four-byte sums, `stride` bytes apart (0: one row for all
    /// 16), at `p`.
    /// # Safety
    /// The 16 rows are readable.
    unsafe fn load_sums(i: usize, j: usize, p: *const u8, stride: usize);
    /// `A(i)` from 16 rows of 64 bytes, `stride` bytes apart, at `p`.
    /// # Safety
    /// The 16 rows are readable.
    unsafe fn load_rows(i: usize, p: *const u8, stride: usize);
    /// `B(j)` from 16 rows of 64 bytes (16 steps of 4 bytes of input, for 16 channels side by
    /// side), `stride` bytes apart, at `p`.
    /// # Safety
    /// The 16 rows are readable.
    unsafe fn load_weights(j: usize, p: *const u8, stride: usize);
    /// `C(i, j) += A(i) B(j)`: for each row `m` and channel `n`, over the 16 steps `s`, the
    /// products of `A[m]`'s and `B[s]`'s elements in step `s` (four bytes of `A[m]` at `4s`,
    /// four of `B[s]` at `4n`) added to the 32-bit sum `C[m][n]`.
    /// # Safety
    /// The tiles are configured on this thread ([`Tiles::configure`]).
    unsafe fn dot(i: usize, j: usize);
    /// `C(i, j)` to 16 rows of 16 four-byte sums at `p`, `stride` bytes apart.
    /// # Safety
    /// The 16 rows are writable.
    unsafe fn store(i: usize, j: usize, p: *mut u8, stride: usize);
}

/// Where [`products`] starts its sums and where it puts whole tiles of them (both optional: the
/// int8 kernel starts from zero and scales every sum in its epilogue; the bf16 kernel starts
/// from the bias and stores whole tiles straight into its outputs, with no epilogue).
pub struct Sums {
    /// One four-byte value per channel (up to a whole 32), from which every row's sums for
    /// that channel start (`None`: zeros).
    pub start: Option<*const u8>,
    /// Rows of `channels` sums, row `r` at `r * channels`, into which a group of rows is stored
    /// straight when its row tiles are whole (16 real rows each) and its 32 channels real.
    pub out: Option<*mut u8>,
}

/// AMX's loop over one block of rows: for each 32 channels (`c0` = 0, 32, ... below
/// `channels`) and each group of up to 32 of the `rows` rows, the products of the rows' tiles
/// and the two weight tiles over every 64 bytes of a row, summed in four tiles from
/// `sums.start`, then stored into `sums.out` where that may take the group, otherwise handed to
/// `write(r0, c0, sums)`: `sums[i][j]` for row `r0 + i` and channel `c0 + j`, four-byte sums
/// (`S`, i32 or F32 as the product makes them). Only the rows below `min(rows - r0, 32)` of
/// `sums` are the group's real rows (those after them hold sums of padding rows or an earlier
/// group's).
///
/// `x` holds the rows row-major, `width` bytes each (a multiple of 64), padded with zeros to a
/// whole tile of 16 rows; `weights(c0, j, at)` points to weight tile `j` (channels `c0 + 16j`
/// to `c0 + 16j + 15`) for the row bytes from `at`: 16 rows of 64 bytes, `weight_stride` apart.
///
/// # Safety
/// The CPU runs `T`'s operations ([`usable`] said so); every pointer `weights` gives for
/// `c0 < channels`, `j < 2` and `at < width` has its 16 rows readable; `sums.start` has
/// `channels.next_multiple_of(32)` readable values and `sums.out` `rows * channels` writable
/// ones, which nothing but `write` reads or writes during the call (and `write` only while it
/// runs, between the tile stores).
#[inline(always)]
pub unsafe fn products<T: Tiles, S: Copy + Default>(
    (x, width, rows): (&[u8], usize, usize),
    channels: usize,
    (weights, weight_stride): (impl Fn(usize, usize, usize) -> *const u8, usize),
    Sums { start, out }: Sums,
    mut write: impl FnMut(usize, usize, &[[S; 32]; 32]),
) {
    const { assert!(std::mem::size_of::<S>() == 4, "four-byte sums") };
    assert!(width.is_multiple_of(64) && x.len() >= rows.next_multiple_of(16) * width);
    let mut sums = [[S::default(); 32]; 32];
    T::configure();
    for c0 in (0..channels).step_by(32) {
        for r0 in (0..rows).step_by(32) {
            let row_tiles = (rows - r0).min(32).div_ceil(16);
            match start {
                Some(start) => {
                    for (i, j) in (0..row_tiles).flat_map(|i| [(i, 0), (i, 1)]) {
                        T::load_sums(i, j, start.add((c0 + 16 * j) * 4), 0);
                    }
                }
                None => T::zero_sums(),
            }
            for at in (0..width).step_by(64) {
                T::load_weights(0, weights(c0, 0, at), weight_stride);
                T::load_weights(1, weights(c0, 1, at), weight_stride);
                for i in 0..row_tiles {
                    T::load_rows(i, x.as_ptr().add((r0 + 16 * i) * width + at), width);
                    T::dot(i, 0);
                    T::dot(i, 1);
                }
            }
            let whole = rows - r0 >= 16 * row_tiles && c0 + 32 <= channels;
            if let (Some(out), true) = (out, whole) {
                for (i, j) in (0..row_tiles).flat_map(|i| [(i, 0), (i, 1)]) {
                    let at = out.add(((r0 + 16 * i) * channels + c0 + 16 * j) * 4);
                    T::store(i, j, at, channels * 4);
                }
                continue;
            }
            for i in 0..row_tiles {
                for j in 0..2 {
                    let at = sums.as_mut_ptr().cast::<S>().add(16 * i * 32 + 16 * j);
                    T::store(i, j, at.cast(), 32 * 4);
                }
            }
            write(r0, c0, &sums);
        }
    }
    T::release();
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::asm;

    /// The configuration `ldtilecfg` reads: palette 1, tiles 0 to 7 of 16 rows x 64 bytes.
    #[repr(C, align(64))]
    struct TileConfig([u8; 64]);

    static TILE_CONFIG: TileConfig = {
        let mut c = [0u8; 64];
        c[0] = 1;
        let mut t = 0;
        while t < 8 {
            c[16 + 2 * t] = 64; // bytes per row (little-endian u16)
            c[48 + t] = 16; // rows
            t += 1;
        }
        TileConfig(c)
    };

    /// One instruction for each of two tiles named by `$index` (0 or 1).
    macro_rules! by_tile {
        ($index:expr, $first:literal, $second:literal, $($operands:tt)*) => {
            if $index == 0 {
                asm!($first, $($operands)*)
            } else {
                asm!($second, $($operands)*)
            }
        };
    }

    /// One instruction for each of the four sum tiles `C(i, j)` (tmm `2i + j`), named by
    /// `($i, $j)`.
    macro_rules! by_sum_tile {
        (($i:expr, $j:expr), [$c00:literal, $c01:literal, $c10:literal, $c11:literal], $($operands:tt)*) => {
            match ($i, $j) {
                (0, 0) => asm!($c00, $($operands)*),
                (0, _) => asm!($c01, $($operands)*),
                (_, 0) => asm!($c10, $($operands)*),
                _ => asm!($c11, $($operands)*),
            }
        };
    }

    /// A [`Tiles`](super::Tiles) implementation on the CPU's tiles with `$product` as its
    /// product instruction.
    macro_rules! tiles {
        ($(#[$doc:meta])* $name:ident, $product:literal) => {
            $(#[$doc])*
            pub struct $name;

            impl super::Tiles for $name {
                #[inline(always)]
                unsafe fn configure() {
                    asm!("ldtilecfg [{0}]", in(reg) TILE_CONFIG.0.as_ptr(), options(nostack, readonly));
                }
                #[inline(always)]
                unsafe fn release() {
                    asm!("tilerelease", options(nostack, nomem));
                }
                #[inline(always)]
                unsafe fn zero_sums() {
                    asm!(
                        "tilezero tmm0",
                        "tilezero tmm1",
                        "tilezero tmm2",
                        "tilezero tmm3",
                        options(nostack, nomem)
                    );
                }
                #[inline(always)]
                unsafe fn load_sums(i: usize, j: usize, p: *const u8, stride: usize) {
                    by_sum_tile!(
                        (i, j),
                        [
                            "tileloadd tmm0, [{p} + {s}*1]",
                            "tileloadd tmm1, [{p} + {s}*1]",
                            "tileloadd tmm2, [{p} + {s}*1]",
                            "tileloadd tmm3, [{p} + {s}*1]"
                        ],
                        p = in(reg) p,
                        s = in(reg) stride,
                        options(nostack, readonly)
                    );
                }
                #[inline(always)]
                unsafe fn load_rows(i: usize, p: *const u8, stride: usize) {
                    by_tile!(
                        i,
                        "tileloadd tmm4, [{p} + {s}*1]",
                        "tileloadd tmm5, [{p} + {s}*1]",
                        p = in(reg) p,
                        s = in(reg) stride,
                        options(nostack, readonly)
                    );
                }
                #[inline(always)]
                unsafe fn load_weights(j: usize, p: *const u8, stride: usize) {
                    by_tile!(
                        j,
                        "tileloadd tmm6, [{p} + {s}*1]",
                        "tileloadd tmm7, [{p} + {s}*1]",
                        p = in(reg) p,
                        s = in(reg) stride,
                        options(nostack, readonly)
                    );
                }
                #[inline(always)]
                unsafe fn dot(i: usize, j: usize) {
                    match (i, j) {
                        (0, 0) => asm!(concat!($product, " tmm0, tmm4, tmm6"), options(nostack, nomem)),
                        (0, _) => asm!(concat!($product, " tmm1, tmm4, tmm7"), options(nostack, nomem)),
                        (_, 0) => asm!(concat!($product, " tmm2, tmm5, tmm6"), options(nostack, nomem)),
                        _ => asm!(concat!($product, " tmm3, tmm5, tmm7"), options(nostack, nomem)),
                    }
                }
                #[inline(always)]
                unsafe fn store(i: usize, j: usize, p: *mut u8, stride: usize) {
                    by_sum_tile!(
                        (i, j),
                        [
                            "tilestored [{p} + {s}*1], tmm0",
                            "tilestored [{p} + {s}*1], tmm1",
                            "tilestored [{p} + {s}*1], tmm2",
                            "tilestored [{p} + {s}*1], tmm3"
                        ],
                        p = in(reg) p,
                        s = in(reg) stride,
                        options(nostack)
                    );
                }
            }
        };
    }

    tiles!(
        /// The tiles with `tdpbssd` (signed bytes, i32 sums).
        Int8Tiles,
        "tdpbssd"
    );
    tiles!(
        /// The tiles with `tdpbf16ps` (bf16 pairs, F32 sums).
        Bf16Tiles,
        "tdpbf16ps"
    );
}

#[cfg(target_arch = "x86_64")]
pub use x86::{Bf16Tiles, Int8Tiles};

/// The tile operations emulated from their definitions, so that the tests of every AMX kernel
/// (here and in the model crate) run its loop on any CPU; no kernel of the program runs them.
pub mod emulation {
    use std::cell::RefCell;
    use std::marker::PhantomData;

    use super::Tiles;

    /// One tile: 16 rows of 64 bytes.
    pub type Tile = [[u8; 64]; 16];

    thread_local! {
        static TILE_FILE: RefCell<[Tile; 8]> = const { RefCell::new([[[0; 64]; 16]; 8]) };
        /// Whether the tiles are configured on this thread (between `configure` and `release`):
        /// every other operation requires it, as the hardware does.
        static CONFIGURED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    fn configured() {
        assert!(CONFIGURED.get(), "a tile operation outside configure .. release");
    }

    /// A product instruction emulated from its definition: what one step adds to one sum,
    /// `step(sum, a, b)` for a sum's four bytes, the row's four bytes of the step and the
    /// weights' four bytes of the sum's channel; [`Tiles::dot`] runs it over every row,
    /// channel and step of the tiles.
    pub trait EmulatedProduct {
        /// The sum's four bytes after one step.
        fn step(sum: [u8; 4], a: [u8; 4], b: [u8; 4]) -> [u8; 4];
    }

    /// The tile operations emulated on a thread-local file of eight tiles, with `P` as the
    /// product: what lets the tests run an AMX kernel's loop on any CPU.
    pub struct Emulated<P>(PhantomData<P>);

    fn load(tile: usize, p: *const u8, stride: usize) {
        configured();
        TILE_FILE.with(|t| {
            for (m, row) in t.borrow_mut()[tile].iter_mut().enumerate() {
                // SAFETY: the kernel passes 16 readable rows (the trait's contract).
                *row = unsafe { std::ptr::read_unaligned(p.add(m * stride) as *const [u8; 64]) };
            }
        })
    }

    impl<P: EmulatedProduct> Tiles for Emulated<P> {
        unsafe fn configure() {
            TILE_FILE.with(|t| *t.borrow_mut() = [[[0; 64]; 16]; 8]);
            CONFIGURED.set(true);
        }
        unsafe fn release() {
            configured();
            CONFIGURED.set(false);
        }
        unsafe fn zero_sums() {
            configured();
            TILE_FILE.with(|t| t.borrow_mut()[..4].fill([[0; 64]; 16]));
        }
        unsafe fn load_sums(i: usize, j: usize, p: *const u8, stride: usize) {
            load(2 * i + j, p, stride)
        }
        unsafe fn load_rows(i: usize, p: *const u8, stride: usize) {
            load(4 + i, p, stride)
        }
        unsafe fn load_weights(j: usize, p: *const u8, stride: usize) {
            load(6 + j, p, stride)
        }
        unsafe fn dot(i: usize, j: usize) {
            configured();
            TILE_FILE.with(|t| {
                let mut t = t.borrow_mut();
                let (a, b) = (t[4 + i], t[6 + j]);
                for (m, c) in t[2 * i + j].iter_mut().enumerate() {
                    for n in 0..16 {
                        let sum = b.iter().enumerate().fold(lane(c, n), |sum, (s, b)| {
                            P::step(sum, lane(&a[m], s), lane(b, n))
                        });
                        c[4 * n..4 * n + 4].copy_from_slice(&sum);
                    }
                }
            })
        }
        unsafe fn store(i: usize, j: usize, p: *mut u8, stride: usize) {
            configured();
            TILE_FILE.with(|t| {
                for (m, row) in t.borrow()[2 * i + j].iter().enumerate() {
                    std::ptr::write_unaligned(p.add(m * stride) as *mut [u8; 64], *row);
                }
            })
        }
    }

    /// The four bytes of lane `n` of a tile row.
    pub fn lane(row: &[u8; 64], n: usize) -> [u8; 4] {
        [row[4 * n], row[4 * n + 1], row[4 * n + 2], row[4 * n + 3]]
    }

    /// `tdpbssd` from its definition: signed byte quads, wrapping i32 sums.
    pub struct Tdpbssd;

    impl EmulatedProduct for Tdpbssd {
        fn step(sum: [u8; 4], x: [u8; 4], w: [u8; 4]) -> [u8; 4] {
            let products = x.iter().zip(w).map(|(&x, w)| i32::from(x as i8) * i32::from(w as i8));
            products.fold(i32::from_le_bytes(sum), i32::wrapping_add).to_le_bytes()
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn aligned_buffers_start_on_a_cache_line_and_hold_zeros() {
        for len in [0, 1, 15, 16, 17, 1000] {
            let mut a = super::Aligned::<u32>::zeroed(len);
            assert_eq!(a.len(), len);
            assert_eq!(a.as_ptr() as usize % 64, 0, "{len} values");
            assert!(a.iter().all(|&v| v == 0));
            a.iter_mut().enumerate().for_each(|(i, v)| *v = i as u32);
            assert!(a.iter().enumerate().all(|(i, &v)| v == i as u32));
        }
        let bytes = super::Aligned::<u8>::zeroed(65);
        assert_eq!((bytes.len(), bytes.as_ptr() as usize % 64), (65, 0));
    }

    /// `Aligned::filled` hands each chunk to `fill` once, with its index, and keeps what it
    /// wrote, on a cache line, for lengths that are not whole chunks or lines.
    #[test]
    fn filled_buffers_hold_what_each_chunk_wrote() {
        for (len, per_task) in [(0, 4), (1, 4), (17, 4), (1000, 48), (1000, 1000), (33, 0)] {
            let fill = |i: usize, chunk: &mut [u32]| {
                for (j, v) in chunk.iter_mut().enumerate() {
                    *v = (i * 100_000 + j) as u32;
                }
            };
            // SAFETY: `fill` writes every value of its chunk and reads none.
            let a = unsafe { super::Aligned::<u32>::filled(len, per_task, fill) };
            assert_eq!(a.len(), len);
            assert_eq!(a.as_ptr() as usize % 64, 0, "{len} values");
            let per = per_task.max(1);
            assert!(a
                .iter()
                .enumerate()
                .all(|(k, &v)| v == ((k / per) * 100_000 + k % per) as u32));
        }
    }
}
