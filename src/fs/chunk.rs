//! One chunk of the read cache: fetched once, by whoever claims it first, while every other
//! reader of it waits for those bytes.
//!
//! Why not a `OnceCell`: a read-ahead GET that covers several chunks holds all of them while it
//! runs, so that a READ reaching one of them waits for that GET instead of sending its own.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use tokio::sync::Notify;

#[derive(Default)]
pub struct Chunk {
    bytes: OnceLock<Bytes>,
    /// Someone is fetching it, or has filled it (it stays set once filled).
    claimed: AtomicBool,
    changed: Notify,
}

/// The right to fill a chunk. Dropped unfilled (its GET failed, or the future holding it was
/// dropped), the chunk is free again and its waiters fetch it themselves.
pub struct Claim(Arc<Chunk>);

impl Chunk {
    pub fn get(&self) -> Option<Bytes> {
        self.bytes.get().cloned()
    }

    /// Neither filled nor being fetched.
    pub fn claim(self: &Arc<Self>) -> Option<Claim> {
        // `claimed` never goes back to false once the bytes are set, so winning it means they
        // are not.
        if self.bytes.get().is_some() || self.claimed.swap(true, Ordering::AcqRel) {
            return None;
        }
        Some(Claim(self.clone()))
    }

    /// Its bytes: at once if filled; else those of whoever is fetching it, once they have them;
    /// else from `fetch`, run here (also when the one fetching it gave up).
    pub async fn get_or_fetch<F, Fut, E>(self: &Arc<Self>, fetch: F) -> Result<Bytes, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Bytes, E>>,
    {
        let mut fetch = Some(fetch);
        loop {
            // Registered before the checks, so a fill or a release between them still wakes it.
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(b) = self.get() {
                return Ok(b);
            }
            if let Some(claim) = self.claim() {
                // Taken once at most: this call returns whatever its own fetch gives.
                let fetch = fetch.take().expect("one fetch per call");
                let b = fetch().await?;
                claim.fill(b.clone());
                return Ok(b);
            }
            changed.await;
        }
    }
}

impl Claim {
    pub fn fill(self, bytes: Bytes) {
        let _ = self.0.bytes.set(bytes);
        self.0.changed.notify_waiters();
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if self.0.bytes.get().is_none() {
            self.0.claimed.store(false, Ordering::Release);
            self.0.changed.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A task reading `chunk`, with "own" as what its own fetch would get.
    fn reader(chunk: &Arc<Chunk>) -> tokio::task::JoinHandle<Result<Bytes, ()>> {
        let chunk = chunk.clone();
        tokio::spawn(async move { chunk.get_or_fetch(|| async { Ok(Bytes::from_static(b"own")) }).await })
    }

    /// A reader of a chunk that another holds waits for its bytes and fetches nothing itself;
    /// once the holder gives up unfilled, the reader fetches.
    #[tokio::test]
    async fn a_reader_waits_for_the_claim_and_fetches_once_it_is_given_up() {
        let chunk = Arc::new(Chunk::default());
        let claim = chunk.claim().expect("a new chunk is free");
        assert!(chunk.claim().is_none(), "claimed twice");
        let waiter = reader(&chunk);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        claim.fill(Bytes::from_static(b"held"));
        assert_eq!(&waiter.await.unwrap().unwrap()[..], b"held");

        let chunk = Arc::new(Chunk::default());
        let claim = chunk.claim().unwrap();
        let waiter = reader(&chunk);
        tokio::task::yield_now().await;
        drop(claim);
        assert_eq!(&waiter.await.unwrap().unwrap()[..], b"own");
        assert_eq!(chunk.get().as_deref(), Some(&b"own"[..]));
        assert!(chunk.claim().is_none(), "a filled chunk claimed again");
    }
}
