//! The NFSv3 procedures (RFC 1813): `handle_nfs` decodes which one a call asks for and
//! dispatches it to its handler, by group: `attr` (GETATTR, SETATTR, ACCESS, FSSTAT, FSINFO,
//! PATHCONF), `lookup_read` (LOOKUP, READLINK, READ), `readdir` (READDIR, READDIRPLUS), `write`
//! (WRITE, COMMIT, CREATE), `namespace` (MKDIR, SYMLINK, MKNOD, LINK) and `remove_rename`
//! (REMOVE, RMDIR, RENAME). Every handler receives the call's [`CallContext`] and hands it to
//! each file system method it calls.
#![allow(clippy::upper_case_acronyms)]
#![allow(dead_code)]
use std::io::{Read, Write};

use num_derive::{FromPrimitive, ToPrimitive};
use num_traits::cast::FromPrimitive;
use tracing::{debug, warn};

use crate::context::RPCContext;
use crate::nfs;
use crate::rpc::*;
use crate::vfs::CallContext;
use crate::xdr::*;

mod attr;
mod lookup_read;
mod namespace;
mod readdir;
mod remove_rename;
#[cfg(test)]
mod tests;
mod write;

use attr::*;
use lookup_read::*;
use namespace::*;
use readdir::*;
use remove_rename::*;
use write::*;

/*
program NFS_PROGRAM {
 version NFS_V3 {

    void
     NFSPROC3_NULL(void)                    = 0;

    GETATTR3res
     NFSPROC3_GETATTR(GETATTR3args)         = 1;

    SETATTR3res
     NFSPROC3_SETATTR(SETATTR3args)         = 2;

    LOOKUP3res
     NFSPROC3_LOOKUP(LOOKUP3args)           = 3;

    ACCESS3res
     NFSPROC3_ACCESS(ACCESS3args)           = 4;

    READLINK3res
     NFSPROC3_READLINK(READLINK3args)       = 5;

    READ3res
     NFSPROC3_READ(READ3args)               = 6;

    WRITE3res
     NFSPROC3_WRITE(WRITE3args)             = 7;

    CREATE3res
     NFSPROC3_CREATE(CREATE3args)           = 8;

    MKDIR3res
     NFSPROC3_MKDIR(MKDIR3args)             = 9;

    SYMLINK3res
     NFSPROC3_SYMLINK(SYMLINK3args)         = 10;

    MKNOD3res
     NFSPROC3_MKNOD(MKNOD3args)             = 11;

    REMOVE3res
     NFSPROC3_REMOVE(REMOVE3args)           = 12;

    RMDIR3res
     NFSPROC3_RMDIR(RMDIR3args)             = 13;

    RENAME3res
     NFSPROC3_RENAME(RENAME3args)           = 14;

    LINK3res
     NFSPROC3_LINK(LINK3args)               = 15;

    READDIR3res
     NFSPROC3_READDIR(READDIR3args)         = 16;

    READDIRPLUS3res
     NFSPROC3_READDIRPLUS(READDIRPLUS3args) = 17;

    FSSTAT3res
     NFSPROC3_FSSTAT(FSSTAT3args)           = 18;

    FSINFO3res
     NFSPROC3_FSINFO(FSINFO3args)           = 19;

    PATHCONF3res
     NFSPROC3_PATHCONF(PATHCONF3args)       = 20;

    COMMIT3res
     NFSPROC3_COMMIT(COMMIT3args)           = 21;

 } = 3;
} = 100003;
*/

#[allow(non_camel_case_types)]
#[allow(clippy::upper_case_acronyms)]
#[derive(Copy, Clone, Debug, FromPrimitive, ToPrimitive)]
enum NFSProgram {
    NFSPROC3_NULL = 0,
    NFSPROC3_GETATTR = 1,
    NFSPROC3_SETATTR = 2,
    NFSPROC3_LOOKUP = 3,
    NFSPROC3_ACCESS = 4,
    NFSPROC3_READLINK = 5,
    NFSPROC3_READ = 6,
    NFSPROC3_WRITE = 7,
    NFSPROC3_CREATE = 8,
    NFSPROC3_MKDIR = 9,
    NFSPROC3_SYMLINK = 10,
    NFSPROC3_MKNOD = 11,
    NFSPROC3_REMOVE = 12,
    NFSPROC3_RMDIR = 13,
    NFSPROC3_RENAME = 14,
    NFSPROC3_LINK = 15,
    NFSPROC3_READDIR = 16,
    NFSPROC3_READDIRPLUS = 17,
    NFSPROC3_FSSTAT = 18,
    NFSPROC3_FSINFO = 19,
    NFSPROC3_PATHCONF = 20,
    NFSPROC3_COMMIT = 21,
    INVALID = 22,
}

