//! Weights that stay memory-mapped: a safetensors file is mapped copy-on-write and the CPU
//! tensors loaded from it use the mapped pages as their buffers, so a frozen base model lives
//! in the page cache (shared by every process that maps the file, reclaimable by the kernel)
//! instead of in anonymous memory, and loading copies nothing.
//!
//! candle's CPU tensors own a `Vec`, and a `Vec` frees its buffer through the global
//! allocator. [`MappedAlloc`] is the system allocator plus a table of the mapped files: freeing
//! a buffer that lies inside one releases that buffer's hold on the file, and the last release
//! unmaps it. A binary opts in with
//!
//! ```ignore
//! #[global_allocator]
//! static ALLOC: tevatron_model::mapped::MappedAlloc = tevatron_model::mapped::MappedAlloc;
//! ```
//!
//! Without it [`MappedFile::open`] returns `None` and the loader reads tensors into memory.
//! Writes to a mapped tensor (none of ours write to frozen weights) would go to private copies
//! of the pages, never to the file.

use std::alloc::{GlobalAlloc, Layout, System};
use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

/// The global allocator that makes mapped tensor buffers possible (module docs).
pub struct MappedAlloc;

/// How many files one process can map over its lifetime; slots are not reused, and a file
/// that finds none is read into memory instead.
const SLOTS: usize = 256;

/// Set by the first allocation that goes through [`MappedAlloc`]: true only when it is the
/// global allocator.
static INSTALLED: AtomicBool = AtomicBool::new(false);
/// Slots claimed so far; `START[i]..END[i]` is slot `i`'s address range (END 0 once unmapped),
/// read without a lock on every free.
static CLAIMED: AtomicUsize = AtomicUsize::new(0);
static START: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
static END: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
/// Each live mapping and the number of holds on it (buffers handed out plus the open file).
static HELD: Mutex<[Option<Held>; SLOTS]> = Mutex::new([const { None }; SLOTS]);

struct Held {
    map: memmap2::MmapMut,
    holds: usize,
}

fn held() -> MutexGuard<'static, [Option<Held>; SLOTS]> {
    // Nothing under this lock can panic, and an allocator must not.
    HELD.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The slot whose mapping contains `ptr`, if any: a scan of the claimed slots (a handful of
/// files in any real run), cheap enough for every free.
fn slot_of(ptr: *mut u8) -> Option<usize> {
    let p = ptr as usize;
    (0..CLAIMED.load(Ordering::Acquire))
        .find(|&i| START[i].load(Ordering::Acquire) <= p && p < END[i].load(Ordering::Acquire))
}

/// Drops one hold on slot `i`; the last one unmaps the file (after the range stops matching,
/// so that no later free can be mistaken for a mapped buffer).
fn release(i: usize) {
    let unmapped = {
        let mut table = held();
        let last = table[i].as_mut().is_some_and(|h| {
            h.holds -= 1;
            h.holds == 0
        });
        if last {
            END[i].store(0, Ordering::Release);
            table[i].take()
        } else {
            None
        }
    };
    drop(unmapped);
}

/// Records that [`MappedAlloc`] serves allocations; a load first, so that the shared flag's
/// cache line is written once, not on every allocation.
fn mark_installed() {
    if !INSTALLED.load(Ordering::Relaxed) {
        INSTALLED.store(true, Ordering::Relaxed);
    }
}

// SAFETY: every block not inside a mapping is the system allocator's, passed through unchanged;
// blocks inside a mapping were handed out by `MappedFile::buffer` (which keeps the mapping
// alive until each is freed) and are never passed to the system allocator.
unsafe impl GlobalAlloc for MappedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        mark_installed();
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        mark_installed();
        // SAFETY: as `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        match slot_of(ptr) {
            Some(i) => release(i),
            // SAFETY: not a mapped buffer, so the system allocator's.
            None => unsafe { System.dealloc(ptr, layout) },
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let Some(i) = slot_of(ptr) else {
            // SAFETY: not a mapped buffer, so the system allocator's.
            return unsafe { System.realloc(ptr, layout, new_size) };
        };
        // A mapped buffer that grows or shrinks moves to the heap.
        // SAFETY: `new_size` is non-zero and fits `layout.align()` (GlobalAlloc's contract).
        let moved =
            unsafe { System.alloc(Layout::from_size_align_unchecked(new_size, layout.align())) };
        if !moved.is_null() {
            // SAFETY: both blocks hold at least the smaller size and do not overlap.
            unsafe { std::ptr::copy_nonoverlapping(ptr, moved, layout.size().min(new_size)) };
            release(i);
        }
        moved
    }
}

