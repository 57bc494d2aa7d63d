//! WRITE, COMMIT and CREATE.
use std::io::{Cursor, Read, Write};

use byteorder::{ReadBytesExt, WriteBytesExt};
use num_derive::{FromPrimitive, ToPrimitive};
use num_traits::cast::FromPrimitive;
use tracing::{debug, warn};

use super::{post_op, pre_op};
use crate::context::RPCContext;
use crate::nfs;
use crate::rpc::*;
use crate::vfs::{CallContext, VFSCapabilities};
use crate::xdr::*;

// s3nfs patch: stable_how moved to nfs.rs (the VFS trait uses it).
pub use crate::nfs::stable_how;

/// s3nfs patch: WRITE3args up to its data; the data itself is taken as a slice of the record
/// (see [`nfsproc3_write`]), not copied out of it.
#[allow(non_camel_case_types)]
#[derive(Debug, Default)]
struct WRITE3head {
    file: nfs::nfs_fh3,
    offset: nfs::offset3,
    count: nfs::count3,
    stable: u32,
}
xdr_struct!(WRITE3head, file, offset, count, stable);

/// s3nfs patch: the `opaque data<>` that ends WRITE3args, as a slice of the record: a WRITE's
/// bytes went from the record into a vector of their own before reaching the file system, a
/// copy of every byte written. An error (the connection is closed) if the record ends before
/// the data and its padding do, as when the data was read into a vector.
fn data_in_record(input: &mut Cursor<impl AsRef<[u8]>>) -> std::io::Result<&[u8]> {
    let mut len: u32 = 0;
    len.deserialize(input)?;
    let start = input.position() as usize;
    let end = start.checked_add(len as usize);
    let padded = end.and_then(|e| e.checked_add((4 - len as usize % 4) % 4));
    match (end, padded) {
        (Some(end), Some(padded)) if padded <= input.get_ref().as_ref().len() => {
            input.set_position(padded as u64);
            Ok(&input.get_ref().as_ref()[start..end])
        }
        _ => Err(std::io::ErrorKind::UnexpectedEof.into()),
    }
}

#[allow(non_camel_case_types)]
#[derive(Debug, Default)]
struct WRITE3resok {
    file_wcc: nfs::wcc_data,
    count: nfs::count3,
    committed: stable_how,
    verf: nfs::writeverf3,
}
xdr_struct!(WRITE3resok, file_wcc, count, committed, verf);
/*
enum stable_how {
    UNSTABLE = 0,
    DATA_SYNC = 1,
    FILE_SYNC = 2
};


struct WRITE3args {
    nfs_fh3 file;
    offset3 offset;
    count3 count;
    stable_how stable;
    opaque data<>;
};

struct WRITE3resok {
    wcc_data file_wcc;
    count3 count;
    stable_how committed;
    writeverf3 verf;
};


struct WRITE3resfail {
    wcc_data file_wcc;
};


union WRITE3res switch (nfsstat3 status) {
    case NFS3_OK:
        WRITE3resok resok;
    default:
        WRITE3resfail resfail;
};

 */
pub async fn nfsproc3_write(
    xid: u32,
    input: &mut Cursor<impl AsRef<[u8]>>,
    output: &mut impl Write,
    context: &RPCContext,
    cx: &CallContext,
) -> Result<(), anyhow::Error> {
    // if we do not have write capabilities
    if !matches!(context.vfs.capabilities(), VFSCapabilities::ReadWrite) {
        warn!("No write capabilities.");
        make_success_reply(xid).serialize(output)?;
        nfs::nfsstat3::NFS3ERR_ROFS.serialize(output)?;
        nfs::wcc_data::default().serialize(output)?;
        return Ok(());
    }

    let mut args = WRITE3head::default();
    args.deserialize(input)?;
    let data = data_in_record(input)?;
    debug!("nfsproc3_write({:?},...) ", xid);
    // sanity check the length
    if data.len() != args.count as usize {
        garbage_args_reply_message(xid).serialize(output)?;
        return Ok(());
    }

    let id = context.vfs.fh_to_id(cx, &args.file).await;
    if let Err(stat) = id {
        make_success_reply(xid).serialize(output)?;
        stat.serialize(output)?;
        nfs::wcc_data::default().serialize(output)?;
        return Ok(());
    }
    let id = id.unwrap();

    // get the object attributes before the write
    let pre_obj_attr = match context.vfs.reply_attr(cx, id).await {
        Ok(v) => {
            let wccattr = nfs::wcc_attr {
                size: v.size,
                mtime: v.mtime,
                ctime: v.ctime,
            };
            nfs::pre_op_attr::attributes(wccattr)
        }
        Err(_) => nfs::pre_op_attr::Void,
    };

    // s3nfs patch: the client's `stable` reaches the filesystem, which says what it achieved.
    let stable = stable_how::from_u32(args.stable).unwrap_or(stable_how::FILE_SYNC);
    match context.vfs.write_stable(cx, id, args.offset, data, stable).await {
        Ok((fattr, committed)) => {
            debug!("write success {:?} --> {:?}", xid, fattr);
            let res = WRITE3resok {
                file_wcc: nfs::wcc_data {
                    before: pre_obj_attr,
                    after: nfs::post_op_attr::attributes(fattr),
                },
                count: args.count,
                committed,
                verf: context.vfs.write_verifier(),
            };
            make_success_reply(xid).serialize(output)?;
            nfs::nfsstat3::NFS3_OK.serialize(output)?;
            res.serialize(output)?;
        }
        Err(stat) => {
            debug!("write error {:?} --> {:?}", xid, stat);
            make_success_reply(xid).serialize(output)?;
            stat.serialize(output)?;
            nfs::wcc_data::default().serialize(output)?;
        }
    }
    Ok(())
}

