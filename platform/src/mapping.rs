//! Shared mappings of a segment.
//!
//! # Safety
//!
//! This module implements [`SharedMemory`] for a `memmap2::MmapRaw`, which
//! hands out raw pointers only: nothing here forms a reference into the
//! mapping. The mapping is `MAP_SHARED` and lives as long as the [`Mapping`]
//! (and so as long as the `Region` holding it and the ring ends made from
//! it).

use std::os::fd::{AsRawFd, BorrowedFd};

use ipc_core::{Region, SharedMemory};
use memmap2::{MmapOptions, MmapRaw};

use crate::{check_sealed, SealError};

/// A read-write shared mapping of a whole segment.
pub struct Mapping {
    map: MmapRaw,
}

impl Mapping {
    /// Maps the `len` bytes of a sealed memfd read-write and shared,
    /// faulting the pages in now rather than on the hot path.
    ///
    /// The seals and the size are checked first ([`crate::check_sealed`]):
    /// an unsealed file could be shrunk under the mapping, and the next
    /// access would raise SIGBUS.
    pub fn map(fd: BorrowedFd<'_>, len: usize) -> Result<Region, SealError> {
        check_sealed(fd, len as u64)?;
        let map = MmapOptions::new().len(len).populate().map_raw(fd.as_raw_fd()).map_err(SealError::Io)?;
        Ok(Region::new(Mapping { map }))
    }
}

// SAFETY: `MmapRaw` keeps the same base pointer and length until it is
// dropped, the mapping is readable and writable (map_raw maps read-write),
// and mmap returns page-aligned addresses, which satisfies REGION_ALIGN.
unsafe impl SharedMemory for Mapping {
    fn as_ptr(&self) -> *mut u8 {
        self.map.as_mut_ptr()
    }
    fn len(&self) -> usize {
        self.map.len()
    }
}
