//! The embedded default store: objects in a local directory, with S3's key semantics.
//!
//! A naive key-to-path mapping cannot hold `a` beside `a/b`, nor `d/` as an ordinary object,
//! so keys never become paths. Layout under the root:
//!
//! ```text
//! LOCK                          flock'ed while a LocalStore has the root open
//! objects/<ff>/<id>.data        the object's bytes, immutable once written (copies hard-link it)
//! objects/<ff>/<id>.meta        sidecar: key, size, etag, last_modified, user metadata (bincode)
//! tmp/                          files being written; emptied at open
//! uploads/<upload_id>/info      a multipart upload: its key and user metadata
//! uploads/<upload_id>/part-<nnnnn>-<etag>   its parts
//! ```
//!
//! `<id>` is a 16-hex-digit sequence number, unique and increasing within the root; `<ff>` are
//! its last two hex digits (fan-out). The sidecar is the commit point: the data file is written,
//! fsynced and renamed into place first, then the sidecar is written to `tmp/`, fsynced and
//! renamed beside it. A crash therefore never exposes a half-written object. At open the
//! in-memory index (a `BTreeMap` ordered by key bytes, which is S3's listing order) is rebuilt
//! from the sidecars; when a crash left two sidecars for one key the higher id wins, and data
//! files without a sidecar are removed.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::hash::Hasher;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::ops::{Bound, Range};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::UNIX_EPOCH;

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tracing::Instrument;

use super::{Body, ListPage, ObjectMeta, ObjectStore, ObjectSummary, Part, StoreError, StoreResult, UserMeta};

/// S3's longest key, in bytes of UTF-8.
pub const MAX_KEY_LEN: usize = 1024;
/// S3's smallest part, except the last one of an upload.
pub const MIN_PART_SIZE: u64 = 5 * 1024 * 1024;
/// S3's largest single PUT and largest part.
pub const MAX_PUT_SIZE: u64 = 5 * 1024 * 1024 * 1024;
/// S3's part numbers are 1..=10000.
pub const MAX_PART_NUMBER: i32 = 10_000;
/// S3 returns at most 1000 entries per ListObjectsV2 page.
pub const MAX_LIST_KEYS: usize = 1000;

/// Streaming copies go through a buffer of this size: memory stays bounded for any object size.
const CHUNK: usize = 1024 * 1024;
const SIDECAR_VERSION: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
struct Sidecar {
    version: u32,
    key: String,
    size: u64,
    etag: String,
    last_modified: i64,
    user: BTreeMap<String, String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct UploadInfo {
    version: u32,
    key: String,
    user: BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
struct Entry {
    id: u64,
    meta: ObjectMeta,
}

type Index = BTreeMap<Vec<u8>, Entry>;

struct Inner {
    root: PathBuf,
    objects: PathBuf,
    tmp: PathBuf,
    uploads: PathBuf,
    index: Mutex<Index>,
    next_id: AtomicU64,
    /// Upload id -> (key, etag) of uploads completed by this process, so a retried
    /// CompleteMultipartUpload whose first reply was lost succeeds as it does on S3.
    completed: Mutex<HashMap<String, (String, String)>>,
    /// Held (flock) for the store's lifetime: two stores on one root would corrupt each other.
    _lock: File,
}

/// The embedded object store. Cheap to clone; all clones share one index.
#[derive(Clone)]
pub struct LocalStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for LocalStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalStore").field("root", &self.inner.root).finish()
    }
}

