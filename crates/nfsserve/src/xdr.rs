use std::io::{Read, Write};

use byteorder::{BigEndian, ReadBytesExt, WriteBytesExt};
pub type XDREndian = BigEndian;
use crate::nfs::nfsstring;

/// See https://datatracker.ietf.org/doc/html/rfc1014
#[allow(clippy::upper_case_acronyms)]
pub trait XDR {
    fn serialize<R: Write>(&self, dest: &mut R) -> std::io::Result<()>;
    fn deserialize<R: Read>(&mut self, src: &mut R) -> std::io::Result<()>;
}

/// Serializes a basic enumeration.
/// Casts everything as u32 BigEndian
#[allow(non_camel_case_types)]
#[macro_export]
macro_rules! xdr_enum_serde {
    ($t:ident) => {
        impl XDR for $t {
            fn serialize<R: Write>(&self, dest: &mut R) -> std::io::Result<()> {
                dest.write_u32::<XDREndian>(*self as u32)
            }
            fn deserialize<R: Read>(&mut self, src: &mut R) -> std::io::Result<()> {
                let r: u32 = src.read_u32::<XDREndian>()?;
                if let Some(p) = FromPrimitive::from_u32(r) {
                    *self = p;
                } else {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("Invalid value for {}", stringify!($t)),
                    ));
                }
                Ok(())
            }
        }
    };
}

/// Serializes a bool as a 4 byte big endian integer.
impl XDR for bool {
    fn serialize<R: Write>(&self, dest: &mut R) -> std::io::Result<()> {
        let val: u32 = *self as u32;
        dest.write_u32::<XDREndian>(val)
    }
    fn deserialize<R: Read>(&mut self, src: &mut R) -> std::io::Result<()> {
        let val: u32 = src.read_u32::<XDREndian>()?;
        *self = val > 0;
        Ok(())
    }
}

/// Serializes a i32 as a 4 byte big endian integer.
impl XDR for i32 {
    fn serialize<R: Write>(&self, dest: &mut R) -> std::io::Result<()> {
        dest.write_i32::<XDREndian>(*self)
    }
    fn deserialize<R: Read>(&mut self, src: &mut R) -> std::io::Result<()> {
        *self = src.read_i32::<XDREndian>()?;
        Ok(())
    }
}

/// Serializes a i64 as a 8 byte big endian integer.
impl XDR for i64 {
    fn serialize<R: Write>(&self, dest: &mut R) -> std::io::Result<()> {
        dest.write_i64::<XDREndian>(*self)
    }
    fn deserialize<R: Read>(&mut self, src: &mut R) -> std::io::Result<()> {
        *self = src.read_i64::<XDREndian>()?;
        Ok(())
    }
}

/// Serializes a u32 as a 4 byte big endian integer.
impl XDR for u32 {
    fn serialize<R: Write>(&self, dest: &mut R) -> std::io::Result<()> {
        dest.write_u32::<XDREndian>(*self)
    }
    fn deserialize<R: Read>(&mut self, src: &mut R) -> std::io::Result<()> {
        *self = src.read_u32::<XDREndian>()?;
        Ok(())
    }
}

/// Serializes a u64 as a 8 byte big endian integer.
impl XDR for u64 {
    fn serialize<R: Write>(&self, dest: &mut R) -> std::io::Result<()> {
        dest.write_u64::<XDREndian>(*self)
    }
    fn deserialize<R: Read>(&mut self, src: &mut R) -> std::io::Result<()> {
        *self = src.read_u64::<XDREndian>()?;
        Ok(())
    }
}

impl<const N: usize> XDR for [u8; N] {
    fn serialize<R: Write>(&self, dest: &mut R) -> std::io::Result<()> {
        dest.write_all(self)
    }
    fn deserialize<R: Read>(&mut self, src: &mut R) -> std::io::Result<()> {
        src.read_exact(self)
    }
}

