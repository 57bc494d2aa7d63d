//! MKDIR, SYMLINK, MKNOD and LINK: new names in a directory.
use std::io::{Read, Write};

use tracing::{debug, warn};

use super::{post_op, pre_op};
use crate::context::RPCContext;
use crate::nfs;
use crate::rpc::*;
use crate::vfs::{CallContext, VFSCapabilities};
use crate::xdr::*;

/*
     MKDIR3res NFSPROC3_MKDIR(MKDIR3args) = 9;

     struct MKDIR3args {
          diropargs3   where;
          sattr3       attributes;
     };

     struct MKDIR3resok {
          post_op_fh3   obj;
          post_op_attr  obj_attributes;
          wcc_data      dir_wcc;
     };

     struct MKDIR3resfail {
          wcc_data      dir_wcc;
     };

     union MKDIR3res switch (nfsstat3 status) {
     case NFS3_OK:
          MKDIR3resok   resok;
     default:
          MKDIR3resfail resfail;
     };

*/

#[allow(non_camel_case_types)]
#[derive(Debug, Default)]
struct MKDIR3args {
    dirops: nfs::diropargs3,
    attributes: nfs::sattr3,
}
xdr_struct!(MKDIR3args, dirops, attributes);

pub async fn nfsproc3_mkdir(
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
    let mut args = MKDIR3args::default();
    args.deserialize(input)?;

    debug!("nfsproc3_mkdir({:?}, {:?}) ", xid, args);

    // find the directory we are supposed to create the
    // new file in
    let dirid = context.vfs.fh_to_id(cx, &args.dirops.dir).await;
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

    let res = context
        .vfs
        .mkdir_with_attr(cx, dirid, &args.dirops.name, &args.attributes)
        .await;

    // Re-read dir attributes for post op attr
    let post_dir_attr = match context.vfs.reply_attr(cx, dirid).await {
        Ok(v) => nfs::post_op_attr::attributes(v),
        Err(_) => nfs::post_op_attr::Void,
    };
    let wcc_res = nfs::wcc_data {
        before: pre_dir_attr,
        after: post_dir_attr,
    };

    match res {
        Ok((fid, fattr)) => {
            debug!("mkdir success --> {:?}, {:?}", fid, fattr);
            make_success_reply(xid).serialize(output)?;
            nfs::nfsstat3::NFS3_OK.serialize(output)?;
            // serialize CREATE3resok
            let fh = context.vfs.id_to_fh(fid);
            nfs::post_op_fh3::handle(fh).serialize(output)?;
            nfs::post_op_attr::attributes(fattr).serialize(output)?;
            wcc_res.serialize(output)?;
        }
        Err(e) => {
            debug!("mkdir error {:?} --> {:?}", xid, e);
            // serialize CREATE3resfail
            make_success_reply(xid).serialize(output)?;
            e.serialize(output)?;
            wcc_res.serialize(output)?;
        }
    }

    Ok(())
}

/*
      SYMLINK3res NFSPROC3_SYMLINK(SYMLINK3args) = 10;

      struct symlinkdata3 {
           sattr3    symlink_attributes;
           nfspath3  symlink_data;
      };

      struct SYMLINK3args {
           diropargs3    where;
           symlinkdata3  symlink;
      };

      struct SYMLINK3resok {
           post_op_fh3   obj;
           post_op_attr  obj_attributes;
           wcc_data      dir_wcc;
      };

      struct SYMLINK3resfail {
           wcc_data      dir_wcc;
      };

      union SYMLINK3res switch (nfsstat3 status) {
      case NFS3_OK:
           SYMLINK3resok   resok;
      default:
           SYMLINK3resfail resfail;
      };
*/

#[allow(non_camel_case_types)]
#[derive(Debug, Default)]
struct SYMLINK3args {
    dirops: nfs::diropargs3,
    symlink: nfs::symlinkdata3,
}
xdr_struct!(SYMLINK3args, dirops, symlink);

pub async fn nfsproc3_symlink(
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
    let mut args = SYMLINK3args::default();
    args.deserialize(input)?;

    debug!("nfsproc3_symlink({:?}, {:?}) ", xid, args);

    // find the directory we are supposed to create the
    // new file in
    let dirid = context.vfs.fh_to_id(cx, &args.dirops.dir).await;
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

    let res = context
        .vfs
        .symlink(
            cx,
            dirid,
            &args.dirops.name,
            &args.symlink.symlink_data,
            &args.symlink.symlink_attributes,
        )
        .await;

    // Re-read dir attributes for post op attr
    let post_dir_attr = match context.vfs.reply_attr(cx, dirid).await {
        Ok(v) => nfs::post_op_attr::attributes(v),
        Err(_) => nfs::post_op_attr::Void,
    };
    let wcc_res = nfs::wcc_data {
        before: pre_dir_attr,
        after: post_dir_attr,
    };

    match res {
        Ok((fid, fattr)) => {
            debug!("symlink success --> {:?}, {:?}", fid, fattr);
            make_success_reply(xid).serialize(output)?;
            nfs::nfsstat3::NFS3_OK.serialize(output)?;
            // serialize CREATE3resok
            let fh = context.vfs.id_to_fh(fid);
            nfs::post_op_fh3::handle(fh).serialize(output)?;
            nfs::post_op_attr::attributes(fattr).serialize(output)?;
            wcc_res.serialize(output)?;
        }
        Err(e) => {
            debug!("symlink error --> {:?}", e);
            // serialize CREATE3resfail
            make_success_reply(xid).serialize(output)?;
            e.serialize(output)?;
            wcc_res.serialize(output)?;
        }
    }

    Ok(())
}