impl LocalStore {
    /// Opens (creating if needed) the store rooted at `root`: takes the root's lock, removes
    /// leftovers of interrupted writes and loads the index from the sidecars.
    ///
    /// Blocking: call it before serving, or from `spawn_blocking`.
    pub fn open(root: &Path) -> io::Result<LocalStore> {
        let root = root.to_path_buf();
        fs::create_dir_all(&root)?;
        let objects = root.join("objects");
        let tmp = root.join("tmp");
        let uploads = root.join("uploads");
        for d in [&objects, &tmp, &uploads] {
            fs::create_dir_all(d)?;
        }
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(root.join("LOCK"))?;
        // SAFETY: flock on a file descriptor we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("{} is in use by another store: {e}", root.display()),
            ));
        }

        // Interrupted writes.
        for e in fs::read_dir(&tmp)? {
            let p = e?.path();
            if p.is_dir() {
                fs::remove_dir_all(&p)?;
            } else {
                fs::remove_file(&p)?;
            }
        }

        let mut max_id = 0u64;
        let mut index: Index = BTreeMap::new();
        for fan in fs::read_dir(&objects)? {
            let fan = fan?.path();
            if !fan.is_dir() {
                continue;
            }
            let mut datas: HashMap<u64, PathBuf> = HashMap::new();
            let mut metas: Vec<(u64, PathBuf)> = Vec::new();
            for e in fs::read_dir(&fan)? {
                let p = e?.path();
                let (Some(stem), Some(ext)) = (
                    p.file_stem().and_then(|s| s.to_str()),
                    p.extension().and_then(|s| s.to_str()),
                ) else {
                    continue;
                };
                let Ok(id) = u64::from_str_radix(stem, 16) else {
                    continue;
                };
                max_id = max_id.max(id);
                match ext {
                    "data" => {
                        datas.insert(id, p);
                    }
                    "meta" => metas.push((id, p)),
                    _ => {}
                }
            }
            for (id, meta_path) in metas {
                let sc: Sidecar = match fs::read(&meta_path)
                    .map_err(|e| e.to_string())
                    .and_then(|b| bincode::deserialize(&b).map_err(|e| e.to_string()))
                {
                    Ok(sc) => sc,
                    Err(e) => {
                        tracing::warn!(path = %meta_path.display(), "unreadable sidecar, object skipped: {e}");
                        datas.remove(&id); // keep the data file, for forensics
                        continue;
                    }
                };
                if datas.remove(&id).is_none() {
                    tracing::warn!(key = %sc.key, "object's data file is missing; dropped");
                    fs::remove_file(&meta_path)?;
                    continue;
                }
                let entry = Entry {
                    id,
                    meta: ObjectMeta {
                        key: sc.key.clone(),
                        size: sc.size,
                        etag: sc.etag,
                        last_modified: sc.last_modified,
                        user: sc.user,
                    },
                };
                let kb = sc.key.into_bytes();
                match index.get(&kb) {
                    Some(old) if old.id > id => remove_object_files(&objects, id)?,
                    Some(old) => {
                        remove_object_files(&objects, old.id)?;
                        index.insert(kb, entry);
                    }
                    None => {
                        index.insert(kb, entry);
                    }
                }
            }
            // Data files no sidecar points to: writes interrupted before their commit.
            for (_, p) in datas {
                fs::remove_file(&p)?;
            }
        }
        for e in fs::read_dir(&uploads)? {
            let e = e?;
            if let Some(id) = e.file_name().to_str().and_then(|s| s.get(..16)) {
                if let Ok(id) = u64::from_str_radix(id, 16) {
                    max_id = max_id.max(id);
                }
            }
        }
        tracing::info!(root = %root.display(), objects = index.len(), "local store opened");
        Ok(LocalStore {
            inner: Arc::new(Inner {
                root,
                objects,
                tmp,
                uploads,
                index: Mutex::new(index),
                next_id: AtomicU64::new(max_id + 1),
                completed: Mutex::new(HashMap::new()),
                _lock: lock,
            }),
        })
    }

    /// The directory the store lives in.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// A ranged GET, of version `if_match` only when given.
    async fn get_object(&self, key: &str, range: Range<u64>, if_match: Option<&str>) -> StoreResult<Bytes> {
        let span = tracing::info_span!(
            "s3.request",
            op = "GetObject",
            key = %key,
            range = %format_args!("{}-{}", range.start, range.end),
        );
        let (key, if_match) = (key.to_string(), if_match.map(str::to_string));
        self.run(span, move |s| s.get_range(&key, range, if_match.as_deref()))
            .await
    }

    async fn run<T, F>(&self, span: tracing::Span, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> StoreResult<T> + Send + 'static,
    {
        let inner = self.inner.clone();
        let inner_span = span.clone();
        let res = async move {
            tokio::task::spawn_blocking(move || inner_span.in_scope(|| f(&inner)))
                .await
                .map_err(|e| StoreError::Io(format!("store task failed: {e}")))?
        }
        .instrument(span)
        .await;
        if let Err(e) = &res {
            if !matches!(e, StoreError::NotFound(_)) {
                tracing::debug!(error = %e, "local store request failed");
            }
        }
        res
    }
}

fn remove_object_files(objects: &Path, id: u64) -> io::Result<()> {
    // Sidecar first: once it is gone the object is gone, whatever happens to the data file.
    ignore_missing(fs::remove_file(meta_path(objects, id)))?;
    ignore_missing(fs::remove_file(data_path(objects, id)))
}

