//! Buffers for large GET bodies, kept for reuse once the last reference to their bytes is gone.
//!
//! Why: a cold sequential read takes a fresh 4 MiB buffer per chunk. The allocator hands back
//! memory that was given back to the kernel or never touched, and each 4 KiB page of it costs a
//! page fault on first write; under a hypervisor that traps faults (the user-mode-linux
//! benchmark guest: about 50 µs each) the faults were half of the gateway's CPU for a cold read
//! of 256 MiB. A buffer that comes back here is already mapped. Copying a body's frames into one
//! buffer of the right size as they arrive also lets the HTTP client reuse its read buffer,
//! instead of keeping every frame until the whole body is in and then copying it.

use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::sync::LockExt;

/// Bodies shorter than this are not pooled: small allocations are the allocator's business.
pub const MIN_POOLED: usize = 1 << 20;

pub struct BufPool {
    free: Mutex<Vec<Vec<u8>>>,
    /// Most bytes of capacity kept while unused.
    max_bytes: usize,
}

impl BufPool {
    pub fn new(max_bytes: usize) -> Arc<BufPool> {
        Arc::new(BufPool {
            free: Mutex::new(Vec::new()),
            max_bytes,
        })
    }

    /// An empty buffer that holds `len` bytes without growing: a kept one if one fits (without
    /// wasting more than half of it), else a new one.
    pub fn take(&self, len: usize) -> Vec<u8> {
        if len >= MIN_POOLED {
            let mut free = self.free.locked();
            if let Some(i) = free.iter().position(|b| b.capacity() >= len && b.capacity() / 2 <= len) {
                return free.swap_remove(i);
            }
        }
        Vec::with_capacity(len)
    }

    /// The bytes of `buf`; the buffer comes back here when the last reference to them is dropped.
    pub fn wrap(self: &Arc<Self>, buf: Vec<u8>) -> Bytes {
        if buf.capacity() < MIN_POOLED {
            return Bytes::from(buf);
        }
        Bytes::from_owner(Pooled {
            buf,
            pool: self.clone(),
        })
    }

    fn give(&self, mut buf: Vec<u8>) {
        buf.clear();
        let mut free = self.free.locked();
        let kept: usize = free.iter().map(|b| b.capacity()).sum();
        if kept + buf.capacity() <= self.max_bytes {
            free.push(buf);
        }
    }

    /// Bytes of capacity kept for reuse.
    pub fn kept_bytes(&self) -> usize {
        self.free.locked().iter().map(|b| b.capacity()).sum()
    }
}

struct Pooled {
    buf: Vec<u8>,
    pool: Arc<BufPool>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.pool.give(std::mem::take(&mut self.buf));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_comes_back_when_its_last_bytes_go_and_is_reused() {
        let pool = BufPool::new(8 << 20);
        let mut buf = pool.take(4 << 20);
        buf.extend_from_slice(&vec![7u8; 4 << 20]);
        let addr = buf.as_ptr();
        let bytes = pool.wrap(buf);
        let slice = bytes.slice(10..20);
        drop(bytes);
        assert_eq!(pool.kept_bytes(), 0, "back while a slice still refers to it");
        assert_eq!(&slice[..], &[7u8; 10]);
        drop(slice);
        assert_eq!(pool.kept_bytes(), 4 << 20);
        let again = pool.take(3 << 20);
        assert_eq!(again.as_ptr(), addr, "the kept buffer was not reused");
        assert!(again.is_empty());
        assert_eq!(pool.kept_bytes(), 0);
    }

    #[test]
    fn small_or_ill_fitting_requests_get_new_buffers_and_the_pool_is_bounded() {
        let pool = BufPool::new(8 << 20);
        let held: Vec<Bytes> = (0..3).map(|_| pool.wrap(pool.take(4 << 20))).collect();
        drop(held);
        // Two fit under 8 MiB; the third was let go.
        assert_eq!(pool.kept_bytes(), 8 << 20);
        assert!(
            pool.take(64 << 10).capacity() < MIN_POOLED,
            "a small request took a big buffer"
        );
        assert_eq!(pool.take(1 << 20).capacity(), 1 << 20, "a 4 MiB buffer wasted on 1 MiB");
        assert_eq!(pool.kept_bytes(), 8 << 20);
        drop(pool.wrap(pool.take(64 << 10)));
        assert_eq!(pool.kept_bytes(), 8 << 20, "a small buffer was kept");
    }
}
