//! Reconciling directories with S3 listings: when a listing is stale, relisting (before the
//! caller goes on, or in the background for a large directory), and applying a listing page by
//! page under the namespace lock.

use std::collections::{HashMap, HashSet};

use tracing::Instrument;

use super::{names, FsResult, Volume, SMALL_DIR};
use crate::meta::{Batch, Ino, Inode, Kind, Remote, Time};
use crate::store::{ListPage, ObjectSummary, StoreError};

/// Names (in key form) a page of a listing covers: past `after` (from the start when None), up
/// to and including `upto` (to the end when None).
#[derive(Clone, Copy)]
struct Range<'a> {
    after: Option<&'a str>,
    upto: Option<&'a str>,
}

/// What one page of a listing shows of a directory, by name.
struct Page {
    files: HashMap<String, ObjectSummary>,
    dirs: HashSet<String>,
    /// Names left as they are (see [`Page::hold_undecided`]).
    held: HashSet<String>,
}

impl Page {
    fn of(prefix: &str, page: ListPage) -> Page {
        let mut files = HashMap::new();
        let mut dirs = HashSet::new();
        for o in page.objects {
            let name = &o.key[prefix.len()..];
            if name.is_empty() {
                continue; // the directory's own marker
            }
            if names::listable(name) {
                files.insert(name.to_string(), o);
            } else if name != names::VOLUME_RECORD {
                tracing::warn!(key = %o.key, "object name cannot be shown over NFS; skipped");
            }
        }
        for p in page.prefixes {
            let name = p[prefix.len()..].trim_end_matches('/');
            if names::listable(name) {
                dirs.insert(name.to_string());
            } else {
                tracing::warn!(prefix = %p, "prefix cannot be shown over NFS; skipped");
            }
        }
        Page {
            files,
            dirs,
            held: HashSet::new(),
        }
    }

    /// Files of a page that ends at `upto` (in key form) which may be directories as well: S3
    /// lists "x", then names such as "x.txt" or "x-1", and only then the prefix "x/", which a
    /// later page (or a listing cut short, none) may bring. Such a name is left as it is here
    /// (neither taken up nor forgotten), and its object returned for the next page to decide:
    /// taken as a file, a directory with pending work under it was forgotten, and its handles
    /// went stale.
    fn hold_undecided(&mut self, upto: Option<&str>) -> Vec<ObjectSummary> {
        let Some(upto) = upto else { return Vec::new() };
        // "n/" sorts past `upto` exactly when `upto` is n followed by nothing or by bytes
        // below '/': every name of the page sorts at or before `upto`.
        let dirs = &self.dirs;
        let undecided = |n: &String| !dirs.contains(n) && upto.strip_prefix(n.as_str()).is_some_and(|rest| rest < "/");
        let out: Vec<(String, ObjectSummary)> = self.files.extract_if(|n, _| undecided(n)).collect();
        out.into_iter()
            .map(|(n, o)| {
                self.held.insert(n);
                o
            })
            .collect()
    }

    /// Files an earlier page held back (see [`Page::hold_undecided`]).
    fn take_held(&mut self, prefix: &str, objects: Vec<ObjectSummary>) {
        for o in objects {
            self.files.insert(o.key[prefix.len()..].to_string(), o);
        }
    }
}

/// Where a subtree listing stopped short (see [`Volume::apply_subtree`]): its last key, and
/// the prefixes of the directories below the top that the key is in and that had as many keys
/// listed as a try may bring.
struct Cut {
    key: String,
    full: Vec<String>,
}

/// Keys a listing of a whole subtree may bring (see [`Volume::list_subtree`]): three pages.
/// A subtree found larger costs those requests once; one that fits saves a request for every
/// directory in it past the first, at every refresh, and keeps a repository's working tree in
/// one listing (this project's, on a volume: about 1,100 keys in 110 directories).
const SUBTREE_KEYS: usize = 3000;
/// S3's largest page.
const PAGE_KEYS: usize = 1000;