fn ignore_missing(r: io::Result<()>) -> io::Result<()> {
    match r {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

fn fan_dir(objects: &Path, id: u64) -> PathBuf {
    objects.join(format!("{:02x}", id & 0xff))
}
fn data_path(objects: &Path, id: u64) -> PathBuf {
    fan_dir(objects, id).join(format!("{id:016x}.data"))
}
fn meta_path(objects: &Path, id: u64) -> PathBuf {
    fan_dir(objects, id).join(format!("{id:016x}.meta"))
}

fn now_secs() -> i64 {
    crate::clock::wall_now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn check_key(key: &str) -> StoreResult<()> {
    if key.is_empty() {
        return Err(StoreError::Invalid("empty key".into()));
    }
    if key.len() > MAX_KEY_LEN {
        return Err(StoreError::Invalid(format!(
            "KeyTooLongError: key of {} bytes, the limit is {MAX_KEY_LEN}",
            key.len()
        )));
    }
    Ok(())
}

/// S3's answer to a request conditional on version `etag` of `key` (`If-Match`, or
/// `x-amz-copy-source-if-match`) when `meta` is another version: `NotFound`.
fn check_version(key: &str, meta: &ObjectMeta, etag: Option<&str>) -> StoreResult<()> {
    match etag {
        Some(e) if e != meta.etag => Err(StoreError::NotFound(format!("{key} (not version {e})"))),
        _ => Ok(()),
    }
}

fn check_upload_id(upload_id: &str) -> StoreResult<()> {
    if upload_id.is_empty() || !upload_id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(StoreError::NotFound(format!("NoSuchUpload: {upload_id}")));
    }
    Ok(())
}

fn check_part_number(number: i32) -> StoreResult<()> {
    if !(1..=MAX_PART_NUMBER).contains(&number) {
        return Err(StoreError::Invalid(format!(
            "InvalidArgument: part number {number} is not in 1..={MAX_PART_NUMBER}"
        )));
    }
    Ok(())
}

/// A file being written, hashing what goes through it. The ETag is a hex of a 128-bit content
/// hash (SipHash 64 + CRC32 + low 32 bits of the length): not MD5, but equal contents give
/// equal ETags, as on S3.
struct HashWriter {
    file: File,
    sip: DefaultHasher,
    crc: crc32fast::Hasher,
    len: u64,
}

impl HashWriter {
    fn create(path: &Path) -> io::Result<HashWriter> {
        Ok(HashWriter {
            file: OpenOptions::new().write(true).create_new(true).open(path)?,
            sip: DefaultHasher::new(),
            crc: crc32fast::Hasher::new(),
            len: 0,
        })
    }

    fn write(&mut self, buf: &[u8]) -> io::Result<()> {
        self.file.write_all(buf)?;
        self.sip.write(buf);
        self.crc.update(buf);
        self.len += buf.len() as u64;
        Ok(())
    }

    /// Copies `len` bytes of `src` from `offset`, a chunk at a time.
    fn copy_from(&mut self, src: &mut File, offset: u64, len: u64, buf: &mut Vec<u8>) -> io::Result<()> {
        src.seek(SeekFrom::Start(offset))?;
        if buf.len() < CHUNK {
            buf.resize(CHUNK, 0);
        }
        let mut left = len;
        while left > 0 {
            let want = left.min(buf.len() as u64) as usize;
            let n = src.read(&mut buf[..want])?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("body file ended {left} bytes short of its length {len}"),
                ));
            }
            self.write(&buf[..n])?;
            left -= n as u64;
        }
        Ok(())
    }

    fn write_body(&mut self, body: &Body) -> io::Result<()> {
        match body {
            Body::Bytes(b) => self.write(b),
            Body::File { path, offset, len } => {
                let mut f = File::open(path)?;
                self.copy_from(&mut f, *offset, *len, &mut Vec::new())
            }
        }
    }

    /// fsyncs the file; returns (size, etag).
    fn finish(self) -> io::Result<(u64, String)> {
        self.file.sync_all()?;
        let etag = format!(
            "{:016x}{:08x}{:08x}",
            self.sip.finish(),
            self.crc.finalize(),
            self.len as u32
        );
        Ok((self.len, etag))
    }
}

