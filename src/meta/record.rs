//! A batch as a journal record: a count, then each operation's key and, for a put, its value,
//! every length a little-endian u64 and an operation's kind one byte (0 delete, 1 put).
//!
//! This is the layout bincode gives the batch's `Vec<(Vec<u8>, Option<Vec<u8>>)>`, so journals
//! written either way read back alike, but written by hand: through serde, bincode encodes a
//! `Vec<u8>` one element at a time, and a small file's bytes (up to 64 KiB, see
//! `fs/bytes_in_journal.rs`) then cost more instructions than everything else in its COMMIT.

use super::{MetaError, MetaResult};

type Op = (Vec<u8>, Option<Vec<u8>>);

pub(super) fn encode(ops: &[Op]) -> Vec<u8> {
    let size = 8 + ops
        .iter()
        .map(|(k, v)| 8 + k.len() + 1 + v.as_ref().map_or(0, |v| 8 + v.len()))
        .sum::<usize>();
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&(ops.len() as u64).to_le_bytes());
    for (key, val) in ops {
        put_bytes(&mut out, key);
        match val {
            None => out.push(0),
            Some(v) => {
                out.push(1);
                put_bytes(&mut out, v);
            }
        }
    }
    out
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u64).to_le_bytes());
    out.extend_from_slice(b);
}

pub(super) fn decode(mut rec: &[u8]) -> MetaResult<Vec<Op>> {
    let n = take_u64(&mut rec)?;
    // Each operation takes at least 9 bytes: a count beyond that is corrupt, and must not
    // reserve memory for it.
    if n > (rec.len() / 9) as u64 {
        return Err(corrupt(format!("{n} operations in a record of {} bytes", rec.len())));
    }
    let mut ops = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let key = take_bytes(&mut rec)?;
        let val = match take(&mut rec, 1)?[0] {
            0 => None,
            1 => Some(take_bytes(&mut rec)?),
            t => return Err(corrupt(format!("operation kind {t}"))),
        };
        ops.push((key, val));
    }
    if !rec.is_empty() {
        return Err(corrupt(format!("{} bytes after the last operation", rec.len())));
    }
    Ok(ops)
}

fn corrupt(what: String) -> MetaError {
    MetaError::Corrupt(format!("journal record: {what}"))
}

fn take<'a>(rec: &mut &'a [u8], n: usize) -> MetaResult<&'a [u8]> {
    if rec.len() < n {
        return Err(corrupt(format!("{n} bytes wanted, {} left", rec.len())));
    }
    let (head, rest) = rec.split_at(n);
    *rec = rest;
    Ok(head)
}

fn take_u64(rec: &mut &[u8]) -> MetaResult<u64> {
    Ok(u64::from_le_bytes(take(rec, 8)?.try_into().expect("8 bytes")))
}

fn take_bytes(rec: &mut &[u8]) -> MetaResult<Vec<u8>> {
    let n = take_u64(rec)?;
    let n = usize::try_from(n).map_err(|_| corrupt(format!("length {n}")))?;
    Ok(take(rec, n)?.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Op> {
        vec![
            (b"I\0\0\0\0\0\0\0\x07".to_vec(), Some(vec![1, 2, 3])),
            (b"N\0".to_vec(), None),
            (Vec::new(), Some(Vec::new())),
            (b"B\0\0\0\0\0\0\0\x09".to_vec(), Some(vec![0xab; 5000])),
        ]
    }

    #[test]
    fn the_layout_is_bincodes_both_ways() {
        let ops = sample();
        let ours = encode(&ops);
        assert_eq!(
            ours,
            bincode::serialize(&ops).unwrap(),
            "journals written before read back"
        );
        assert_eq!(decode(&ours).unwrap(), ops);
        let theirs: Vec<Op> = bincode::deserialize(&ours).unwrap();
        assert_eq!(theirs, ops);
        assert_eq!(decode(&encode(&[])).unwrap(), Vec::<Op>::new());
    }

    #[test]
    fn a_damaged_record_is_an_error_not_a_panic_or_a_huge_allocation() {
        let good = encode(&sample());
        for cut in 0..good.len() {
            assert!(decode(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(decode(&trailing).is_err());
        let mut kind = encode(&[(b"k".to_vec(), None)]);
        *kind.last_mut().unwrap() = 7;
        assert!(decode(&kind).unwrap_err().to_string().contains("kind 7"));
        let mut count = good.clone();
        count[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(decode(&count).is_err());
        let mut len = good;
        len[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(decode(&len).is_err());
    }
}