/// A listing of every key under `prefix` (no delimiter), cut into what a listing with the
/// delimiter '/' would give for each directory under it: the keys directly in it, and the
/// prefixes of its subdirectories. Keyed by each directory's prefix.
fn by_directory(prefix: &str, objects: Vec<ObjectSummary>) -> HashMap<String, ListPage> {
    let mut out: HashMap<String, ListPage> = HashMap::new();
    for o in objects {
        if !o.key.starts_with(prefix) {
            continue;
        }
        // Each '/' past `prefix` ends a directory the key is in; the key is an object of the
        // deepest (a directory's marker, ending in '/', is an object of its own directory).
        let mut dir_end = prefix.len();
        for (i, _) in o.key[prefix.len()..].match_indices('/') {
            let sub_end = prefix.len() + i + 1;
            let page = out.entry(o.key[..dir_end].to_string()).or_default();
            // Keys come in order, and those under one prefix are contiguous.
            if page.prefixes.last().map(String::as_str) != Some(&o.key[..sub_end]) {
                page.prefixes.push(o.key[..sub_end].to_string());
            }
            dir_end = sub_end;
        }
        out.entry(o.key[..dir_end].to_string()).or_default().objects.push(o);
    }
    out
}

impl Volume {
    /// Brings a directory's children in line with S3 when its listing is stale (or `force`).
    ///
    /// A directory never listed, or a small one ([`SMALL_DIR`] entries: one LIST request), is
    /// listed before the caller goes on, so the first access after the refresh interval sees S3
    /// as it is now. A large one is relisted in the background (once at a time) while callers
    /// carry on with what they have: its listing takes many S3 requests, and no create, lookup
    /// or stat should wait for it; a lookup that misses in it lists it first (see
    /// [`Volume::lookup`]). `force` (RMDIR, RENAME of a directory) always lists first.
    pub(crate) async fn refresh_dir(&self, dir: &Inode, force: bool) -> FsResult<()> {
        if !force {
            let listed_before = self.freshness.ever_listed(dir.ino);
            if !self.freshness.stale(dir.ino) {
                return Ok(());
            }
            if listed_before {
                if !self.freshness.start_relisting(dir.ino) {
                    return Ok(()); // a relisting is under way: it is as fresh as we can be
                }
                if self.meta.children(dir.ino, 0, SMALL_DIR + 1)?.len() <= SMALL_DIR {
                    let r = self.list_dir(dir).await;
                    self.freshness.end_relisting(dir.ino);
                    return r;
                }
                if let Some(vol) = self.this.get().and_then(|w| w.upgrade()) {
                    let (dir, ino) = (dir.clone(), dir.ino);
                    let v = vol.clone();
                    v.spawn_background(
                        "relisting",
                        async move {
                            if let Err(e) = vol.list_dir(&dir).await {
                                tracing::warn!(ino = dir.ino, error = %e, "background relisting failed");
                            }
                            vol.freshness.end_relisting(dir.ino);
                        }
                        .instrument(tracing::info_span!("relist", ino)),
                    );
                } else {
                    self.freshness.end_relisting(dir.ino);
                }
                return Ok(());
            }
        }
        self.list_dir(dir).await
    }