/// S3-style multipart ETag: a hash of the parts' ETags, then `-<number of parts>`.
fn multipart_etag(etags: &[&str]) -> String {
    let mut sip = DefaultHasher::new();
    let mut crc = crc32fast::Hasher::new();
    for e in etags {
        sip.write(e.as_bytes());
        crc.update(e.as_bytes());
    }
    format!(
        "{:016x}{:08x}{:08x}-{}",
        sip.finish(),
        crc.finalize(),
        etags.len() as u32,
        etags.len()
    )
}

impl Inner {
    fn new_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn index(&self) -> MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lookup(&self, key: &str) -> Option<Entry> {
        self.index().get(key.as_bytes()).cloned()
    }

    /// Opens the data file of `key`, retrying when a concurrent overwrite removed the file
    /// between the index lookup and the open.
    fn open_data(&self, key: &str) -> StoreResult<(Entry, File)> {
        for _ in 0..8 {
            let Some(entry) = self.lookup(key) else {
                return Err(StoreError::NotFound(key.to_string()));
            };
            match File::open(data_path(&self.objects, entry.id)) {
                Ok(f) => return Ok((entry, f)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(StoreError::Unavailable(format!("{key} kept changing while being read")))
    }

    /// Writes a new data file for `id` from `fill`, fsynced, and moves it into place.
    fn write_data(&self, id: u64, fill: impl FnOnce(&mut HashWriter) -> io::Result<()>) -> StoreResult<(u64, String)> {
        let tmp = self.tmp.join(format!("{id:016x}.data"));
        let res = (|| {
            let mut w = HashWriter::create(&tmp)?;
            fill(&mut w)?;
            let done = w.finish()?;
            self.place_data(&tmp, id)?;
            Ok::<_, io::Error>(done)
        })();
        if res.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        Ok(res?)
    }

    fn place_data(&self, from: &Path, id: u64) -> io::Result<()> {
        let dst = data_path(&self.objects, id);
        match fs::rename(from, &dst) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir_all(fan_dir(&self.objects, id))?;
                fs::rename(from, &dst)
            }
            r => r,
        }
    }

    /// The commit point: writes the sidecar of object `id` (whose data file is in place) and
    /// makes it the current version of `meta.key`, removing the version it replaces.
    fn commit(&self, id: u64, meta: ObjectMeta) -> StoreResult<()> {
        let res = self.commit_inner(id, &meta);
        if res.is_err() {
            let _ = remove_object_files(&self.objects, id);
        }
        res
    }

    fn commit_inner(&self, id: u64, meta: &ObjectMeta) -> StoreResult<()> {
        let sc = Sidecar {
            version: SIDECAR_VERSION,
            key: meta.key.clone(),
            size: meta.size,
            etag: meta.etag.clone(),
            last_modified: meta.last_modified,
            user: meta.user.clone(),
        };
        let bytes = bincode::serialize(&sc).map_err(|e| StoreError::Io(e.to_string()))?;
        let tmp = self.tmp.join(format!("{id:016x}.meta"));
        let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        drop(f);
        if let Err(e) = fs::rename(&tmp, meta_path(&self.objects, id)) {
            let _ = fs::remove_file(&tmp);
            return Err(e.into());
        }
        fsync_dir(&fan_dir(&self.objects, id))?;

        let mut index = self.index();
        let kb = meta.key.as_bytes();
        match index.get(kb) {
            // A concurrent write that started later already won: ours is superseded.
            Some(cur) if cur.id > id => remove_object_files(&self.objects, id)?,
            cur => {
                let old = cur.map(|c| c.id);
                index.insert(kb.to_vec(), Entry { id, meta: meta.clone() });
                // Under the lock, so a later delete cannot leave the old sidecar to resurrect.
                if let Some(old) = old {
                    remove_object_files(&self.objects, old)?;
                }
            }
        }
        Ok(())
    }

    fn put(&self, key: &str, body: &Body, user: &UserMeta) -> StoreResult<String> {
        let id = self.new_id();
        let (size, etag) = self.write_data(id, |w| w.write_body(body))?;
        self.commit(
            id,
            ObjectMeta {
                key: key.to_string(),
                size,
                etag: etag.clone(),
                last_modified: now_secs(),
                user: user.clone(),
            },
        )?;
        Ok(etag)
    }

    fn get_range(&self, key: &str, range: Range<u64>, if_match: Option<&str>) -> StoreResult<Bytes> {
        let (entry, mut f) = self.open_data(key)?;
        // Data files are immutable: the file opened holds the version checked, whatever comes.
        check_version(key, &entry.meta, if_match)?;
        let size = entry.meta.size;
        let start = range.start.min(size);
        let end = range.end.min(size).max(start);
        let len = (end - start) as usize;
        let mut buf = vec![0u8; len];
        f.seek(SeekFrom::Start(start))?;
        f.read_exact(&mut buf)?;
        Ok(Bytes::from(buf))
    }

    fn copy(&self, src: &str, src_etag: Option<&str>, dst: &str, user: &UserMeta) -> StoreResult<String> {
        let id = self.new_id();
        let dst_data = data_path(&self.objects, id);
        // Data files are immutable, so a copy is a hard link; retry if a concurrent overwrite
        // of `src` removed the file we looked up.
        let mut linked = None;
        for _ in 0..8 {
            let Some(entry) = self.lookup(src) else {
                return Err(StoreError::NotFound(src.to_string()));
            };
            check_version(src, &entry.meta, src_etag)?;
            let from = data_path(&self.objects, entry.id);
            let res = fs::hard_link(&from, &dst_data).or_else(|e| match e.kind() {
                io::ErrorKind::NotFound if from.exists() => {
                    fs::create_dir_all(fan_dir(&self.objects, id))?;
                    fs::hard_link(&from, &dst_data)
                }
                _ => Err(e),
            });
            match res {
                Ok(()) => {
                    linked = Some(entry);
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(_) => {
                    // No hard links here (or too many): copy the bytes.
                    let (entry, mut f) = self.open_data(src)?;
                    check_version(src, &entry.meta, src_etag)?;
                    self.write_data(id, |w| w.copy_from(&mut f, 0, entry.meta.size, &mut Vec::new()))?;
                    linked = Some(entry);
                    break;
                }
            }
        }
        let Some(entry) = linked else {
            return Err(StoreError::Unavailable(format!(
                "{src} kept changing while being copied"
            )));
        };
        let etag = entry.meta.etag.clone();
        self.commit(
            id,
            ObjectMeta {
                key: dst.to_string(),
                size: entry.meta.size,
                etag: etag.clone(),
                last_modified: now_secs(),
                user: user.clone(),
            },
        )?;
        Ok(etag)
    }

    fn delete(&self, key: &str) -> StoreResult<()> {
        let mut index = self.index();
        if let Some(e) = index.remove(key.as_bytes()) {
            remove_object_files(&self.objects, e.id)?;
        }
        Ok(())
    }

    fn list(
        &self,
        prefix: &str,
        delimiter: Option<&str>,
        continuation: Option<String>,
        max_keys: usize,
    ) -> StoreResult<ListPage> {
        let delimiter = delimiter.filter(|d| !d.is_empty());
        let max_keys = max_keys.min(MAX_LIST_KEYS);
        let mut page = ListPage::default();
        if max_keys == 0 {
            return Ok(page);
        }
        let index = self.index();
        let token = continuation.map(String::into_bytes);
        let p = prefix.as_bytes();
        // Start at the prefix, or strictly after the token when that is further on.
        let mut lower: Bound<Vec<u8>> = match &token {
            Some(t) if t.as_slice() >= p => Bound::Excluded(t.clone()),
            _ => Bound::Included(p.to_vec()),
        };
        let mut count = 0usize;
        let mut last: Option<String> = None;
        'scan: loop {
            let range = index.range::<[u8], _>((
                match &lower {
                    Bound::Included(v) => Bound::Included(v.as_slice()),
                    Bound::Excluded(v) => Bound::Excluded(v.as_slice()),
                    Bound::Unbounded => Bound::Unbounded,
                },
                Bound::Unbounded,
            ));
            for (k, entry) in range {
                if !k.starts_with(p) {
                    break 'scan;
                }
                let rolled = delimiter.and_then(|d| {
                    let rest = &entry.meta.key[prefix.len()..];
                    rest.find(d).map(|i| &entry.meta.key[..prefix.len() + i + d.len()])
                });
                if let Some(cp) = rolled {
                    // Every key under `cp` rolls up into it: skip them all. No UTF-8 key has
                    // a 0xFF byte, so `cp` + 0xFF is above every key starting with `cp` and
                    // below every other key above `cp`.
                    let mut skip = cp.as_bytes().to_vec();
                    skip.push(0xff);
                    let already = token.as_deref().is_some_and(|t| cp.as_bytes() <= t);
                    if !already {
                        if count == max_keys {
                            page.next = last.take();
                            break 'scan;
                        }
                        page.prefixes.push(cp.to_string());
                        last = Some(cp.to_string());
                        count += 1;
                    }
                    lower = Bound::Excluded(skip);
                    continue 'scan;
                }
                if count == max_keys {
                    page.next = last.take();
                    break 'scan;
                }
                page.objects.push(ObjectSummary {
                    key: entry.meta.key.clone(),
                    size: entry.meta.size,
                    etag: entry.meta.etag.clone(),
                    last_modified: entry.meta.last_modified,
                });
                last = Some(entry.meta.key.clone());
                count += 1;
            }
            break;
        }
        Ok(page)
    }

    fn upload_dir(&self, upload_id: &str) -> PathBuf {
        self.uploads.join(upload_id)
    }

    fn read_upload(&self, key: &str, upload_id: &str) -> StoreResult<UploadInfo> {
        check_upload_id(upload_id)?;
        let bytes = match fs::read(self.upload_dir(upload_id).join("info")) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::NotFound(format!("NoSuchUpload: {upload_id}")))
            }
            Err(e) => return Err(e.into()),
        };
        let info: UploadInfo =
            bincode::deserialize(&bytes).map_err(|e| StoreError::Io(format!("upload {upload_id}: {e}")))?;
        if info.key != key {
            return Err(StoreError::NotFound(format!(
                "NoSuchUpload: {upload_id} is not an upload of {key}"
            )));
        }
        Ok(info)
    }

    fn create_multipart(&self, key: &str, user: &UserMeta) -> StoreResult<String> {
        let id = self.new_id();
        let nonce = crate::clock::wall_now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
            ^ std::process::id().rotate_left(16);
        let upload_id = format!("{id:016x}{nonce:08x}");
        let info = UploadInfo {
            version: SIDECAR_VERSION,
            key: key.to_string(),
            user: user.clone(),
        };
        let bytes = bincode::serialize(&info).map_err(|e| StoreError::Io(e.to_string()))?;
        // Built in tmp/ and renamed, so an upload directory always has its info.
        let tmp_dir = self.tmp.join(&upload_id);
        fs::create_dir(&tmp_dir)?;
        let mut f = File::create(tmp_dir.join("info"))?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        fs::rename(&tmp_dir, self.upload_dir(&upload_id))?;
        Ok(upload_id)
    }

    /// Writes part `number` from `fill` and makes it the upload's part `number`.
    fn put_part(
        &self,
        upload_id: &str,
        number: i32,
        fill: impl FnOnce(&mut HashWriter) -> io::Result<()>,
    ) -> StoreResult<String> {
        let dir = self.upload_dir(upload_id);
        let tmp = dir.join(format!("tmp-{:016x}", self.new_id()));
        let res = (|| {
            let mut w = match HashWriter::create(&tmp) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(StoreError::NotFound(format!("NoSuchUpload: {upload_id}")))
                }
                r => r?,
            };
            fill(&mut w)?;
            let (_, etag) = w.finish()?;
            let name = format!("part-{number:05}-{etag}");
            fs::rename(&tmp, dir.join(&name))?;
            // Replace any earlier upload of this part number.
            let head = format!("part-{number:05}-");
            for e in fs::read_dir(&dir)? {
                let fname = e?.file_name();
                let fname = fname.to_string_lossy();
                if fname.starts_with(&head) && fname != name {
                    ignore_missing(fs::remove_file(dir.join(fname.as_ref())))?;
                }
            }
            Ok(etag)
        })();
        if res.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        res
    }

    fn complete_multipart(&self, key: &str, upload_id: &str, parts: &[Part]) -> StoreResult<String> {
        let info = match self.read_upload(key, upload_id) {
            Ok(info) => info,
            Err(StoreError::NotFound(e)) => {
                // A retry of a completion whose reply was lost: S3 answers it again.
                let done = self.completed.lock().unwrap_or_else(|p| p.into_inner());
                if let Some((k, etag)) = done.get(upload_id) {
                    if k == key && self.lookup(key).is_some_and(|e| &e.meta.etag == etag) {
                        return Ok(etag.clone());
                    }
                }
                return Err(StoreError::NotFound(e));
            }
            Err(e) => return Err(e),
        };
        if parts.is_empty() {
            return Err(StoreError::Invalid(
                "MalformedXML: a multipart upload needs at least one part".into(),
            ));
        }
        let dir = self.upload_dir(upload_id);
        let mut files: Vec<(PathBuf, u64)> = Vec::with_capacity(parts.len());
        let mut prev = 0;
        for (i, part) in parts.iter().enumerate() {
            if part.number <= prev {
                return Err(StoreError::Invalid(
                    "InvalidPartOrder: parts must be in ascending order".into(),
                ));
            }
            prev = part.number;
            let path = dir.join(format!("part-{:05}-{}", part.number, part.etag.trim_matches('"')));
            let size = match fs::metadata(&path) {
                Ok(m) => m.len(),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(StoreError::Invalid(format!(
                        "InvalidPart: part {} with ETag {} was not uploaded",
                        part.number, part.etag
                    )))
                }
                Err(e) => return Err(e.into()),
            };
            if i + 1 < parts.len() && size < MIN_PART_SIZE {
                return Err(StoreError::Invalid(format!(
                    "EntityTooSmall: part {} is {size} bytes; all parts but the last must be at least {MIN_PART_SIZE}",
                    part.number
                )));
            }
            files.push((path, size));
        }
        let id = self.new_id();
        let (size, _) = self.write_data(id, |w| {
            let mut buf = Vec::new();
            for (path, size) in &files {
                let mut f = File::open(path)?;
                w.copy_from(&mut f, 0, *size, &mut buf)?;
            }
            Ok(())
        })?;
        let etags: Vec<&str> = parts.iter().map(|p| p.etag.trim_matches('"')).collect();
        let etag = multipart_etag(&etags);
        self.commit(
            id,
            ObjectMeta {
                key: key.to_string(),
                size,
                etag: etag.clone(),
                last_modified: now_secs(),
                user: info.user,
            },
        )?;
        self.completed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(upload_id.to_string(), (key.to_string(), etag.clone()));
        ignore_missing(fs::remove_dir_all(&dir))?;
        Ok(etag)
    }

    fn abort_multipart(&self, key: &str, upload_id: &str) -> StoreResult<()> {
        match self.read_upload(key, upload_id) {
            Ok(_) => {}
            Err(StoreError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        }
        ignore_missing(fs::remove_dir_all(self.upload_dir(upload_id)))?;
        Ok(())
    }

    fn check(&self) -> StoreResult<()> {
        for d in [&self.objects, &self.tmp, &self.uploads] {
            if !fs::metadata(d)?.is_dir() {
                return Err(StoreError::Io(format!("{} is not a directory", d.display())));
            }
        }
        let probe = self.tmp.join(format!("check-{:016x}", self.new_id()));
        let mut f = File::create(&probe)?;
        f.write_all(b"ok")?;
        drop(f);
        fs::remove_file(&probe)?;
        Ok(())
    }
}

