//! Local staging: one file on disk per inode whose bytes are held locally (new or modified
//! files, and files recently uploaded, until evicted). A WRITE is a `pwrite` into it, so once the
//! reply is sent the bytes are in the kernel and survive a crash of the gateway.
//!
//! A staged file is always a complete copy of the file: its length is the file's size.

use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use crate::meta::{Ino, Time};

/// State of a multipart upload streaming a large staged file to S3 while it is written.
#[derive(Debug, Default)]
pub struct Multipart {
    pub key: String,
    pub upload_id: String,
    /// Uploaded parts: number → (ETag, length). A part is only here while its bytes are
    /// unchanged since they were read for upload (writes remove the parts they touch); the length
    /// tells whether a part uploaded short, as the last one, still fits the file's size.
    pub done: std::collections::BTreeMap<i32, (String, u64)>,
    /// Parts being uploaded now.
    pub in_flight: BTreeSet<i32>,
    /// Parts written to since their upload started: their upload's result is thrown away.
    pub dirtied: BTreeSet<i32>,
}

pub struct Staged {
    pub ino: Ino,
    pub path: PathBuf,
    file: File,
    /// Writers take it shared; whoever needs a consistent view of the whole file (a snapshot for
    /// upload, truncation, eviction) takes it exclusively.
    pub lock: tokio::sync::RwLock<()>,
    size: AtomicU64,
    /// Bumped by every change of the bytes.
    gen: AtomicU64,
    /// The bytes differ from what S3 holds.
    pub content_dirty: AtomicBool,
    /// A `P` record is committed for this inode since its last upload.
    pub pending_marked: AtomicBool,
    /// Set when the staged copy is dropped (file removed or evicted); holders must look again.
    pub gone: AtomicBool,
    pub mtime: Mutex<Time>,
    pub last_write: Mutex<Instant>,
    pub multipart: Mutex<Option<Multipart>>,
    /// Held while the multipart upload is started or restarted, so concurrent passes share one.
    pub multipart_init: tokio::sync::Mutex<()>,
    /// Written since the last fsync (see `Volume::sync_local`).
    pub unsynced: AtomicBool,
    /// Signalled whenever a part upload ends.
    pub part_done: tokio::sync::Notify,
    /// Part size of the multipart upload, to map written ranges to part numbers.
    part_size: u64,
}

impl Staged {
    pub fn open(ino: Ino, path: PathBuf, create: bool, part_size: u64) -> std::io::Result<Staged> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .open(&path)?;
        let md = file.metadata()?;
        let mtime = md
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| Time {
                secs: d.as_secs() as i64,
                nanos: d.subsec_nanos(),
            })
            .unwrap_or_else(Time::now);
        Ok(Staged {
            ino,
            path,
            file,
            lock: tokio::sync::RwLock::new(()),
            size: AtomicU64::new(md.len()),
            gen: AtomicU64::new(0),
            content_dirty: AtomicBool::new(false),
            pending_marked: AtomicBool::new(false),
            gone: AtomicBool::new(false),
            mtime: Mutex::new(mtime),
            last_write: Mutex::new(Instant::now()),
            multipart: Mutex::new(None),
            multipart_init: tokio::sync::Mutex::new(()),
            part_done: tokio::sync::Notify::new(),
            unsynced: AtomicBool::new(false),
            part_size,
        })
    }

    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    pub fn gen(&self) -> u64 {
        self.gen.load(Ordering::Acquire)
    }

    pub fn mtime(&self) -> Time {
        *self.mtime.lock().unwrap()
    }

    /// Writes `data` at `offset`. The caller holds `lock` shared.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.file.write_all_at(data, offset)?;
        self.size.fetch_max(offset + data.len() as u64, Ordering::AcqRel);
        self.touched(offset, data.len() as u64);
        Ok(())
    }

    /// Sets the length. The caller holds `lock` exclusively.
    pub fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.file.set_len(len)?;
        self.size.store(len, Ordering::Release);
        // Shrinking invalidates the part layout; growing changes the last part. Start over.
        if let Some(m) = self.multipart.lock().unwrap().as_mut() {
            m.done.clear();
            let in_flight = m.in_flight.clone();
            m.dirtied.extend(in_flight);
        }
        self.touched(0, 0);
        Ok(())
    }

    fn touched(&self, offset: u64, len: u64) {
        self.gen.fetch_add(1, Ordering::AcqRel);
        self.content_dirty.store(true, Ordering::Release);
        *self.mtime.lock().unwrap() = Time::now();
        *self.last_write.lock().unwrap() = Instant::now();
        if len > 0 {
            if let Some(m) = self.multipart.lock().unwrap().as_mut() {
                let first = (offset / self.part_size) as i32 + 1;
                let last = ((offset + len - 1) / self.part_size) as i32 + 1;
                for p in first..=last {
                    m.done.remove(&p);
                    m.dirtied.insert(p);
                }
            }
        }
    }

    pub fn read_at(&self, offset: u64, count: u32) -> std::io::Result<(Vec<u8>, bool)> {
        let size = self.size();
        if offset >= size {
            return Ok((Vec::new(), true));
        }
        let n = (size - offset).min(count as u64) as usize;
        let mut buf = vec![0u8; n];
        let mut read = 0;
        while read < n {
            let r = self.file.read_at(&mut buf[read..], offset + read as u64)?;
            if r == 0 {
                break;
            }
            read += r;
        }
        buf.truncate(read);
        Ok((buf, offset + read as u64 >= size))
    }

    pub fn sync(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }
}