    /// Lists a directory from S3 and applies what it finds, one page at a time: memory holds a
    /// page (1,000 entries), never the whole directory, however large it is.
    ///
    /// S3 lists in key order, so a page covers a range of names (in key form: a directory's
    /// name followed by '/'), from just past the previous page's last key to its own last key.
    /// Local entries in that range that the page lacks are what S3 no longer has. Each page is
    /// applied under the namespace lock, on its own: a listing that fails half-way leaves the
    /// pages it got applied, each of them consistent.
    pub(crate) async fn list_dir(&self, dir: &Inode) -> FsResult<()> {
        let prefix = self.dir_prefix(dir)?;
        let epoch_before = self.uploader.epoch();
        let listing = self.uploader.ledger().begin_listing();
        let started = listing.started;
        if self.list_subtree(dir, &prefix, epoch_before, started).await? {
            self.usage.changed();
            return Ok(());
        }
        let mut token = None;
        // Every name up to and including this key form has been reconciled.
        let mut done: Option<String> = None;
        // Files of the last page that may be directories too (see `Page::hold_undecided`).
        let mut undecided = Vec::new();
        loop {
            let page = match self.store.list(&prefix, Some("/"), token, 1000).await {
                Ok(p) => p,
                Err(e) => return self.listing_failed(dir.ino, &prefix, e),
            };
            token = page.next.clone();
            let upto = match &token {
                None => None,
                Some(_) => {
                    let last_object = page.objects.last().map(|o| o.key.as_str());
                    let last_prefix = page.prefixes.last().map(String::as_str);
                    match last_object.max(last_prefix) {
                        Some(k) => Some(k[prefix.len()..].to_string()),
                        // An empty page (S3 may send one): nothing to reconcile yet.
                        None => continue,
                    }
                }
            };
            let range = Range {
                after: done.as_deref(),
                upto: upto.as_deref(),
            };
            let mut page = Page::of(&prefix, page);
            page.take_held(&prefix, std::mem::take(&mut undecided));
            undecided = page.hold_undecided(range.upto);
            if !self
                .apply_page(dir.ino, &prefix, page, range, epoch_before, started)
                .await?
            {
                return Ok(()); // the directory is gone
            }
            if token.is_none() {
                break;
            }
            done = upto;
        }
        self.usage.changed();
        self.freshness.note_listed(dir.ino, started);
        Ok(())
    }

    /// Lists `dir` and every directory under it at once, when the whole subtree fits in a few
    /// pages of S3's listing ([`SUBTREE_KEYS`]): each directory then gets exactly the page a listing of its own
    /// would have got, from one snapshot, and counts as listed. A tool that walks a tree
    /// (`git status`, `find`, `du`) then costs a LIST per thousand keys in the tree, not one
    /// per directory.
    ///
    /// Tried only where it can pay: not for a subtree known locally to be larger, nor for one a
    /// try found larger lately ([`super::freshness::TOO_LARGE_FOR`]: that try cost its requests, and the listing
    /// by directory follows it), and with one page only on a directory nothing is known of. A
    /// try cut short still applies what it listed (see [`Volume::apply_subtree`]). False when
    /// the caller is to list `dir` by directory.
    ///
    /// `prefix` is `dir`'s; `epoch_before` and `started` are the listing's, as in
    /// [`Volume::apply_page`] (taken before the try, they hold for the listing by directory
    /// after it too).
    async fn list_subtree(
        &self,
        dir: &Inode,
        prefix: &str,
        epoch_before: u64,
        started: std::time::Instant,
    ) -> FsResult<bool> {
        if self.freshness.subtrees_refused()
            || self.freshness.subtree_too_large(dir.ino)
            || !self.known_subtree_within(dir.ino, SUBTREE_KEYS)?
        {
            return Ok(false);
        }
        // Nothing known of it (never listed since the volume opened, no entries in the
        // journal): it may be any size, so one page is risked on it, not three.
        let limit = if self.freshness.ever_listed(dir.ino) || self.meta.has_children(dir.ino)? {
            SUBTREE_KEYS
        } else {
            PAGE_KEYS
        };
        let mut objects = Vec::new();
        let mut token = None;
        loop {
            let want = (limit - objects.len()).min(PAGE_KEYS);
            if want == 0 {
                self.freshness.note_subtree_too_large(dir.ino);
                // The keys listed still say all there is of each directory that ends before
                // the last of them, and part of those it is in: applied, they spare a walk of
                // the tree (and the listing by directory that follows) a LIST each.
                if let Some(key) = objects.last().map(|o: &ObjectSummary| o.key.clone()) {
                    // The directories below it the cut falls in with as many keys listed
                    // already: no try of theirs can fit either.
                    let full = key[prefix.len()..]
                        .match_indices('/')
                        .map(|(i, _)| key[..prefix.len() + i + 1].to_string())
                        .filter(|p| objects.len() - objects.partition_point(|o| o.key < *p) >= SUBTREE_KEYS)
                        .collect();
                    let pages = by_directory(prefix, objects);
                    let cut = Cut { key, full };
                    if let Err(e) = self
                        .apply_subtree(dir.ino, prefix, pages, Some(&cut), epoch_before, started)
                        .await
                    {
                        tracing::warn!(%prefix, error = %e, "applying a subtree listing cut short failed");
                    }
                }
                return Ok(false);
            }
            let page = match self.store.list(prefix, None, token, want).await {
                Ok(page) => page,
                // Refused: a bucket policy may allow listings by directory only (a condition
                // on the delimiter). Those, from now on.
                Err(e @ (StoreError::AccessDenied(_) | StoreError::Invalid(_))) => {
                    if self.freshness.refuse_subtrees() {
                        tracing::warn!(%prefix, error = %e, "S3 refused a listing without a delimiter; directories are listed one by one from now on");
                    }
                    return Ok(false);
                }
                Err(e) => return self.listing_failed(dir.ino, prefix, e).map(|()| true),
            };
            objects.extend(page.objects);
            token = page.next;
            if token.is_none() {
                break;
            }
        }
        let pages = by_directory(prefix, objects);
        self.apply_subtree(dir.ino, prefix, pages, None, epoch_before, started)
            .await?;
        Ok(true)
    }