impl XDR for Vec<u8> {
    fn serialize<R: Write>(&self, dest: &mut R) -> std::io::Result<()> {
        assert!(self.len() < u32::MAX as usize);
        let length = self.len() as u32;
        length.serialize(dest)?;
        dest.write_all(self)?;
        // write padding
        let pad = ((4 - length % 4) % 4) as usize;
        let zeros: [u8; 4] = [0, 0, 0, 0];
        if pad > 0 {
            dest.write_all(&zeros[..pad])?;
        }
        Ok(())
    }
    fn deserialize<R: Read>(&mut self, src: &mut R) -> std::io::Result<()> {
        let mut length: u32 = 0;
        length.deserialize(src)?;
        // s3nfs patch: a length longer than any record cannot be true; 0.11.0 allocated it
        // (up to 4 GiB) before finding out.
        check_len(length as usize)?;
        // s3nfs patch: read into spare capacity, not over zeros written first (a WRITE's data
        // was written twice).
        self.clear();
        self.reserve_exact(length as usize);
        let got = src.take(length as u64).read_to_end(self)?;
        if got != length as usize {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        // read padding
        let pad = ((4 - length % 4) % 4) as usize;
        let mut zeros: [u8; 4] = [0, 0, 0, 0];
        src.read_exact(&mut zeros[..pad])?;
        Ok(())
    }
}

/// s3nfs patch: every message comes from one record of at most `MAX_RECORD` bytes.
fn check_len(len: usize) -> std::io::Result<()> {
    if len > crate::rpcwire::MAX_RECORD {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("XDR length {len} is longer than any request"),
        ));
    }
    Ok(())
}

impl XDR for nfsstring {
    fn serialize<R: Write>(&self, dest: &mut R) -> std::io::Result<()> {
        self.0.serialize(dest)
    }
    fn deserialize<R: Read>(&mut self, src: &mut R) -> std::io::Result<()> {
        self.0.deserialize(src)
    }
}

impl XDR for Vec<u32> {
    fn serialize<R: Write>(&self, dest: &mut R) -> std::io::Result<()> {
        assert!(self.len() < u32::MAX as usize);
        let length = self.len() as u32;
        length.serialize(dest)?;
        for i in self {
            i.serialize(dest)?;
        }
        Ok(())
    }
    fn deserialize<R: Read>(&mut self, src: &mut R) -> std::io::Result<()> {
        let mut length: u32 = 0;
        length.deserialize(src)?;
        check_len(length as usize * 4)?;
        self.resize(length as usize, 0);
        for i in self {
            i.deserialize(src)?;
        }
        Ok(())
    }
}

#[allow(non_camel_case_types)]
#[macro_export]
macro_rules! xdr_struct {
    (
        $t:ident,
        $($element:ident),*
    ) => {
        impl XDR for $t {
            fn serialize<R: Write>(&self, dest: &mut R) -> std::io::Result<()> {
                $(self.$element.serialize(dest)?;)*
                Ok(())
            }
            fn deserialize<R: Read>(&mut self, src: &mut R) -> std::io::Result<()> {
                $(self.$element.deserialize(src)?;)*
                Ok(())
            }
        }
    };
}

/// This macro only handles XDR Unions of the form
///       union pre_op_attr switch (bool attributes_follow) {
///       case TRUE:
///            wcc_attr  attributes;
///       case FALSE:
///            void;
///       };
/// This is translated to
///       enum pre_op_attr  {
///          Void,
///          attributes(wcc_attr)
///       }
/// The serde methods can be generated with XDRBoolUnion(pre_op_attr, attributes, wcc_attr)
/// The "true" type must have the Default trait
#[allow(non_camel_case_types)]
#[macro_export]
macro_rules! xdr_bool_union {
    (
        $t:ident, $enumcase:ident, $enumtype:ty
    ) => {
        impl XDR for $t {
            fn serialize<R: Write>(&self, dest: &mut R) -> std::io::Result<()> {
                match self {
                    $t::Void => {
                        false.serialize(dest)?;
                    }
                    $t::$enumcase(v) => {
                        true.serialize(dest)?;
                        v.serialize(dest)?;
                    }
                }
                Ok(())
            }
            fn deserialize<R: Read>(&mut self, src: &mut R) -> std::io::Result<()> {
                let mut c: bool = false;
                c.deserialize(src)?;
                if c == false {
                    *self = $t::Void;
                } else {
                    let mut r = <$enumtype>::default();
                    r.deserialize(src)?;
                    *self = $t::$enumcase(r);
                }
                Ok(())
            }
        }
    };
}

