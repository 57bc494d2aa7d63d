//! An append-only log of committed batches: `[len u32][crc32 u32][payload]` records.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::Arc;

pub struct Wal {
    /// Shared with syncers ([`Wal::handle`]), so an fsync needs neither the log's lock nor a
    /// duplicated descriptor (two system calls per sync).
    file: Arc<File>,
    len: u64,
}

/// Longest record accepted when reading back; anything larger is a torn or corrupt header.
const MAX_RECORD: u32 = 64 << 20;

impl Wal {
    /// Opens the log and returns the payloads of every intact record, in order. A torn or corrupt
    /// tail is cut off: its commit never returned, so nobody was told it happened.
    pub fn open(path: &Path) -> io::Result<(Wal, Vec<Vec<u8>>)> {
        let mut file = OpenOptions::new().create(true).read(true).append(true).open(path)?;
        let mut buf = Vec::new();
        file.read_to_end(&mut buf)?;
        let mut records = Vec::new();
        let mut pos = 0usize;
        while pos + 8 <= buf.len() {
            let len = u32::from_le_bytes(buf[pos..pos + 4].try_into().unwrap());
            let crc = u32::from_le_bytes(buf[pos + 4..pos + 8].try_into().unwrap());
            let end = pos + 8 + len as usize;
            if len > MAX_RECORD || end > buf.len() || crc32fast::hash(&buf[pos + 8..end]) != crc {
                break;
            }
            records.push(buf[pos + 8..end].to_vec());
            pos = end;
        }
        if pos < buf.len() {
            tracing::warn!(
                kept = pos,
                dropped = buf.len() - pos,
                "metadata journal had a torn tail"
            );
            file.set_len(pos as u64)?;
        }
        Ok((
            Wal {
                file: Arc::new(file),
                len: pos as u64,
            },
            records,
        ))
    }

    /// Appends one record with a single write: when this returns, the record is in the kernel.
    pub fn append(&mut self, payload: &[u8]) -> io::Result<()> {
        let mut rec = Vec::with_capacity(payload.len() + 8);
        rec.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        rec.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        rec.extend_from_slice(payload);
        (&*self.file).write_all(&rec)?;
        self.len += rec.len() as u64;
        Ok(())
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn truncate(&mut self) -> io::Result<()> {
        self.file.set_len(0)?;
        self.file.sync_all()?;
        self.len = 0;
        Ok(())
    }

    pub fn handle(&self) -> Arc<File> {
        self.file.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torn_tail_is_dropped_and_earlier_records_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w");
        {
            let (mut w, r) = Wal::open(&path).unwrap();
            assert!(r.is_empty());
            w.append(b"one").unwrap();
            w.append(b"two").unwrap();
        }
        // A crash in the middle of a third append leaves half a record.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[9, 0, 0, 0, 1, 2]).unwrap();
        let (w, r) = Wal::open(&path).unwrap();
        assert_eq!(r, vec![b"one".to_vec(), b"two".to_vec()]);
        assert_eq!(w.len(), 2 * 11);
        // A flipped byte fails the checksum.
        drop(w);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[9] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let (_, r) = Wal::open(&path).unwrap();
        assert!(r.is_empty());
    }
}