    /// Applies the pages of a subtree listing (see [`by_directory`]) from `top` (listed as
    /// `prefix`) down, each directory's as a listing of its own would have been applied, and
    /// notes each as listed.
    ///
    /// `cut`: where the listing stopped. A directory its key is in has had only its names up
    /// to the one holding the key listed: those are applied (the range a page of its own
    /// listing would cover), and it is not noted as listed. Every other directory was listed
    /// whole.
    async fn apply_subtree(
        &self,
        top: Ino,
        prefix: &str,
        mut pages: HashMap<String, ListPage>,
        cut: Option<&Cut>,
        epoch_before: u64,
        started: std::time::Instant,
    ) -> FsResult<()> {
        let mut todo = vec![(top, prefix.to_string())];
        while let Some((ino, prefix)) = todo.pop() {
            let page = pages.remove(&prefix).unwrap_or_default();
            let subdirs = page.prefixes.clone();
            // The name (in key form) under `prefix` holding the cut, when it is in there.
            let upto = cut
                .and_then(|c| c.key.strip_prefix(prefix.as_str()))
                .map(|rest| match rest.find('/') {
                    Some(i) => &rest[..=i],
                    None => rest,
                });
            if cut.is_some_and(|c| c.full.contains(&prefix)) {
                self.freshness.note_subtree_too_large(ino);
            }
            // A listing of its own that started after this one's is newer: it stands. What is
            // under it may still be older, and is looked at on the way down.
            if !self.freshness.listed_since(ino, started) {
                let range = Range { after: None, upto };
                let mut page = Page::of(&prefix, page);
                // No later page decides them: the directory's own listing will.
                page.hold_undecided(upto);
                match self.apply_page(ino, &prefix, page, range, epoch_before, started).await {
                    Ok(true) if upto.is_none() => self.freshness.note_listed(ino, started),
                    Ok(true) => {}
                    Ok(false) => continue, // the directory is gone
                    Err(e) if ino == top => return Err(e),
                    // A directory below: it is listed at its own next access.
                    Err(e) => {
                        tracing::warn!(%prefix, error = %e, "applying a subtree listing to a directory in it failed");
                        continue;
                    }
                }
            }
            for sub in subdirs {
                match self.subdir_listed_as(ino, &prefix, &sub) {
                    Ok(Some(child)) => todo.push((child, sub)),
                    Ok(None) => {}
                    Err(e) => {
                        tracing::debug!(prefix = %sub, error = %e, "a directory of a subtree listing left to its own listing")
                    }
                }
            }
        }
        Ok(())
    }

    /// The directory under `dir` (listed as `prefix`) that the listed prefix `sub` is, once
    /// the page of `dir` is applied. Not one whose key is another (a pending move's), nor a
    /// file that keeps its name (pending work), nor one removed meanwhile.
    fn subdir_listed_as(&self, dir: Ino, prefix: &str, sub: &str) -> FsResult<Option<Ino>> {
        let name = sub[prefix.len()..].trim_end_matches('/');
        if !names::listable(name) {
            return Ok(None);
        }
        let Some(child) = self.meta.lookup(dir, name.as_bytes())? else {
            return Ok(None);
        };
        match self.meta.inode(child)? {
            Some(c) if c.kind == Kind::Dir && self.dir_prefix(&c)? == sub => Ok(Some(child)),
            _ => Ok(None),
        }
    }