/*
 MKNOD3res NFSPROC3_MKNOD(MKNOD3args) = 11;

 struct devicedata3 { sattr3 dev_attributes; specdata3 spec; };
 union mknoddata3 switch (ftype3 type) {
 case NF3CHR: case NF3BLK: devicedata3 device;
 case NF3SOCK: case NF3FIFO: sattr3 pipe_attributes;
 default: void;
 };
 struct MKNOD3args { diropargs3 where; mknoddata3 what; };
 struct MKNOD3resok { post_op_fh3 obj; post_op_attr obj_attributes; wcc_data dir_wcc; };
 struct MKNOD3resfail { wcc_data dir_wcc; };
*/
pub async fn nfsproc3_mknod(
    xid: u32,
    input: &mut impl Read,
    output: &mut impl Write,
    context: &RPCContext,
    cx: &CallContext,
) -> Result<(), anyhow::Error> {
    let mut dirops = nfs::diropargs3::default();
    dirops.deserialize(input)?;
    let mut ftype = nfs::ftype3::default();
    ftype.deserialize(input)?;
    let mut attr = nfs::sattr3::default();
    let mut spec = nfs::specdata3::default();
    let known = match ftype {
        nfs::ftype3::NF3CHR | nfs::ftype3::NF3BLK => {
            attr.deserialize(input)?;
            spec.deserialize(input)?;
            true
        }
        nfs::ftype3::NF3SOCK | nfs::ftype3::NF3FIFO => {
            attr.deserialize(input)?;
            true
        }
        _ => false,
    };
    debug!("nfsproc3_mknod({:?}, {:?}, {:?})", xid, dirops, ftype);
    let dirid = match context.vfs.fh_to_id(cx, &dirops.dir).await {
        Ok(id) => id,
        Err(stat) => {
            make_success_reply(xid).serialize(output)?;
            stat.serialize(output)?;
            nfs::wcc_data::default().serialize(output)?;
            return Ok(());
        }
    };
    let before = pre_op(context, cx, dirid).await;
    let res = if !known {
        // RFC 1813: regular files, directories and symlinks have procedures of their own.
        Err(nfs::nfsstat3::NFS3ERR_BADTYPE)
    } else if !matches!(context.vfs.capabilities(), VFSCapabilities::ReadWrite) {
        Err(nfs::nfsstat3::NFS3ERR_ROFS)
    } else {
        context.vfs.mknod(cx, dirid, &dirops.name, ftype, &attr, spec).await
    };
    let wcc = nfs::wcc_data {
        before,
        after: post_op(context, cx, dirid).await,
    };
    make_success_reply(xid).serialize(output)?;
    match res {
        Ok((fid, fattr)) => {
            nfs::nfsstat3::NFS3_OK.serialize(output)?;
            nfs::post_op_fh3::handle(context.vfs.id_to_fh(fid)).serialize(output)?;
            nfs::post_op_attr::attributes(fattr).serialize(output)?;
            wcc.serialize(output)?;
        }
        Err(stat) => {
            stat.serialize(output)?;
            wcc.serialize(output)?;
        }
    }
    Ok(())
}

/*
 LINK3res NFSPROC3_LINK(LINK3args) = 15;

 struct LINK3args { nfs_fh3 file; diropargs3 link; };
 struct LINK3resok { post_op_attr file_attributes; wcc_data linkdir_wcc; };
 struct LINK3resfail { post_op_attr file_attributes; wcc_data linkdir_wcc; };
*/
pub async fn nfsproc3_link(
    xid: u32,
    input: &mut impl Read,
    output: &mut impl Write,
    context: &RPCContext,
    cx: &CallContext,
) -> Result<(), anyhow::Error> {
    let mut file = nfs::nfs_fh3::default();
    file.deserialize(input)?;
    let mut link = nfs::diropargs3::default();
    link.deserialize(input)?;
    debug!("nfsproc3_link({:?}, {:?}, {:?})", xid, file, link);
    let ids = match context.vfs.fh_to_id(cx, &file).await {
        Ok(f) => context.vfs.fh_to_id(cx, &link.dir).await.map(|d| (f, d)),
        Err(e) => Err(e),
    };
    let (id, dirid) = match ids {
        Ok(ids) => ids,
        Err(stat) => {
            make_success_reply(xid).serialize(output)?;
            stat.serialize(output)?;
            nfs::post_op_attr::Void.serialize(output)?;
            nfs::wcc_data::default().serialize(output)?;
            return Ok(());
        }
    };
    let before = pre_op(context, cx, dirid).await;
    let res = if matches!(context.vfs.capabilities(), VFSCapabilities::ReadWrite) {
        context.vfs.link(cx, id, dirid, &link.name).await
    } else {
        Err(nfs::nfsstat3::NFS3ERR_ROFS)
    };
    let file_attr = post_op(context, cx, id).await;
    let wcc = nfs::wcc_data {
        before,
        after: post_op(context, cx, dirid).await,
    };
    make_success_reply(xid).serialize(output)?;
    match res {
        Ok(()) => nfs::nfsstat3::NFS3_OK.serialize(output)?,
        Err(stat) => stat.serialize(output)?,
    }
    file_attr.serialize(output)?;
    wcc.serialize(output)?;
    Ok(())
}