pub(crate) use xdr_bool_union;
pub(crate) use xdr_enum_serde;
pub(crate) use xdr_struct;

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use super::*;
    use crate::nfs;
    use crate::rpcwire::MAX_RECORD;

    fn bytes_of<T: XDR>(v: &T) -> Vec<u8> {
        let mut out = Vec::new();
        v.serialize(&mut out).unwrap();
        out
    }

    /// Decodes `bytes` into `T`, requiring every byte to be consumed.
    fn decode<T: XDR + Default>(bytes: &[u8]) -> std::io::Result<T> {
        let mut c = Cursor::new(bytes);
        let mut v = T::default();
        v.deserialize(&mut c)?;
        assert_eq!(c.position() as usize, bytes.len(), "bytes left over");
        Ok(v)
    }

    /// Encodes, decodes and encodes again: both encodings are the same bytes.
    fn round_trip<T: XDR + Default>(v: &T) -> T {
        let first = bytes_of(v);
        let back: T = decode(&first).unwrap();
        assert_eq!(bytes_of(&back), first);
        back
    }

    #[test]
    fn integers_are_big_endian_and_round_trip() {
        assert_eq!(bytes_of(&0x0102_0304u32), [1, 2, 3, 4]);
        assert_eq!(bytes_of(&-2i32), [0xff, 0xff, 0xff, 0xfe]);
        assert_eq!(bytes_of(&0x0102_0304_0506_0708u64), [1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(round_trip(&u64::MAX), u64::MAX);
        assert_eq!(round_trip(&i64::MIN), i64::MIN);
        assert_eq!(bytes_of(&true), [0, 0, 0, 1]);
        assert!(round_trip(&true));
        assert!(!round_trip(&false));
    }

    #[test]
    fn opaque_is_padded_to_four_bytes() {
        for len in 0..9usize {
            let v: Vec<u8> = (1..=len as u8).collect();
            let b = bytes_of(&v);
            assert_eq!(b.len(), 4 + len.div_ceil(4) * 4, "length {len}");
            assert_eq!(&b[..4], (len as u32).to_be_bytes());
            assert!(b[4 + len..].iter().all(|&z| z == 0), "padding is zeros");
            assert_eq!(round_trip(&v), v);
        }
    }

    #[test]
    fn fixed_arrays_strings_and_lists_round_trip() {
        let verf: [u8; 8] = [9, 8, 7, 6, 5, 4, 3, 2];
        assert_eq!(bytes_of(&verf), verf, "a fixed array has no length");
        assert_eq!(round_trip(&verf), verf);
        let name = nfs::nfsstring(b"hello".to_vec());
        assert_eq!(round_trip(&name).0, b"hello");
        let gids: Vec<u32> = vec![0, 1, 65534, u32::MAX];
        assert_eq!(bytes_of(&gids).len(), 4 + 4 * 4);
        assert_eq!(round_trip(&gids), gids);
    }

    #[test]
    fn structs_enums_and_unions_round_trip() {
        let attr = nfs::fattr3 {
            ftype: nfs::ftype3::NF3LNK,
            mode: 0o755,
            nlink: 2,
            uid: 1000,
            gid: 100,
            size: 1 << 40,
            fileid: 42,
            ..Default::default()
        };
        let back = round_trip(&attr);
        assert!(matches!(back.ftype, nfs::ftype3::NF3LNK));
        assert_eq!(
            (back.mode, back.uid, back.size, back.fileid),
            (0o755, 1000, 1 << 40, 42)
        );

        match round_trip(&nfs::post_op_attr::attributes(attr)) {
            nfs::post_op_attr::attributes(a) => assert_eq!(a.fileid, 42),
            nfs::post_op_attr::Void => panic!("attributes lost"),
        }
        assert_eq!(bytes_of(&nfs::post_op_attr::Void), [0, 0, 0, 0]);

        let args = nfs::diropargs3 {
            dir: nfs::nfs_fh3 { data: vec![1, 2, 3] },
            name: b"x".as_slice().into(),
        };
        let back = round_trip(&args);
        assert_eq!((back.dir.data, back.name.0), (vec![1, 2, 3], b"x".to_vec()));
        let mut stat = nfs::nfsstat3::NFS3_OK;
        stat.deserialize(&mut Cursor::new(bytes_of(&nfs::nfsstat3::NFS3ERR_NOTEMPTY)))
            .unwrap();
        assert_eq!(stat as u32, nfs::nfsstat3::NFS3ERR_NOTEMPTY as u32);
    }

    #[test]
    fn an_enum_value_out_of_range_is_refused() {
        let e = decode::<nfs::ftype3>(&99u32.to_be_bytes()).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
        let mut stat = nfs::nfsstat3::NFS3_OK;
        assert!(stat.deserialize(&mut Cursor::new(12345u32.to_be_bytes())).is_err());
    }

    #[test]
    fn an_opaque_longer_than_any_record_is_refused_before_allocating() {
        // 4 GiB - 1 announced, nothing following: refused for its length, not for the missing bytes.
        let e = decode::<Vec<u8>>(&u32::MAX.to_be_bytes()).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
        let just_over = (MAX_RECORD as u32 + 1).to_be_bytes();
        assert_eq!(
            decode::<Vec<u8>>(&just_over).unwrap_err().kind(),
            std::io::ErrorKind::InvalidData
        );
        // The same bound holds for strings (file names, paths) and lists.
        assert_eq!(
            decode::<nfs::nfsstring>(&just_over).unwrap_err().kind(),
            std::io::ErrorKind::InvalidData
        );
        let list = ((MAX_RECORD / 4) as u32 + 1).to_be_bytes();
        assert_eq!(
            decode::<Vec<u32>>(&list).unwrap_err().kind(),
            std::io::ErrorKind::InvalidData
        );
        // At the bound, the length is believed and the missing bytes are what fails.
        let at = (MAX_RECORD as u32).to_be_bytes();
        assert_eq!(
            decode::<Vec<u8>>(&at).unwrap_err().kind(),
            std::io::ErrorKind::UnexpectedEof
        );
    }

    #[test]
    fn truncated_input_is_an_error_not_a_short_value() {
        assert!(decode::<u32>(&[0, 0, 1]).is_err());
        assert!(decode::<u64>(&[0; 7]).is_err());
        // An opaque of 10 bytes with 5 present.
        let mut b = 10u32.to_be_bytes().to_vec();
        b.extend_from_slice(b"abcde");
        assert_eq!(
            decode::<Vec<u8>>(&b).unwrap_err().kind(),
            std::io::ErrorKind::UnexpectedEof
        );
        // All the data but not the padding.
        let mut b = 3u32.to_be_bytes().to_vec();
        b.extend_from_slice(b"abc");
        assert!(decode::<Vec<u8>>(&b).is_err());
        // A list announcing 3 items with 2 present.
        let mut b = 3u32.to_be_bytes().to_vec();
        b.extend_from_slice(&[0; 8]);
        assert!(decode::<Vec<u32>>(&b).is_err());
        // A union whose arm is missing.
        assert!(decode::<nfs::post_op_attr>(&1u32.to_be_bytes()).is_err());
        // A struct cut in its middle.
        let whole = bytes_of(&nfs::fattr3::default());
        assert!(decode::<nfs::fattr3>(&whole[..whole.len() - 1]).is_err());
    }
}