    /// A listing of `dir` failed: the local view is served.
    fn listing_failed(&self, dir: Ino, prefix: &str, e: StoreError) -> FsResult<()> {
        tracing::warn!(%prefix, error = %e, "listing failed; serving the local view");
        match e {
            StoreError::Unavailable(_) => {
                // Not again before the refresh interval: while S3 is unreachable, every access
                // would otherwise wait for the client's retries (seconds each), for a listing
                // that fails the same way.
                self.freshness.note_listed(dir, self.cfg.clock.now());
                Ok(())
            }
            other => Err(other.into()),
        }
    }

    /// Whether the keys S3 would list under `dir`, judged by the entries known at every depth,
    /// are at most `limit`: a directory counts twice, for its marker. Reads an inode only to
    /// find the subdirectories of a directory that has some.
    fn known_subtree_within(&self, dir: Ino, limit: usize) -> FsResult<bool> {
        let mut stack = vec![dir];
        let mut keys = 1;
        while let Some(d) = stack.pop() {
            let has_subdirs = self.meta.subdirs(d) > 0;
            for ino in self.meta.child_inos(d) {
                let ino = ino?;
                keys += 1;
                if has_subdirs && self.meta.inode(ino)?.is_some_and(|i| i.kind == Kind::Dir) {
                    keys += 1;
                    stack.push(ino);
                }
                if keys > limit {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    /// Applies one page of a listing: adds and updates what it has, forgets the entries of its
    /// range that it lacks. False when the directory no longer exists.
    async fn apply_page(
        &self,
        dir: Ino,
        prefix: &str,
        page: Page,
        range: Range<'_>,
        epoch_before: u64,
        started: std::time::Instant,
    ) -> FsResult<bool> {
        let _g = self.ns.lock().await;
        let Some(dir) = self.meta.inode(dir)? else {
            return Ok(false);
        };
        // Objects that pending work is about to move or delete are not new entries: they are
        // where renamed or removed inodes used to be (the journal indexes them by key, so this
        // costs a lookup per unknown name, not a read of all pending work). A deletion that
        // finished while the listing was under way is in `deleted_since`.
        let ledger = self.uploader.ledger();
        let is_leaving = |key: &str, is_dir: bool| -> FsResult<bool> {
            Ok(ledger.writing(key, is_dir)
                || ledger.deleted_since(key, is_dir, started)
                || self.meta.key_leaving(key, is_dir)?)
        };
        let mut batch = Batch::new();
        let mut seen = HashSet::new();
        let now = Time::now();
        let Page { files, dirs, held } = page;
        seen.extend(held);
        // What S3 has: add or update. A name that is both an object and a prefix is a directory.
        let remote_entries = dirs.iter().map(|n| (n.clone(), None)).chain(
            files
                .into_iter()
                .filter(|(n, _)| !dirs.contains(n))
                .map(|(n, o)| (n, Some(o))),
        );
        for (name, obj) in remote_entries {
            seen.insert(name.clone());
            let existing = self.meta.lookup(dir.ino, name.as_bytes())?;
            let want_kind = if obj.is_none() { Kind::Dir } else { Kind::File };
            let key = match &obj {
                Some(o) => o.key.clone(),
                None => format!("{prefix}{name}/"),
            };
            if existing.is_none() && is_leaving(&key, obj.is_none())? {
                continue;
            }
            if let Some(ino) = existing {
                let Some(inode) = self.meta.inode(ino)? else {
                    continue;
                };
                // Local changes not yet in S3, or newer than this listing. A hard link's name
                // waits for its file's upload as well: until that copies the file onto the name,
                // S3 may still hold whatever was at the name before (a removed file's object whose
                // deletion was spared for the link), which is no other tool's new version.
                if self.waits_for_upload(&inode)? || inode.synced_epoch > epoch_before {
                    continue;
                }
                // Symlinks, special files and hard links are all plain objects in a listing.
                let same_kind = inode.kind == want_kind || (want_kind == Kind::File && inode.kind != Kind::Dir);
                if same_kind {
                    if let Some(o) = obj {
                        self.take_up_version(&mut batch, inode, &o);
                    }
                    continue;
                }
                // A directory that became a file in S3 keeps what is still to go up under it.
                if inode.kind == Kind::Dir && self.subtree_changed_since(ino, epoch_before)? {
                    continue;
                }
                self.forget_subtree(&mut batch, &inode)?;
            }
            let ino = self.alloc_ino_at(&mut batch, || Some(key.clone()));
            let (size, mtime, remote, meta_loaded) = match &obj {
                Some(o) => (
                    o.size,
                    Time::from_secs(o.last_modified),
                    Some(Remote {
                        key: o.key.clone(),
                        etag: o.etag.clone(),
                        size: o.size,
                    }),
                    false,
                ),
                // A directory (a common prefix): its marker object, if it has one, carries its
                // owner and mode; read at first use like a file's, or a fresh gateway would give
                // every directory the defaults.
                None => (
                    0,
                    now,
                    Some(Remote {
                        key: key.clone(),
                        etag: String::new(),
                        size: 0,
                    }),
                    false,
                ),
            };
            let mode = if want_kind == Kind::Dir {
                self.cfg.default_dir_mode
            } else {
                self.cfg.default_file_mode
            };
            let owner = (self.cfg.default_uid, self.cfg.default_gid);
            let mut inode = Inode::new(ino, dir.ino, name.as_bytes(), want_kind, mode, owner, mtime);
            inode.size = size;
            inode.remote = remote;
            inode.meta_loaded = meta_loaded;
            batch.put_inode(&inode);
            batch.link(dir.ino, name.as_bytes(), ino, want_kind);
        }
        // What S3 no longer has (in this page's range): forget, unless local changes are still
        // on their way.
        self.children_in_range(dir.ino, range, |name, ino| {
            let Ok(n) = std::str::from_utf8(&name) else {
                return Ok(());
            };
            if seen.contains(n) {
                return Ok(());
            }
            let Some(inode) = self.meta.inode(ino)? else {
                return Ok(());
            };
            if self.waits_for_upload(&inode)? || inode.synced_epoch > epoch_before {
                return Ok(());
            }
            if inode.kind == Kind::Dir && self.subtree_changed_since(ino, epoch_before)? {
                return Ok(());
            }
            self.forget_subtree(&mut batch, &inode)
        })?;
        if !batch.is_empty() {
            // The kernel client keeps a directory's entries (and its misses) until the
            // directory's attributes change: make them change, or what S3 gained stays unseen.
            self.touch_dir(&mut batch, dir.ino)?;
        }
        self.meta.commit(batch)?;
        Ok(true)
    }

    /// Calls `f` with each child of `dir` whose name, in key form (a directory's with a trailing
    /// '/'), falls in `range`; read from the index a chunk at a time.
    fn children_in_range(
        &self,
        dir: Ino,
        range: Range<'_>,
        mut f: impl FnMut(Vec<u8>, Ino) -> FsResult<()>,
    ) -> FsResult<()> {
        let form = |name: &[u8], ino: Ino| -> FsResult<Vec<u8>> {
            let mut f = name.to_vec();
            if self.meta.inode(ino)?.is_some_and(|i| i.kind == Kind::Dir) {
                f.push(b'/');
            }
            Ok(f)
        };
        let (after, upto) = (range.after.map(str::as_bytes), range.upto.map(str::as_bytes));
        // A directory sorts after its bare name: "d/" can be past `after` though "d" is not, when
        // "d" is a prefix of `after` followed by a byte below '/' ("d" and "d.txt").
        if let Some(a) = after {
            for i in 1..a.len() {
                if a[i] >= b'/' {
                    continue;
                }
                if let Some(ino) = self.meta.lookup(dir, &a[..i])? {
                    let k = form(&a[..i], ino)?;
                    if k.as_slice() > a && upto.is_none_or(|u| k.as_slice() <= u) {
                        f(a[..i].to_vec(), ino)?;
                    }
                }
            }
        }
        let mut from = after.map(<[u8]>::to_vec);
        loop {
            let chunk = self.meta.children_by_name(dir, from.as_deref(), upto, 1024)?;
            let Some(last) = chunk.last() else { break };
            from = Some(last.0.clone());
            for (name, ino) in chunk {
                // Past `upto` in key form though its bare name is not (only a directory whose
                // name is a prefix of `upto` can be): the next page's.
                let past = match upto {
                    Some(u) if u.starts_with(&name) => form(&name, ino)?.as_slice() > u,
                    _ => false,
                };
                if !past {
                    f(name, ino)?;
                }
            }
        }
        Ok(())
    }

    /// Whether S3 may lack `inode`'s object because work on it is pending: its own, or for a
    /// hard link's name its file's (the name's own work is done until the file's upload marks
    /// it pending again, see `sync_link`).
    fn waits_for_upload(&self, inode: &Inode) -> FsResult<bool> {
        if self.meta.pending(inode.ino)?.is_some() {
            return Ok(true);
        }
        Ok(match inode.kind {
            Kind::Link(file) => self.meta.pending(file)?.is_some(),
            _ => false,
        })
    }

    /// Whether anything under `dir` is still to go up to S3, or went up after `epoch_before`
    /// (a listing that began before then may not show it: a directory with no marker object
    /// exists in S3 only through what is under it).
    fn subtree_changed_since(&self, dir: Ino, epoch_before: u64) -> FsResult<bool> {
        let mut stack = vec![dir];
        while let Some(d) = stack.pop() {
            for ino in self.meta.child_inos(d) {
                let ino = ino?;
                let Some(inode) = self.meta.inode(ino)? else {
                    if self.meta.pending(ino)?.is_some() {
                        return Ok(true);
                    }
                    continue;
                };
                if self.waits_for_upload(&inode)? || inode.synced_epoch > epoch_before {
                    return Ok(true);
                }
                if inode.kind == Kind::Dir {
                    stack.push(ino);
                }
            }
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(key: &str) -> ObjectSummary {
        ObjectSummary {
            key: key.to_string(),
            size: 1,
            etag: String::new(),
            last_modified: 0,
        }
    }

    fn keys(page: &ListPage) -> (Vec<&str>, Vec<&str>) {
        (
            page.objects.iter().map(|o| o.key.as_str()).collect(),
            page.prefixes.iter().map(String::as_str).collect(),
        )
    }

    /// Each directory gets what a listing of it with the delimiter '/' would: its own objects
    /// (its marker among them), and each subdirectory's prefix once, however deep the keys.
    #[test]
    fn a_listing_of_a_tree_is_cut_into_the_listings_of_its_directories() {
        let mut listing = [
            "p/",
            "p/a-b",
            "p/a/",
            "p/a/x",
            "p/a/y/z",
            "p/a/y/zz",
            "p/a0",
            "p//odd",
            "p/f",
            "p/f/g",
            "p/.s3nfs-volume.toml",
        ];
        listing.sort(); // as S3 lists
        let mut pages = by_directory("p/", listing.into_iter().map(obj).collect());
        // A name both a file and a prefix is both, as S3 lists it (`Page::of` makes it a
        // directory); the volume record is listed (`Page::of` leaves it out).
        assert_eq!(
            keys(&pages["p/"]),
            (
                vec!["p/", "p/.s3nfs-volume.toml", "p/a-b", "p/a0", "p/f"],
                vec!["p//", "p/a/", "p/f/"]
            )
        );
        assert_eq!(keys(&pages["p/f/"]), (vec!["p/f/g"], vec![]));
        assert_eq!(keys(&pages["p/a/"]), (vec!["p/a/", "p/a/x"], vec!["p/a/y/"]));
        assert_eq!(keys(&pages["p/a/y/"]), (vec!["p/a/y/z", "p/a/y/zz"], vec![]));
        assert_eq!(keys(&pages["p//"]), (vec!["p//odd"], vec![]));
        for p in ["p/", "p/a/", "p/a/y/", "p//", "p/f/"] {
            pages.remove(p);
        }
        assert!(pages.is_empty(), "directories no listing has: {:?}", pages.keys());
    }
}
