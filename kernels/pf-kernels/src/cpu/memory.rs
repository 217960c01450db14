//! Large tensors on transparent huge pages.
//!
//! Every CPU kernel writes a fresh output, and a large allocation is fresh memory from the
//! kernel: each 4 KiB page is faulted in and zeroed on first touch. In a container with memory
//! accounting a fault costs microseconds, and on the models' maps (megabytes per tensor) the
//! faults took up to half of a memory-bound kernel's time (`perf`: `clear_page_erms`,
//! `exc_page_fault`). Where Linux offers transparent huge pages on request (`madvise` mode, the
//! common default), asking for them makes it one fault per 2 MiB.

use std::alloc::{GlobalAlloc, Layout, System};

/// Blocks from this size on are advised to use huge pages.
const LARGE: usize = 2 << 20;

/// The system allocator, asking Linux for transparent huge pages under every block of 2 MiB
/// or more; elsewhere the system allocator as it is. A program opts in with
/// `#[global_allocator] static ALLOC: pf_kernels::cpu::HugePageAllocator = pf_kernels::cpu::HugePageAllocator;`
/// (the `pf` command line and the benches do).
pub struct HugePageAllocator;

// Safety: every block comes from and goes back to `System` unchanged; the advice only changes
// how the kernel backs the pages.
unsafe impl GlobalAlloc for HugePageAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let block = System.alloc(layout);
        advise(block, layout.size());
        block
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let block = System.alloc_zeroed(layout);
        advise(block, layout.size());
        block
    }

    unsafe fn dealloc(&self, block: *mut u8, layout: Layout) {
        System.dealloc(block, layout)
    }

    unsafe fn realloc(&self, block: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let moved = System.realloc(block, layout, new_size);
        advise(moved, new_size);
        moved
    }
}

/// Asks for huge pages under the whole pages of `[block, block + len)`, if it is large. The
/// advice is a hint: where it is refused (huge pages off, an old kernel), nothing changes.
#[inline]
fn advise(block: *mut u8, len: usize) {
    #[cfg(target_os = "linux")]
    if !block.is_null() && len >= LARGE {
        const PAGE: usize = 4096;
        const MADV_HUGEPAGE: std::ffi::c_int = 14;
        extern "C" {
            fn madvise(addr: *mut std::ffi::c_void, len: usize, advice: std::ffi::c_int) -> std::ffi::c_int;
        }
        let start = (block as usize).next_multiple_of(PAGE);
        let end = (block as usize + len) / PAGE * PAGE;
        // Safety: the range lies inside the block just allocated; `madvise` only reads it as an
        // address range.
        unsafe { madvise(start as *mut std::ffi::c_void, end - start, MADV_HUGEPAGE) };
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (block, len);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_hold_what_is_written_and_zeroed_blocks_are_zero() {
        for size in [1, 4095, LARGE - 1, LARGE, 3 * LARGE + 17] {
            let layout = Layout::from_size_align(size, 64).unwrap();
            unsafe {
                let zeroed = HugePageAllocator.alloc_zeroed(layout);
                assert!(!zeroed.is_null() && zeroed as usize % 64 == 0);
                assert!(std::slice::from_raw_parts(zeroed, size).iter().all(|&b| b == 0), "size {size}");
                let block = HugePageAllocator.alloc(layout);
                std::ptr::write_bytes(block, 0xA5, size);
                let grown = HugePageAllocator.realloc(block, layout, size * 2 + LARGE);
                assert!(std::slice::from_raw_parts(grown, size).iter().all(|&b| b == 0xA5), "size {size}");
                HugePageAllocator.dealloc(grown, Layout::from_size_align(size * 2 + LARGE, 64).unwrap());
                HugePageAllocator.dealloc(zeroed, layout);
            }
        }
    }
}
