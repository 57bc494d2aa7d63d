//! Reading ahead across a directory. A reader that opens the small files of a directory one
//! after another in name order (`cat dir/*`, `cp -r`, `tar c`, a build reading its sources)
//! would otherwise wait for one S3 round trip per file, one file at a time. Once two cold opens
//! in a row follow name order, the next [`WINDOW`] small files are fetched ([`PARALLEL`] at a
//! time), metadata and bytes in one request each, and the next window starts when the reader is
//! half-way through the current one. A reader that jumps around starts nothing.
//!
//! What is fetched ahead lands where an open would have put it (the namespace and the read
//! cache's small-object store, bounded by bytes), and the work is the volume's background work,
//! awaited at close.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use tracing::Instrument;

use super::{Volume, SMALL_OBJECT};
use crate::meta::{Ino, Inode, Kind};
use crate::sync::LockExt;

/// Files fetched ahead per window.
const WINDOW: usize = 16;
/// Requests in flight per window.
const PARALLEL: usize = 8;
/// Directories followed at once; past it, all are forgotten (a reader starts again).
const MAX_DIRS: usize = 256;

#[derive(Default)]
pub(crate) struct Prefetch {
    dirs: Mutex<HashMap<Ino, DirState>>,
    /// The store answered a fetch ahead without the bytes (one without a combined request):
    /// reading ahead would only repeat HEADs, so it stops for this volume.
    useless: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct DirState {
    /// The last file opened cold in the directory.
    last: Vec<u8>,
    /// A window is being fetched.
    running: bool,
    /// Where the current window ended, and the name past which the reader is half-way
    /// through it; None when nothing was fetched ahead (or the directory's end was reached).
    upto: Option<Vec<u8>>,
    trigger: Option<Vec<u8>>,
}

fn small_file(inode: &Inode) -> bool {
    inode.kind == Kind::File && inode.remote.as_ref().is_some_and(|r| r.size <= SMALL_OBJECT)
}

impl Volume {
    /// A small file was opened or read cold (from S3): read ahead if it follows the last one
    /// opened cold in its directory in name order.
    pub(crate) fn note_cold_open(&self, inode: &Inode) {
        if !small_file(inode) || self.prefetch.useless.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let mut dirs = self.prefetch.dirs.locked();
        if dirs.len() >= MAX_DIRS && !dirs.contains_key(&inode.parent) {
            dirs.clear();
        }
        let st = dirs.entry(inode.parent).or_default();
        let sequential = !st.last.is_empty() && inode.name > st.last;
        st.last = inode.name.clone();
        if sequential && !st.running {
            st.running = true;
            drop(dirs);
            self.start_window(inode.parent, inode.name.clone());
        }
    }

    /// A file whose metadata was already loaded was opened: if the reader is half-way through
    /// what was fetched ahead, fetch the next window.
    pub(crate) fn note_open(&self, inode: &Inode) {
        if inode.kind != Kind::File {
            return;
        }
        let mut dirs = self.prefetch.dirs.locked();
        let Some(st) = dirs.get_mut(&inode.parent) else { return };
        if st.running || st.trigger.as_ref().is_none_or(|t| inode.name < *t) {
            return;
        }
        let Some(after) = st.upto.clone() else { return };
        st.running = true;
        drop(dirs);
        self.start_window(inode.parent, after);
    }

    fn start_window(&self, dir: Ino, after: Vec<u8>) {
        let Some(vol) = self.this.get().and_then(|w| w.upgrade()) else {
            return;
        };
        let v = vol.clone();
        v.spawn_background(
            "reading ahead",
            async move {
                let (upto, trigger) = match vol.fetch_window(dir, &after).await {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::debug!(dir, error = %e, "reading ahead failed");
                        (None, None)
                    }
                };
                if let Some(st) = vol.prefetch.dirs.locked().get_mut(&dir) {
                    st.running = false;
                    st.upto = upto;
                    st.trigger = trigger;
                }
            }
            .instrument(tracing::debug_span!("prefetch", dir)),
        );
    }

    /// Fetches the small files among the next [`WINDOW`] names after `after`; returns where the
    /// window ended and the name half-way through it.
    async fn fetch_window(
        self: &Arc<Self>,
        dir: Ino,
        after: &[u8],
    ) -> super::FsResult<(Option<Vec<u8>>, Option<Vec<u8>>)> {
        let names = self.meta.children_by_name(dir, Some(after), None, WINDOW)?;
        let (Some(last), Some(half)) = (names.last(), names.get(names.len() / 2)) else {
            return Ok((None, None)); // the end of the directory
        };
        let (upto, trigger) = (last.0.clone(), half.0.clone());
        let mut wanted = Vec::new();
        for (_, ino) in &names {
            if let Some(inode) = self.meta.inode(*ino)? {
                let cached = inode
                    .remote
                    .as_ref()
                    .is_some_and(|r| self.cache.has_small(inode.ino, &r.etag));
                // Not staged (a staged file is read from disk), not yet fetched.
                if small_file(&inode) && !cached && self.staged(inode.ino).is_none() {
                    wanted.push(inode);
                }
            }
        }
        futures::stream::iter(wanted)
            .map(|inode| async move {
                let remote = inode.remote.clone().expect("small_file has a remote");
                let fetched = self.store.head_and_get(&remote.key, SMALL_OBJECT).await?;
                if matches!(&fetched, Some((_, None))) {
                    self.prefetch.useless.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                self.apply_meta(inode.ino, &remote, fetched).await
            })
            .buffer_unordered(PARALLEL)
            .for_each(|r| async move {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "a file read ahead failed; its open will fetch it");
                }
            })
            .await;
        Ok((Some(upto), Some(trigger)))
    }
}