/*
 COMMIT3res NFSPROC3_COMMIT(COMMIT3args) = 21;

 struct COMMIT3args { nfs_fh3 file; offset3 offset; count3 count; };
 struct COMMIT3resok { wcc_data file_wcc; writeverf3 verf; };
 struct COMMIT3resfail { wcc_data file_wcc; };
*/
pub async fn nfsproc3_commit(
    xid: u32,
    input: &mut impl Read,
    output: &mut impl Write,
    context: &RPCContext,
    cx: &CallContext,
) -> Result<(), anyhow::Error> {
    let mut file = nfs::nfs_fh3::default();
    file.deserialize(input)?;
    let mut offset: nfs::offset3 = 0;
    offset.deserialize(input)?;
    let mut count: nfs::count3 = 0;
    count.deserialize(input)?;
    debug!("nfsproc3_commit({:?}, {:?}, {}, {})", xid, file, offset, count);
    let id = match context.vfs.fh_to_id(cx, &file).await {
        Ok(id) => id,
        Err(stat) => {
            make_success_reply(xid).serialize(output)?;
            stat.serialize(output)?;
            nfs::wcc_data::default().serialize(output)?;
            return Ok(());
        }
    };
    let before = pre_op(context, cx, id).await;
    let res = context.vfs.commit(cx, id, offset, count).await;
    make_success_reply(xid).serialize(output)?;
    match res {
        Ok(fattr) => {
            nfs::nfsstat3::NFS3_OK.serialize(output)?;
            nfs::wcc_data {
                before,
                after: nfs::post_op_attr::attributes(fattr),
            }
            .serialize(output)?;
            context.vfs.write_verifier().serialize(output)?;
        }
        Err(stat) => {
            stat.serialize(output)?;
            nfs::wcc_data {
                before,
                after: post_op(context, cx, id).await,
            }
            .serialize(output)?;
        }
    }
    Ok(())
}

#[allow(non_camel_case_types)]
#[derive(Copy, Clone, Debug, Default, FromPrimitive, ToPrimitive)]
#[repr(u32)]
pub enum createmode3 {
    #[default]
    UNCHECKED = 0,
    GUARDED = 1,
    EXCLUSIVE = 2,
}
xdr_enum_serde!(createmode3);
/*
CREATE3res NFSPROC3_CREATE(CREATE3args) = 8;

      enum createmode3 {
           UNCHECKED = 0,
           GUARDED   = 1,
           EXCLUSIVE = 2
      };

      union createhow3 switch (createmode3 mode) {
      case UNCHECKED:
      case GUARDED:
           sattr3       obj_attributes;
      case EXCLUSIVE:
           createverf3  verf;
      };

      struct CREATE3args {
           diropargs3   where;
           createhow3   how;
      };

      struct CREATE3resok {
           post_op_fh3   obj;
           post_op_attr  obj_attributes;
           wcc_data      dir_wcc;
      };

      struct CREATE3resfail {
           wcc_data      dir_wcc;
      };

      union CREATE3res switch (nfsstat3 status) {
      case NFS3_OK:
           CREATE3resok    resok;
      default:
           CREATE3resfail  resfail;
      };
*/