#[async_trait]
impl ObjectStore for LocalStore {
    fn describe(&self) -> String {
        format!("embedded store in {}", self.inner.root.display())
    }

    async fn check(&self) -> StoreResult<()> {
        let span = tracing::info_span!("s3.request", op = "ListObjectsV2", key = "");
        self.run(span, |s| s.check()).await
    }

    async fn head(&self, key: &str) -> StoreResult<Option<ObjectMeta>> {
        let span = tracing::info_span!("s3.request", op = "HeadObject", key = %key);
        // An in-memory lookup: no need for a blocking thread.
        span.in_scope(|| Ok(self.inner.lookup(key).map(|e| e.meta)))
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> StoreResult<Bytes> {
        self.get_object(key, range, None).await
    }

    async fn get_version_range(&self, key: &str, etag: &str, range: Range<u64>) -> StoreResult<Bytes> {
        self.get_object(key, range, Some(etag)).await
    }

    async fn put(&self, key: &str, body: Body, meta: &UserMeta) -> StoreResult<String> {
        let span = tracing::info_span!("s3.request", op = "PutObject", key = %key, bytes = body.len());
        check_key(key)?;
        if body.len() > MAX_PUT_SIZE {
            return Err(StoreError::Invalid(format!(
                "EntityTooLarge: a single PUT takes at most {MAX_PUT_SIZE} bytes"
            )));
        }
        let (key, meta) = (key.to_string(), meta.clone());
        self.run(span, move |s| s.put(&key, &body, &meta)).await
    }

    async fn copy(&self, src: &str, src_etag: Option<&str>, dst: &str, meta: &UserMeta) -> StoreResult<String> {
        let span = tracing::info_span!("s3.request", op = "CopyObject", key = %dst, src = %src);
        check_key(dst)?;
        let (src, etag, dst, meta) = (
            src.to_string(),
            src_etag.map(str::to_string),
            dst.to_string(),
            meta.clone(),
        );
        self.run(span, move |s| s.copy(&src, etag.as_deref(), &dst, &meta))
            .await
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        let span = tracing::info_span!("s3.request", op = "DeleteObject", key = %key);
        let key = key.to_string();
        self.run(span, move |s| s.delete(&key)).await
    }

    async fn list(
        &self,
        prefix: &str,
        delimiter: Option<&str>,
        continuation: Option<String>,
        max_keys: usize,
    ) -> StoreResult<ListPage> {
        let span = tracing::info_span!(
            "s3.request",
            op = "ListObjectsV2",
            key = %prefix,
            delimiter = delimiter.unwrap_or(""),
            max_keys,
        );
        // In-memory and bounded by max_keys (at most 1000 entries): no blocking thread.
        span.in_scope(|| self.inner.list(prefix, delimiter, continuation, max_keys))
    }

    async fn create_multipart(&self, key: &str, meta: &UserMeta) -> StoreResult<String> {
        let span = tracing::info_span!("s3.request", op = "CreateMultipartUpload", key = %key);
        check_key(key)?;
        let (key, meta) = (key.to_string(), meta.clone());
        self.run(span, move |s| s.create_multipart(&key, &meta)).await
    }

    async fn upload_part(&self, key: &str, upload_id: &str, number: i32, body: Body) -> StoreResult<String> {
        let span = tracing::info_span!(
            "s3.request",
            op = "UploadPart",
            key = %key,
            part = number,
            bytes = body.len(),
        );
        check_part_number(number)?;
        if body.len() > MAX_PUT_SIZE {
            return Err(StoreError::Invalid(format!(
                "EntityTooLarge: a part takes at most {MAX_PUT_SIZE} bytes"
            )));
        }
        let (key, upload_id) = (key.to_string(), upload_id.to_string());
        self.run(span, move |s| {
            s.read_upload(&key, &upload_id)?;
            s.put_part(&upload_id, number, |w| w.write_body(&body))
        })
        .await
    }

    async fn upload_part_copy(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        src: &str,
        src_etag: &str,
        range: Range<u64>,
    ) -> StoreResult<String> {
        let span = tracing::info_span!(
            "s3.request",
            op = "UploadPartCopy",
            key = %key,
            part = number,
            src = %src,
            bytes = range.end.saturating_sub(range.start),
        );
        check_part_number(number)?;
        if range.end.saturating_sub(range.start) > MAX_PUT_SIZE {
            return Err(StoreError::Invalid(format!(
                "EntityTooLarge: a part takes at most {MAX_PUT_SIZE} bytes"
            )));
        }
        let (key, upload_id, src, src_etag) = (
            key.to_string(),
            upload_id.to_string(),
            src.to_string(),
            src_etag.to_string(),
        );
        self.run(span, move |s| {
            s.read_upload(&key, &upload_id)?;
            let (entry, mut f) = s.open_data(&src)?;
            check_version(&src, &entry.meta, Some(&src_etag))?;
            if range.start > range.end || range.end > entry.meta.size {
                return Err(StoreError::Invalid(format!(
                    "InvalidRange: {}-{} of {src}, which has {} bytes",
                    range.start, range.end, entry.meta.size
                )));
            }
            s.put_part(&upload_id, number, |w| {
                w.copy_from(&mut f, range.start, range.end - range.start, &mut Vec::new())
            })
        })
        .await
    }

    async fn complete_multipart(&self, key: &str, upload_id: &str, parts: &[Part]) -> StoreResult<String> {
        let span = tracing::info_span!(
            "s3.request",
            op = "CompleteMultipartUpload",
            key = %key,
            parts = parts.len(),
        );
        let (key, upload_id, parts) = (key.to_string(), upload_id.to_string(), parts.to_vec());
        self.run(span, move |s| s.complete_multipart(&key, &upload_id, &parts))
            .await
    }

    async fn abort_multipart(&self, key: &str, upload_id: &str) -> StoreResult<()> {
        let span = tracing::info_span!("s3.request", op = "AbortMultipartUpload", key = %key);
        let (key, upload_id) = (key.to_string(), upload_id.to_string());
        self.run(span, move |s| s.abort_multipart(&key, &upload_id)).await
    }
}
