//! The NFS (and MOUNT) dispatcher driven with hand-built RPC calls, as a client would send them,
//! against a tiny in-memory file system that records the context of every call it receives.

use std::io::Cursor;
use std::sync::Arc;
use std::time::Instant;

use crate::nfs::*;
use crate::rpcwire::process_record;
use crate::vfs::*;
use crate::xdr::XDR;

mod memfs;
use memfs::MemFs;

// ------------------------------------------------------------------ calls and replies by hand

const NFS: u32 = 100003;
const MOUNT: u32 = 100005;
const GETATTR: u32 = 1;
const LOOKUP: u32 = 3;
const READ: u32 = 6;
const WRITE: u32 = 7;
const CREATE: u32 = 8;
const REMOVE: u32 = 12;
const RMDIR: u32 = 13;
const READDIR: u32 = 16;
const READDIRPLUS: u32 = 17;

/// XDR written by hand.
#[derive(Default)]
struct X(Vec<u8>);

impl X {
    fn u32(mut self, v: u32) -> X {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn u64(mut self, v: u64) -> X {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn opaque(mut self, b: &[u8]) -> X {
        self = self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
        while !self.0.len().is_multiple_of(4) {
            self.0.push(0);
        }
        self
    }
    /// Fixed-size opaque data (a verifier): no length, no padding.
    fn raw(mut self, b: &[u8]) -> X {
        self.0.extend_from_slice(b);
        self
    }
    fn fh(self, fs: &MemFs, id: fileid3) -> X {
        self.opaque(&fs.id_to_fh(id).data)
    }
    /// An sattr3 setting nothing.
    fn no_sattr(self) -> X {
        self.u32(0).u32(0).u32(0).u32(0).u32(0).u32(0)
    }
}

enum Auth {
    None,
    Unix { uid: u32, gid: u32, gids: Vec<u32> },
}

fn user() -> Auth {
    Auth::Unix {
        uid: 1000,
        gid: 100,
        gids: vec![4, 24, 27],
    }
}

/// An RPC call record (without record marking).
fn call_with(xid: u32, rpcvers: u32, prog: u32, vers: u32, proc_: u32, auth: Auth, args: X) -> Vec<u8> {
    let head = X::default().u32(xid).u32(0).u32(rpcvers).u32(prog).u32(vers).u32(proc_);
    let head = match auth {
        Auth::None => head.u32(0).opaque(&[]),
        Auth::Unix { uid, gid, gids } => {
            let mut body = X::default()
                .u32(7)
                .opaque(b"client")
                .u32(uid)
                .u32(gid)
                .u32(gids.len() as u32);
            for g in gids {
                body = body.u32(g);
            }
            head.u32(1).opaque(&body.0)
        }
    };
    [head.u32(0).opaque(&[]).0, args.0].concat()
}

fn call(xid: u32, proc_: u32, auth: Auth, args: X) -> Vec<u8> {
    call_with(xid, 2, NFS, 3, proc_, auth, args)
}

/// A reply, read field by field.
struct Reply(Cursor<Vec<u8>>);

impl Reply {
    fn get<T: XDR + Default>(&mut self) -> T {
        let mut v = T::default();
        v.deserialize(&mut self.0).expect("a well-formed reply");
        v
    }
    fn u32(&mut self) -> u32 {
        self.get()
    }
    fn u64(&mut self) -> u64 {
        self.get()
    }
    fn bool(&mut self) -> bool {
        self.get()
    }
    fn opaque(&mut self) -> Vec<u8> {
        self.get()
    }
    fn attr(&mut self) -> Option<fattr3> {
        self.bool().then(|| self.get())
    }
    fn skip_wcc(&mut self) {
        if self.bool() {
            self.get::<wcc_attr>();
        }
        self.attr();
    }
    fn done(&self) -> bool {
        self.0.position() as usize == self.0.get_ref().len()
    }
}

/// Checks the reply's RPC header (xid, accepted) and returns its accept_stat and the rest.
fn accepted(xid: u32, bytes: Vec<u8>) -> (u32, Reply) {
    let mut r = Reply(Cursor::new(bytes));
    assert_eq!(r.u32(), xid, "xid");
    assert_eq!(r.u32(), 1, "a REPLY");
    assert_eq!(r.u32(), 0, "MSG_ACCEPTED");
    let _verf_flavor = r.u32();
    let _verf = r.opaque();
    let stat = r.u32();
    (stat, r)
}

/// Sends one call and returns the reply positioned at the procedure's status (SUCCESS asserted).
async fn nfs_call(fs: &Arc<MemFs>, xid: u32, record: Vec<u8>) -> (u32, Reply) {
    let (stat, mut r) = accepted(xid, process_record(fs.clone(), &record).await.expect("a reply"));
    assert_eq!(stat, 0, "accept_stat SUCCESS");
    let status = r.u32();
    (status, r)
}

fn ok(status: u32) {
    assert_eq!(status, nfsstat3::NFS3_OK as u32);
}

// ------------------------------------------------------------------ the tests

#[tokio::test]
async fn getattr_of_the_root() {
    let fs = MemFs::new();
    let (status, mut r) = nfs_call(&fs, 11, call(11, GETATTR, user(), X::default().fh(&fs, 1))).await;
    ok(status);
    let a: fattr3 = r.get();
    assert!(matches!(a.ftype, ftype3::NF3DIR));
    assert_eq!((a.fileid, a.mode), (1, 0o755));
    assert!(r.done());
}

#[tokio::test]
async fn getattr_of_a_foreign_handle_is_badhandle() {
    let fs = MemFs::new();
    let args = X::default().opaque(b"not one of ours");
    let (status, r) = nfs_call(&fs, 12, call(12, GETATTR, user(), args)).await;
    assert_eq!(status, nfsstat3::NFS3ERR_BADHANDLE as u32);
    assert!(r.done());
    assert!(fs.names_seen().is_empty(), "the file system was not asked");
}

#[tokio::test]
async fn lookup_of_a_missing_name_is_noent_with_the_directory_attributes() {
    let fs = MemFs::new();
    fs.add(1, b"present", false);
    let (status, mut r) = nfs_call(
        &fs,
        2,
        call(2, LOOKUP, user(), X::default().fh(&fs, 1).opaque(b"absent")),
    )
    .await;
    assert_eq!(status, nfsstat3::NFS3ERR_NOENT as u32);
    assert_eq!(r.attr().expect("dir_attributes").fileid, 1);
    assert!(r.done());
}

#[tokio::test]
async fn lookup_of_a_name_gives_its_handle_and_attributes() {
    let fs = MemFs::new();
    let id = fs.add(1, b"present", false);
    let (status, mut r) = nfs_call(
        &fs,
        3,
        call(3, LOOKUP, user(), X::default().fh(&fs, 1).opaque(b"present")),
    )
    .await;
    ok(status);
    let fh = nfs_fh3 { data: r.opaque() };
    let cx = CallContext::new(Caller::nobody(), Instant::now());
    assert_eq!(fs.fh_to_id(&cx, &fh).await.ok(), Some(id));
    assert_eq!(r.attr().expect("obj_attributes").fileid, id);
    assert_eq!(r.attr().expect("dir_attributes").fileid, 1);
    assert!(r.done());
}

/// Lists `dir` page by page as a client does, each call resuming from the last cookie of the
/// page before; returns the pages' names.
async fn list(fs: &Arc<MemFs>, plus: bool, small: u32) -> Vec<Vec<Vec<u8>>> {
    let mut pages = Vec::new();
    let mut cookie = 0;
    let mut verf = [0u8; 8];
    for xid in 100.. {
        assert!(xid < 200, "the listing never ends");
        let args = X::default().fh(fs, 1).u64(cookie).raw(&verf);
        let (proc_, args) = if plus {
            (READDIRPLUS, args.u32(4096).u32(small))
        } else {
            (READDIR, args.u32(small))
        };
        let (status, mut r) = nfs_call(fs, xid, call(xid, proc_, user(), args)).await;
        ok(status);
        assert_eq!(r.attr().expect("dir_attributes").fileid, 1);
        verf = r.get();
        let mut page = Vec::new();
        while r.bool() {
            let fileid = r.u64();
            let name = r.opaque();
            cookie = r.u64();
            assert_eq!(cookie, fileid, "MemFs's cookies are inode numbers");
            if plus {
                assert_eq!(r.attr().expect("name_attributes").fileid, fileid);
                assert!(r.bool(), "name_handle follows");
                let fh = nfs_fh3 { data: r.opaque() };
                assert_eq!(fh.data, fs.id_to_fh(fileid).data);
            }
            page.push(name);
        }
        let eof = r.bool();
        assert!(r.done());
        assert!(!page.is_empty() || eof, "a page without entries must be the last");
        pages.push(page);
        if eof {
            break;
        }
    }
    pages
}

async fn check_listing(plus: bool, small: u32) {
    let fs = MemFs::new();
    let names: Vec<Vec<u8>> = (0..40).map(|i| format!("file{i:02}").into_bytes()).collect();
    for n in &names {
        fs.add(1, n, false);
    }
    let pages = list(&fs, plus, small).await;
    assert!(
        pages.len() >= 3,
        "{} pages: the count was meant to need several",
        pages.len()
    );
    let listed: Vec<Vec<u8>> = pages.concat();
    assert_eq!(listed, names, "every name once, in order, across the pages");
}

#[tokio::test]
async fn readdir_continues_from_its_cookie() {
    check_listing(false, 512).await;
}

#[tokio::test]
async fn readdirplus_continues_from_its_cookie() {
    check_listing(true, 1024).await;
}

#[tokio::test]
async fn a_call_without_auth_unix_reaches_the_file_system_as_nobody() {
    let fs = MemFs::new();
    let before = Instant::now();
    let (status, _) = nfs_call(&fs, 5, call(5, GETATTR, Auth::None, X::default().fh(&fs, 1))).await;
    ok(status);
    let seen = fs.seen();
    assert_eq!(seen.len(), 1);
    let (what, cx) = &seen[0];
    assert_eq!(*what, "getattr");
    assert!(!cx.caller.unix, "marked as without AUTH_UNIX");
    assert_eq!((cx.caller.uid, cx.caller.gid), (65534, 65534));
    assert!(cx.caller.gids.is_empty());
    assert!(cx.arrived >= before && cx.arrived <= Instant::now());
}

#[tokio::test]
async fn every_file_system_call_of_a_request_gets_its_caller_and_arrival() {
    let fs = MemFs::new();
    fs.add(1, b"a", false);
    let before = Instant::now();
    let (status, _) = nfs_call(&fs, 6, call(6, LOOKUP, user(), X::default().fh(&fs, 1).opaque(b"a"))).await;
    ok(status);
    let seen = fs.seen();
    // reply_attr (by default getattr) of the directory, the lookup, reply_attr of the result.
    assert_eq!(
        seen.iter().map(|s| s.0).collect::<Vec<_>>(),
        ["getattr", "lookup", "getattr"]
    );
    let want = Caller {
        uid: 1000,
        gid: 100,
        gids: vec![4, 24, 27],
        unix: true,
    };
    for (what, cx) in &seen {
        assert_eq!(cx.caller, want, "{what}");
        assert_eq!(cx.arrived, seen[0].1.arrived, "{what}: one arrival time per call");
    }
    assert!(seen[0].1.arrived >= before);
}

#[tokio::test]
async fn more_than_16_groups_are_cut_to_16() {
    let fs = MemFs::new();
    let auth = Auth::Unix {
        uid: 7,
        gid: 7,
        gids: (100..120).collect(),
    };
    let (status, _) = nfs_call(&fs, 8, call(8, GETATTR, auth, X::default().fh(&fs, 1))).await;
    ok(status);
    let seen = fs.seen();
    assert_eq!(seen[0].1.caller.gids, (100..116).collect::<Vec<u32>>());
}

#[tokio::test]
async fn mount_walks_the_path_with_the_callers_context() {
    let fs = MemFs::new();
    let d = fs.add(1, b"d", true);
    let record = call_with(9, 2, MOUNT, 3, 1, user(), X::default().opaque(b"/d"));
    let (stat, mut r) = accepted(9, process_record(fs.clone(), &record).await.expect("a reply"));
    assert_eq!(stat, 0);
    assert_eq!(r.u32(), 0, "MNT3_OK");
    assert_eq!(r.opaque(), fs.id_to_fh(d).data);
    let seen = fs.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!((seen[0].0, seen[0].1.caller.uid), ("lookup", 1000));
}

#[tokio::test]
async fn an_exclusive_create_answers_with_the_new_files_attributes() {
    let fs = MemFs::new();
    // createhow3 EXCLUSIVE (2) and its 8-byte verifier.
    let args = X::default()
        .fh(&fs, 1)
        .opaque(b"excl")
        .u32(2)
        .u64(0x0123_4567_89ab_cdef);
    let (status, mut r) = nfs_call(&fs, 23, call(23, CREATE, user(), args)).await;
    ok(status);
    assert!(r.bool(), "a handle follows");
    let fh = r.opaque();
    let a = r
        .attr()
        .expect("obj_attributes (without them the Linux client sends a GETATTR)");
    assert_eq!(fs.id_to_fh(a.fileid).data, fh, "the new file's own attributes");
    assert!(matches!(a.ftype, ftype3::NF3REG));
}

#[tokio::test]
async fn create_write_and_read_back() {
    let fs = MemFs::new();
    let args = X::default().fh(&fs, 1).opaque(b"new").u32(0).no_sattr();
    let (status, mut r) = nfs_call(&fs, 20, call(20, CREATE, user(), args)).await;
    ok(status);
    assert!(r.bool(), "a handle follows");
    let fh = nfs_fh3 { data: r.opaque() };
    let id = fs
        .lookup(
            &CallContext::new(Caller::nobody(), Instant::now()),
            1,
            &b"new".as_slice().into(),
        )
        .await
        .unwrap();
    assert_eq!(fh.data, fs.id_to_fh(id).data);

    // UNSTABLE asked; the default write_stable answers FILE_SYNC with the server's verifier.
    let args = X::default().fh(&fs, id).u64(0).u32(8).u32(0).opaque(b"12345678");
    let (status, mut r) = nfs_call(&fs, 21, call(21, WRITE, user(), args)).await;
    ok(status);
    r.skip_wcc();
    assert_eq!(r.u32(), 8, "count");
    assert_eq!(r.u32(), stable_how::FILE_SYNC as u32);
    assert_eq!(r.get::<writeverf3>(), fs.serverid());
    assert!(r.done());

    let (status, mut r) = nfs_call(
        &fs,
        22,
        call(22, READ, user(), X::default().fh(&fs, id).u64(2).u32(100)),
    )
    .await;
    ok(status);
    assert_eq!(r.attr().expect("file_attributes").size, 8);
    assert_eq!(r.u32(), 6, "count");
    assert!(r.bool(), "eof");
    assert_eq!(r.opaque(), b"345678");
    assert!(r.done());
}

#[tokio::test]
async fn rmdir_and_remove_reach_their_own_methods() {
    let fs = MemFs::new();
    fs.add(1, b"f", false);
    fs.add(1, b"d", true);
    let (status, mut r) = nfs_call(&fs, 30, call(30, RMDIR, user(), X::default().fh(&fs, 1).opaque(b"f"))).await;
    assert_eq!(status, nfsstat3::NFS3ERR_NOTDIR as u32);
    r.skip_wcc();
    assert!(r.done());
    assert!(fs.names_seen().contains(&"rmdir"));
    let (status, _) = nfs_call(&fs, 31, call(31, REMOVE, user(), X::default().fh(&fs, 1).opaque(b"f"))).await;
    ok(status);
    let seen = fs.names_seen();
    assert!(seen.contains(&"remove") && !seen.contains(&"rmdir"), "{seen:?}");
}

#[tokio::test]
async fn a_write_whose_data_disagrees_with_its_count_is_garbage_args() {
    let fs = MemFs::new();
    let id = fs.add(1, b"f", false);
    let args = X::default().fh(&fs, id).u64(0).u32(10).u32(2).opaque(b"12345");
    let (stat, r) = accepted(
        40,
        process_record(fs.clone(), &call(40, WRITE, user(), args))
            .await
            .unwrap(),
    );
    assert_eq!(stat, 4, "GARBAGE_ARGS");
    assert!(r.done(), "nothing after GARBAGE_ARGS");
    assert!(!fs.names_seen().contains(&"write"));
}

#[tokio::test]
async fn arguments_that_do_not_decode_get_no_reply() {
    let fs = MemFs::new();
    // GETATTR without its handle.
    assert!(process_record(fs.clone(), &call(41, GETATTR, user(), X::default()))
        .await
        .is_none());
    // LOOKUP with a name announcing more bytes than any record holds.
    let args = X::default().fh(&fs, 1).u32(u32::MAX);
    assert!(process_record(fs.clone(), &call(42, LOOKUP, user(), args))
        .await
        .is_none());
    // A handle cut in its middle.
    let whole = call(43, GETATTR, user(), X::default().fh(&fs, 1));
    assert!(process_record(fs.clone(), &whole[..whole.len() - 6]).await.is_none());
    assert!(!fs.names_seen().contains(&"lookup"));
}

#[tokio::test]
async fn unknown_procedures_versions_and_programs_are_answered_as_such() {
    let fs = MemFs::new();
    let (stat, r) = accepted(
        50,
        process_record(fs.clone(), &call(50, 22, user(), X::default()))
            .await
            .unwrap(),
    );
    assert_eq!(stat, 3, "PROC_UNAVAIL");
    assert!(r.done());

    let record = call_with(51, 2, NFS, 2, GETATTR, user(), X::default().fh(&fs, 1));
    let (stat, mut r) = accepted(51, process_record(fs.clone(), &record).await.unwrap());
    assert_eq!(stat, 2, "PROG_MISMATCH");
    assert_eq!((r.u32(), r.u32()), (3, 3), "versions 3 to 3");

    let record = call_with(52, 2, 100099, 1, 0, user(), X::default());
    let (stat, _) = accepted(52, process_record(fs.clone(), &record).await.unwrap());
    assert_eq!(stat, 1, "PROG_UNAVAIL");

    let record = call_with(53, 3, NFS, 3, 0, user(), X::default());
    let mut r = Reply(Cursor::new(process_record(fs.clone(), &record).await.unwrap()));
    assert_eq!((r.u32(), r.u32(), r.u32()), (53, 1, 1), "MSG_DENIED");
    assert_eq!(r.u32(), 0, "RPC_MISMATCH");
    assert!(fs.names_seen().is_empty());
}

/// Through a connection's reader (record marking, the in-flight bounds, the reply queue): a READ
/// reply carries its data as a tail sent after the reply, not copied into it.
#[tokio::test]
async fn a_read_over_a_connection_sends_its_data_as_the_reply_tail() {
    use tokio::io::AsyncWriteExt;

    let fs = MemFs::new();
    let id = fs.add(1, b"f", false);
    let cx = CallContext::new(Caller::nobody(), Instant::now());
    fs.write(&cx, id, 0, b"0123456789abcdef").await.unwrap();
    let context = crate::context::RPCContext {
        local_port: 0,
        client_addr: "test".into(),
        auth: crate::rpc::auth_unix::default(),
        auth_is_unix: false,
        vfs: fs.clone(),
        mount_signal: None,
        export_name: Arc::new("/".into()),
        transaction_tracker: Arc::new(crate::transaction_tracker::TransactionTracker::new(
            std::time::Duration::from_secs(60),
        )),
        arrived: Instant::now(),
    };
    let global = Arc::new(tokio::sync::Semaphore::new(crate::rpcwire::MAX_IN_FLIGHT));
    let (mut socket, server) = tokio::io::duplex(64 * 1024);
    let (mut handler, mut replies) =
        crate::rpcwire::SocketMessageHandler::new(&context, global, tokio::io::BufReader::new(server));
    let record = call(60, READ, user(), X::default().fh(&fs, id).u64(4).u32(8));
    socket
        .write_all(&((record.len() as u32) | (1 << 31)).to_be_bytes())
        .await
        .unwrap();
    socket.write_all(&record).await.unwrap();
    let record = handler.next_record().await.unwrap().expect("a record");
    handler.handle(record).await.unwrap();
    let reply = replies.recv().await.expect("a reply");
    assert_eq!(reply.tail.as_deref(), Some(&b"456789ab"[..]));
    let (stat, mut r) = accepted(60, reply.message.unwrap());
    assert_eq!(stat, 0);
    ok(r.u32());
    r.attr();
    assert_eq!(r.u32(), 8, "count");
    assert!(!r.bool(), "not at the end");
    assert_eq!(r.u32(), 8, "the data's length; the bytes are the tail");
    assert!(r.done());
}