pub async fn nfsproc3_create(
    xid: u32,
    input: &mut impl Read,
    output: &mut impl Write,
    context: &RPCContext,
    cx: &CallContext,
) -> Result<(), anyhow::Error> {
    // if we do not have write capabilities
    if !matches!(context.vfs.capabilities(), VFSCapabilities::ReadWrite) {
        warn!("No write capabilities.");
        make_success_reply(xid).serialize(output)?;
        nfs::nfsstat3::NFS3ERR_ROFS.serialize(output)?;
        nfs::wcc_data::default().serialize(output)?;
        return Ok(());
    }

    let mut dirops = nfs::diropargs3::default();
    dirops.deserialize(input)?;
    let mut createhow = createmode3::default();
    createhow.deserialize(input)?;

    debug!("nfsproc3_create({:?}, {:?}, {:?}) ", xid, dirops, createhow);

    // find the directory we are supposed to create the
    // new file in
    let dirid = context.vfs.fh_to_id(cx, &dirops.dir).await;
    if let Err(stat) = dirid {
        // directory does not exist
        make_success_reply(xid).serialize(output)?;
        stat.serialize(output)?;
        nfs::wcc_data::default().serialize(output)?;
        debug!("Directory does not exist");
        return Ok(());
    }
    // found the directory, get the attributes
    let dirid = dirid.unwrap();

    // get the object attributes before the write
    let pre_dir_attr = match context.vfs.reply_attr(cx, dirid).await {
        Ok(v) => {
            let wccattr = nfs::wcc_attr {
                size: v.size,
                mtime: v.mtime,
                ctime: v.ctime,
            };
            nfs::pre_op_attr::attributes(wccattr)
        }
        Err(stat) => {
            debug!("Cannot stat directory");
            make_success_reply(xid).serialize(output)?;
            stat.serialize(output)?;
            nfs::wcc_data::default().serialize(output)?;
            return Ok(());
        }
    };
    let mut target_attributes = nfs::sattr3::default();
    let mut verifier: nfs::createverf3 = [0; nfs::NFS3_CREATEVERFSIZE as usize];

    match createhow {
        createmode3::UNCHECKED => {
            target_attributes.deserialize(input)?;
            debug!("create unchecked {:?}", target_attributes);
        }
        createmode3::GUARDED => {
            target_attributes.deserialize(input)?;
            debug!("create guarded {:?}", target_attributes);
            if context.vfs.lookup(cx, dirid, &dirops.name).await.is_ok() {
                // file exists. Fail with NFS3ERR_EXIST.
                // Re-read dir attributes
                // for post op attr
                let post_dir_attr = match context.vfs.reply_attr(cx, dirid).await {
                    Ok(v) => nfs::post_op_attr::attributes(v),
                    Err(_) => nfs::post_op_attr::Void,
                };

                make_success_reply(xid).serialize(output)?;
                nfs::nfsstat3::NFS3ERR_EXIST.serialize(output)?;
                nfs::wcc_data {
                    before: pre_dir_attr,
                    after: post_dir_attr,
                }
                .serialize(output)?;
                return Ok(());
            }
        }
        createmode3::EXCLUSIVE => {
            // s3nfs patch: the verifier reaches the file system (it was left unread).
            verifier.deserialize(input)?;
            debug!("create exclusive");
        }
    }

    // s3nfs patch: an exclusive CREATE's reply carries the new file's attributes too, as in
    // the other modes. Without them the Linux client sent a GETATTR after every exclusive
    // CREATE (every O_EXCL open: each relation file PostgreSQL makes).
    let res = if matches!(createhow, createmode3::EXCLUSIVE) {
        context.vfs.create_exclusive(cx, dirid, &dirops.name, verifier).await
    } else {
        context.vfs.create(cx, dirid, &dirops.name, target_attributes).await
    };
    let fid = res.map(|x| x.0);
    let postopattr = match res {
        Ok((_, fattr)) => nfs::post_op_attr::attributes(fattr),
        Err(_) => nfs::post_op_attr::Void,
    };

    // Re-read dir attributes for post op attr
    let post_dir_attr = match context.vfs.reply_attr(cx, dirid).await {
        Ok(v) => nfs::post_op_attr::attributes(v),
        Err(_) => nfs::post_op_attr::Void,
    };
    let wcc_res = nfs::wcc_data {
        before: pre_dir_attr,
        after: post_dir_attr,
    };

    match fid {
        Ok(fid) => {
            debug!("create success --> {:?}, {:?}", fid, postopattr);
            make_success_reply(xid).serialize(output)?;
            nfs::nfsstat3::NFS3_OK.serialize(output)?;
            // serialize CREATE3resok
            let fh = context.vfs.id_to_fh(fid);
            nfs::post_op_fh3::handle(fh).serialize(output)?;
            postopattr.serialize(output)?;
            wcc_res.serialize(output)?;
        }
        Err(e) => {
            // s3nfs patch: at DEBUG, not ERROR: an O_EXCL open of a name that exists is the
            // client's everyday business (lock files), and each one was an error in the log.
            debug!("create error --> {:?}", e);
            // serialize CREATE3resfail
            make_success_reply(xid).serialize(output)?;
            e.serialize(output)?;
            wcc_res.serialize(output)?;
        }
    }

    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opaque(len: u32, bytes: &[u8]) -> Vec<u8> {
        [&len.to_be_bytes()[..], bytes].concat()
    }

    #[test]
    fn the_data_is_the_records_own_bytes_and_its_padding_is_skipped() {
        let mut input = Cursor::new([opaque(5, b"hello\0\0\0"), b"next".to_vec()].concat());
        assert_eq!(data_in_record(&mut input).unwrap(), b"hello");
        assert_eq!(input.position(), 12, "past the data and its 3 bytes of padding");
        let mut aligned = Cursor::new(opaque(4, b"abcd"));
        assert_eq!(data_in_record(&mut aligned).unwrap(), b"abcd");
        let mut empty = Cursor::new(opaque(0, b""));
        assert_eq!(data_in_record(&mut empty).unwrap(), b"");
    }

    #[test]
    fn a_record_ending_before_its_data_or_padding_is_an_error() {
        for bytes in [
            opaque(5, b"hel"),
            opaque(5, b"hello\0"),
            opaque(u32::MAX, b"x"),
            vec![0, 0],
        ] {
            let e = data_in_record(&mut Cursor::new(&bytes[..])).unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "{bytes:?}");
        }
    }
}
