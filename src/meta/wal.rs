//! An append-only log of committed batches: `[len u32][crc32 u32][payload]` records.
//!
//! The file is kept zero-filled ahead of its last record ([`PREALLOCATE`] at a time), so an
//! append overwrites blocks that are already on disk: its `fdatasync` then writes the record's
//! block and flushes the disk, without committing the file system's journal for a new size and
//! new blocks (measured on ext4 here: 0.13 ms against 0.22-0.29 ms for an append that grows the
//! file). Replay stops at the first zero header (payloads are never empty) or bad checksum.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

pub struct Wal {
    /// Shared with syncers ([`Wal::handle`]), so an fsync needs neither the log's lock nor a
    /// duplicated descriptor (two system calls per sync).
    file: Arc<File>,
    /// End of the last record: where the next one goes.
    len: u64,
    /// End of the zero-filled space: the file's length.
    allocated: u64,
}

/// How much zeroed space is added at a time when an append reaches the end.
const PREALLOCATE: u64 = 1 << 20;

impl Wal {
    /// Opens the log and returns the payloads of every intact record, in order. A torn or corrupt
    /// tail is cut off: its commit never returned, so nobody was told it happened.
    pub fn open(path: &Path) -> io::Result<(Wal, Vec<Vec<u8>>)> {
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)?;
        let mut buf = Vec::new();
        file.read_to_end(&mut buf)?;
        let mut records = Vec::new();
        let mut pos = 0usize;
        while pos + 8 <= buf.len() {
            let len = u32::from_le_bytes(buf[pos..pos + 4].try_into().unwrap());
            let crc = u32::from_le_bytes(buf[pos + 4..pos + 8].try_into().unwrap());
            let end = pos + 8 + len as usize;
            // Any length the header can hold is taken: a torn or corrupt header is found by
            // running past the file or by the checksum, and a large batch (the move of a
            // directory of half a million files) is a record like any other.
            if len == 0 || end > buf.len() || crc32fast::hash(&buf[pos + 8..end]) != crc {
                break;
            }
            records.push(buf[pos + 8..end].to_vec());
            pos = end;
        }
        let mut allocated = buf.len() as u64;
        if buf[pos..].iter().any(|b| *b != 0) {
            tracing::warn!(
                kept = pos,
                dropped = buf.len() - pos,
                "metadata journal had a torn tail"
            );
            // Cut, not zeroed in place: the next append allocates afresh.
            file.set_len(pos as u64)?;
            allocated = pos as u64;
        }
        Ok((
            Wal {
                file: Arc::new(file),
                len: pos as u64,
                allocated,
            },
            records,
        ))
    }

    /// Appends one record with a single write: when this returns, the record is in the kernel.
    pub fn append(&mut self, payload: &[u8]) -> io::Result<()> {
        assert!(
            !payload.is_empty(),
            "an empty record would read back as the end of the log"
        );
        let len = u32::try_from(payload.len())
            .map_err(|_| io::Error::other(format!("a journal record of {} bytes is too large", payload.len())))?;
        let mut rec = Vec::with_capacity(payload.len() + 8);
        rec.extend_from_slice(&len.to_le_bytes());
        rec.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        rec.extend_from_slice(payload);
        let end = self.len + rec.len() as u64;
        if end > self.allocated {
            self.zero_fill(end.max(self.allocated + PREALLOCATE))?;
        }
        self.file.write_all_at(&rec, self.len)?;
        self.len = end;
        Ok(())
    }

    /// Writes zeros from the current end up to `upto`. Real zeros, not `fallocate`: blocks
    /// allocated unwritten would still need a journal commit when first written.
    fn zero_fill(&mut self, upto: u64) -> io::Result<()> {
        let zeros = vec![0u8; (upto - self.allocated) as usize];
        self.file.write_all_at(&zeros, self.allocated)?;
        self.allocated = upto;
        Ok(())
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Empties the log. The file is cut to nothing (not zeroed in place), so no record of
    /// before can be read back after the new ones.
    pub fn truncate(&mut self) -> io::Result<()> {
        self.file.set_len(0)?;
        self.file.sync_all()?;
        self.len = 0;
        self.allocated = 0;
        Ok(())
    }

    pub fn handle(&self) -> Arc<File> {
        self.file.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record past 64 MiB (once the longest read back: a larger one was taken for a torn
    /// tail, and cut with every record after it) reads back whole.
    #[test]
    fn a_large_record_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w");
        let large: Vec<u8> = (0..(65u32 << 20)).map(|i| (i % 251) as u8).collect();
        {
            let (mut w, _) = Wal::open(&path).unwrap();
            w.append(b"before").unwrap();
            w.append(&large).unwrap();
            w.append(b"after").unwrap();
        }
        let (_, r) = Wal::open(&path).unwrap();
        assert_eq!(r.len(), 3);
        assert!(r[1] == large, "the large record");
        assert_eq!(r[2], b"after");
    }

    #[test]
    fn torn_tail_is_dropped_and_earlier_records_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w");
        let end = {
            let (mut w, r) = Wal::open(&path).unwrap();
            assert!(r.is_empty());
            w.append(b"one").unwrap();
            w.append(b"two").unwrap();
            w.len()
        };
        // A crash in the middle of a third append leaves half a record in the zeroed space.
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[9, 0, 0, 0, 1, 2], end).unwrap();
        let (w, r) = Wal::open(&path).unwrap();
        assert_eq!(r, vec![b"one".to_vec(), b"two".to_vec()]);
        assert_eq!(w.len(), 2 * 11);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 2 * 11, "the torn tail is cut");
        // A flipped byte fails the checksum.
        drop(w);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[9] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let (_, r) = Wal::open(&path).unwrap();
        assert!(r.is_empty());
    }

    #[test]
    fn appends_overwrite_zeroed_space_and_replay_stops_at_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w");
        let (mut w, _) = Wal::open(&path).unwrap();
        w.append(b"first").unwrap();
        let size = std::fs::metadata(&path).unwrap().len();
        assert_eq!(size, PREALLOCATE, "space is zero-filled ahead of the record");
        w.append(b"second").unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), size, "the second append fits");
        drop(w);
        // Reopened, the zeros are the end (not a torn tail), and appending goes on after the
        // records, in the space already there.
        let (mut w, r) = Wal::open(&path).unwrap();
        assert_eq!(r, vec![b"first".to_vec(), b"second".to_vec()]);
        w.append(b"third").unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), size);
        // A record larger than the space left grows the file past it.
        let big = vec![7u8; PREALLOCATE as usize];
        w.append(&big).unwrap();
        assert!(std::fs::metadata(&path).unwrap().len() >= w.len());
        drop(w);
        let (mut w, r) = Wal::open(&path).unwrap();
        assert_eq!(r.len(), 4);
        assert_eq!(r[3], big);
        // Emptied, nothing from before comes back.
        w.truncate().unwrap();
        w.append(b"new").unwrap();
        drop(w);
        let (_, r) = Wal::open(&path).unwrap();
        assert_eq!(r, vec![b"new".to_vec()]);
    }
}