pub async fn handle_nfs(
    xid: u32,
    call: call_body,
    input: &mut std::io::Cursor<impl AsRef<[u8]>>,
    output: &mut impl Write,
    context: &RPCContext,
) -> Result<(), anyhow::Error> {
    if call.vers != nfs::VERSION {
        warn!("Invalid NFS Version number {} != {}", call.vers, nfs::VERSION);
        prog_mismatch_reply_message(xid, nfs::VERSION).serialize(output)?;
        return Ok(());
    }
    let prog = NFSProgram::from_u32(call.proc).unwrap_or(NFSProgram::INVALID);
    // s3nfs patch: the caller's identity and the call's arrival, handed to the file system.
    let cx = context.call_context();
    dispatch(prog, xid, input, output, context, &cx).await
}

async fn dispatch(
    prog: NFSProgram,
    xid: u32,
    input: &mut std::io::Cursor<impl AsRef<[u8]>>,
    output: &mut impl Write,
    context: &RPCContext,
    cx: &CallContext,
) -> Result<(), anyhow::Error> {
    match prog {
        NFSProgram::NFSPROC3_NULL => nfsproc3_null(xid, input, output)?,
        NFSProgram::NFSPROC3_GETATTR => nfsproc3_getattr(xid, input, output, context, cx).await?,
        NFSProgram::NFSPROC3_LOOKUP => nfsproc3_lookup(xid, input, output, context, cx).await?,
        NFSProgram::NFSPROC3_READ => nfsproc3_read(xid, input, output, context, cx).await?,
        NFSProgram::NFSPROC3_FSINFO => nfsproc3_fsinfo(xid, input, output, context, cx).await?,
        NFSProgram::NFSPROC3_ACCESS => nfsproc3_access(xid, input, output, context, cx).await?,
        NFSProgram::NFSPROC3_PATHCONF => nfsproc3_pathconf(xid, input, output, context, cx).await?,
        NFSProgram::NFSPROC3_FSSTAT => nfsproc3_fsstat(xid, input, output, context, cx).await?,
        NFSProgram::NFSPROC3_READDIR => nfsproc3_readdir(xid, input, output, context, cx).await?,
        NFSProgram::NFSPROC3_READDIRPLUS => nfsproc3_readdirplus(xid, input, output, context, cx).await?,
        NFSProgram::NFSPROC3_WRITE => nfsproc3_write(xid, input, output, context, cx).await?,
        NFSProgram::NFSPROC3_CREATE => nfsproc3_create(xid, input, output, context, cx).await?,
        NFSProgram::NFSPROC3_SETATTR => nfsproc3_setattr(xid, input, output, context, cx).await?,
        NFSProgram::NFSPROC3_REMOVE => nfsproc3_remove(xid, input, output, context, cx, false).await?,
        // s3nfs patch: RMDIR reaches the filesystem as such (it must refuse a file).
        NFSProgram::NFSPROC3_RMDIR => nfsproc3_remove(xid, input, output, context, cx, true).await?,
        NFSProgram::NFSPROC3_RENAME => nfsproc3_rename(xid, input, output, context, cx).await?,
        NFSProgram::NFSPROC3_MKDIR => nfsproc3_mkdir(xid, input, output, context, cx).await?,
        NFSProgram::NFSPROC3_SYMLINK => nfsproc3_symlink(xid, input, output, context, cx).await?,
        NFSProgram::NFSPROC3_READLINK => nfsproc3_readlink(xid, input, output, context, cx).await?,
        // s3nfs patch: the three procedures 0.11.0 lacked.
        NFSProgram::NFSPROC3_MKNOD => nfsproc3_mknod(xid, input, output, context, cx).await?,
        NFSProgram::NFSPROC3_LINK => nfsproc3_link(xid, input, output, context, cx).await?,
        NFSProgram::NFSPROC3_COMMIT => nfsproc3_commit(xid, input, output, context, cx).await?,
        _ => {
            warn!("Unimplemented message {:?}", prog);
            proc_unavail_reply_message(xid).serialize(output)?;
        }
    }
    Ok(())
}

pub fn nfsproc3_null(xid: u32, _: &mut impl Read, output: &mut impl Write) -> Result<(), anyhow::Error> {
    debug!("nfsproc3_null({:?}) ", xid);
    let msg = make_success_reply(xid);
    debug!("\t{:?} --> {:?}", xid, msg);
    msg.serialize(output)?;
    Ok(())
}

/// The pre-operation attributes of `id` for wcc_data, if it can be read.
async fn pre_op(context: &RPCContext, cx: &CallContext, id: nfs::fileid3) -> nfs::pre_op_attr {
    match context.vfs.reply_attr(cx, id).await {
        Ok(v) => nfs::pre_op_attr::attributes(nfs::wcc_attr {
            size: v.size,
            mtime: v.mtime,
            ctime: v.ctime,
        }),
        Err(_) => nfs::pre_op_attr::Void,
    }
}

async fn post_op(context: &RPCContext, cx: &CallContext, id: nfs::fileid3) -> nfs::post_op_attr {
    match context.vfs.reply_attr(cx, id).await {
        Ok(v) => nfs::post_op_attr::attributes(v),
        Err(_) => nfs::post_op_attr::Void,
    }
}