/// Whether [`MappedAlloc`] is the global allocator: one allocation tells.
pub fn available() -> bool {
    drop(std::hint::black_box(Box::new(0u8)));
    INSTALLED.load(Ordering::Relaxed)
}

/// Whether `ptr` lies in a file mapped now: a tensor buffer that uses the mapping.
pub fn contains(ptr: *const u8) -> bool {
    slot_of(ptr.cast_mut()).is_some()
}

/// Bytes of files mapped now (for tests and memory reports).
pub fn mapped_bytes() -> usize {
    held().iter().flatten().map(|h| h.map.len()).sum()
}

/// One file mapped copy-on-write, holding it mapped until dropped; tensor buffers taken from it
/// with [`MappedFile::buffer`] hold it mapped until they are freed.
pub struct MappedFile {
    slot: usize,
    base: usize,
    len: usize,
}

impl MappedFile {
    /// Maps `file`, or `None` when [`MappedAlloc`] is not the global allocator, the file is
    /// empty, or the slots are used up (the caller reads the file instead).
    pub fn open(file: &File) -> std::io::Result<Option<Self>> {
        if !available() || file.metadata()?.len() == 0 {
            return Ok(None);
        }
        // SAFETY: the mapping is private (copy-on-write). A file truncated by another process
        // while mapped would fault on access, as with every mmap-based loader (safetensors,
        // PyTorch's `mmap=True`); model files are not rewritten in place by the tools that
        // make them.
        let map = unsafe { memmap2::MmapOptions::new().map_copy(file)? };
        let (base, len) = (map.as_ptr() as usize, map.len());
        let mut table = held();
        let slot = CLAIMED.load(Ordering::Acquire);
        if slot == SLOTS {
            return Ok(None);
        }
        table[slot] = Some(Held { map, holds: 1 });
        START[slot].store(base, Ordering::Release);
        END[slot].store(base + len, Ordering::Release);
        CLAIMED.store(slot + 1, Ordering::Release);
        Ok(Some(Self { slot, base, len }))
    }

    /// The bytes `range` of the file as a `Vec<T>` that uses the mapped pages as its buffer,
    /// or `None` when the range is empty, out of the file, not a whole number of `T`, or not
    /// aligned for `T` (the caller copies instead). Each range should be taken once: two
    /// buffers over the same bytes would alias.
    pub fn buffer<T: bytemuck::Pod>(&self, range: std::ops::Range<usize>) -> Option<Vec<T>> {
        let size = std::mem::size_of::<T>();
        let bytes = range.end.checked_sub(range.start)?;
        let ptr = self.base.checked_add(range.start)?;
        if bytes == 0
            || range.end > self.len
            || size == 0
            || bytes % size != 0
            || ptr % std::mem::align_of::<T>() != 0
        {
            return None;
        }
        held()[self.slot].as_mut()?.holds += 1;
        let n = bytes / size;
        // SAFETY: `ptr..ptr + bytes` lies inside a live, writable mapping that this new hold
        // keeps alive; it is aligned for `T`, holds `n` initialised `T` (any bytes are a valid
        // `Pod`), and the global allocator frees it by releasing the hold (`MappedAlloc`).
        Some(unsafe { Vec::from_raw_parts(ptr as *mut T, n, n) })
    }
}

impl Drop for MappedFile {
    fn drop(&mut self) {
        release(self.slot);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn without_the_allocator_nothing_is_mapped() {
        // The library's own test binary keeps the default allocator.
        assert!(!super::available());
        let file = std::fs::File::open(concat!(env!("CARGO_MANIFEST_DIR"), "/src/mapped.rs"))
            .expect("this source file");
        assert!(super::MappedFile::open(&file).expect("open").is_none());
    }
}
