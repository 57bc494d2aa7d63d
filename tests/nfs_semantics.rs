//! The NFSv3 procedures and the permission rules a kernel NFS server applies, checked at the
//! protocol level through nfs3_client with explicit AUTH_UNIX credentials for each call, on a
//! gateway over Garage: ACCESS, permission checks, LINK, MKNOD, WRITE's `stable`, COMMIT and
//! the write verifier.

mod common;

use std::time::Duration;

use common::gateway::{on_garage, Opts, Proc, S3Side};
use common::nfs::{devicedata3, mknoddata3, specdata3, Client, Set, Status};
use nfs3_client::nfs3_types::nfs3::{ftype3, stable_how};
use s3nfs::fs::durable::Durability;
use s3nfs::store::ObjectStore;

const ACCESS_READ: u32 = 0x01;
const ACCESS_LOOKUP: u32 = 0x02;
const ACCESS_MODIFY: u32 = 0x04;
const ACCESS_EXTEND: u32 = 0x08;
const ACCESS_DELETE: u32 = 0x10;
const ACCESS_EXECUTE: u32 = 0x20;
const ALL: u32 = 0x3f;

fn mode(m: u32) -> Set {
    Set {
        mode: Some(m),
        ..Default::default()
    }
}

#[tokio::test]
async fn access_and_every_operation_follow_mode_owner_and_groups() {
    let (gw, _s3) = on_garage(Opts::default()).await;
    let mut root = Client::connect(gw.addr).await;
    let top = root.root.clone();
    let secret = root.create(&top, "secret", 0o600).await.unwrap();
    root.write_all(&secret, 0, b"root only").await.unwrap();

    // uid 1000 (not in group 0) gets nothing on root's 0600 file, and cannot read it anyway.
    let mut user = Client::connect_as(gw.addr, 1000, 1000, vec![1000]).await;
    assert_eq!(user.access(&secret, ALL).await.unwrap(), 0);
    assert_eq!(user.read(&secret, 0, 100).await.unwrap_err(), Status::NFS3ERR_ACCES);
    assert_eq!(user.write(&secret, 0, b"x").await.unwrap_err(), Status::NFS3ERR_ACCES);
    assert_eq!(
        root.access(&secret, ALL).await.unwrap(),
        ACCESS_READ | ACCESS_MODIFY | ACCESS_EXTEND,
        "root reads and writes, but executes only what has an x bit"
    );

    // Group class: a supplementary group counts; other bits do not add to it.
    let shared = root.create(&top, "shared", 0o604).await.unwrap();
    root.setattr(
        &shared,
        Set {
            gid: Some(100),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut member = Client::connect_as(gw.addr, 2000, 2000, vec![100]).await;
    assert_eq!(member.access(&shared, ALL).await.unwrap(), 0, "group bits are 0");
    assert_eq!(user.access(&shared, ALL).await.unwrap(), ACCESS_READ, "others may read");
    root.setattr(&shared, mode(0o640)).await.unwrap();
    assert_eq!(member.access(&shared, ALL).await.unwrap(), ACCESS_READ);
    assert_eq!(member.read_all(&shared).await.unwrap(), b"");

    // Directories: search and delete from x and w.
    assert_eq!(
        user.access(&top, ALL).await.unwrap(),
        ACCESS_READ | ACCESS_LOOKUP,
        "the root is 0755 root's"
    );
    assert_eq!(
        user.create(&top, "nope", 0o644).await.unwrap_err(),
        Status::NFS3ERR_ACCES
    );
    assert_eq!(user.remove(&top, "secret").await.unwrap_err(), Status::NFS3ERR_ACCES);

    // Only the owner changes the mode; only root gives a file away; the owner may change the
    // group to one it is in, and to no other.
    assert_eq!(
        user.setattr(&secret, mode(0o644)).await.unwrap_err(),
        Status::NFS3ERR_PERM
    );
    let tmp = root.mkdir(&top, "tmp").await.unwrap();
    root.setattr(&tmp, mode(0o1777)).await.unwrap();
    let mine = user.create(&tmp, "mine", 0o644).await.unwrap();
    let a = user.getattr(&mine).await.unwrap();
    assert_eq!((a.uid, a.gid), (1000, 1000), "a new file belongs to its creator");
    let give = Set {
        uid: Some(2000),
        ..Default::default()
    };
    assert_eq!(user.setattr(&mine, give).await.unwrap_err(), Status::NFS3ERR_PERM);
    let to_100 = Set {
        gid: Some(100),
        ..Default::default()
    };
    assert_eq!(
        user.setattr(&mine, to_100.clone()).await.unwrap_err(),
        Status::NFS3ERR_PERM
    );
    member.create(&tmp, "theirs", 0o644).await.unwrap();
    let theirs = member.lookup(&tmp, "theirs").await.unwrap();
    member.setattr(&theirs, to_100).await.unwrap();
    assert_eq!(member.getattr(&theirs).await.unwrap().gid, 100);

    // The sticky bit: in a 1777 directory only a file's owner (or the directory's, or root)
    // removes or renames it.
    assert_eq!(user.remove(&tmp, "theirs").await.unwrap_err(), Status::NFS3ERR_PERM);
    assert_eq!(
        user.rename(&tmp, "theirs", &tmp, "stolen").await.unwrap_err(),
        Status::NFS3ERR_PERM
    );
    member.remove(&tmp, "theirs").await.unwrap();

    // A write by anyone but root clears set-user-ID; a chown clears it too.
    let suid = root.create(&tmp, "suid", 0o644).await.unwrap();
    root.setattr(&suid, mode(0o4777)).await.unwrap();
    assert_eq!(root.getattr(&suid).await.unwrap().mode, 0o4777);
    user.write(&suid, 0, b"payload").await.unwrap();
    assert_eq!(root.getattr(&suid).await.unwrap().mode, 0o777);
    root.setattr(&suid, mode(0o4755)).await.unwrap();
    root.setattr(
        &suid,
        Set {
            uid: Some(1000),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(root.getattr(&suid).await.unwrap().mode, 0o755);

    // utimes: "now" needs write permission, another time needs ownership.
    let now = Set {
        atime_now: true,
        mtime_now: true,
        ..Default::default()
    };
    let past = Set {
        mtime: Some(1_000_000),
        ..Default::default()
    };
    let open = root.create(&top, "open", 0o666).await.unwrap();
    user.setattr(&open, now.clone()).await.unwrap();
    assert_eq!(
        user.setattr(&open, past.clone()).await.unwrap_err(),
        Status::NFS3ERR_PERM
    );
    assert_eq!(user.setattr(&secret, now).await.unwrap_err(), Status::NFS3ERR_ACCES);
    root.setattr(&open, past).await.unwrap();
    assert_eq!(root.getattr(&open).await.unwrap().mtime.seconds, 1_000_000);

    // ACCESS of a directory the caller may write in grants DELETE.
    assert_eq!(
        user.access(&tmp, ACCESS_DELETE | ACCESS_EXECUTE).await.unwrap(),
        ACCESS_DELETE,
        "EXECUTE is for files: a directory grants LOOKUP"
    );
}

#[tokio::test]
async fn squash_all_makes_every_caller_the_anonymous_user() {
    let squash = s3nfs::config::Squash {
        mode: s3nfs::config::SquashMode::All,
        anon_uid: 4242,
        anon_gid: 4343,
    };
    let (gw, _s3) = on_garage(Opts {
        squash,
        ..Opts::default()
    })
    .await;
    let mut root = Client::connect(gw.addr).await;
    let top = root.root.clone();
    // The root directory is root's 0755: the anonymous user may not write in it.
    assert_eq!(root.create(&top, "f", 0o644).await.unwrap_err(), Status::NFS3ERR_ACCES);
}

#[tokio::test]
async fn hard_links_are_one_file_and_one_object_per_name() {
    let (gw, s3) = on_garage(Opts::default()).await;
    let mut c = Client::connect(gw.addr).await;
    let top = c.root.clone();
    let d = c.mkdir(&top, "d").await.unwrap();
    let a = c.create(&top, "a", 0o640).await.unwrap();
    c.write_all(&a, 0, b"first").await.unwrap();

    assert_eq!(c.link(&a, &d, "b").await.unwrap(), 2);
    assert_eq!(c.link(&a, &top, "c").await.unwrap(), 3);
    assert_eq!(c.link(&a, &d, "b").await.unwrap_err(), Status::NFS3ERR_EXIST);
    assert_eq!(c.link(&d, &top, "dirlink").await.unwrap_err(), Status::NFS3ERR_PERM);
    let b = c.lookup(&d, "b").await.unwrap();
    assert_eq!(b, a, "every name leads to the one file");
    let attr = c.getattr(&a).await.unwrap();
    assert_eq!((attr.nlink, attr.mode), (3, 0o640));

    // One object per name, the same bytes under each, after each upload.
    gw.vol.flush_all().await.unwrap();
    for key in ["a", "d/b", "c"] {
        assert_eq!(s3.get(key).await.as_deref(), Some(&b"first"[..]), "{key}");
    }
    c.write_all(&b, 0, b"SECOND").await.unwrap();
    c.setattr(&b, mode(0o600)).await.unwrap();
    gw.vol.flush_all().await.unwrap();
    for key in ["a", "d/b", "c"] {
        assert_eq!(s3.get(key).await.as_deref(), Some(&b"SECOND"[..]), "{key}");
        let h = s3.store.head(key).await.unwrap().unwrap();
        assert_eq!(h.user.get("mode").map(String::as_str), Some("33152"), "{key}: 0100600");
    }

    // A readdir shows every name with the file's number (and pages past both of them).
    let listed = c.readdirplus_page(&top, 0, [0; 8], 4096, 65536).await.unwrap().0;
    let ids: Vec<_> = listed
        .iter()
        .filter(|(n, _, _)| n == b"a" || n == b"c")
        .map(|(_, id, _)| *id)
        .collect();
    assert_eq!(ids.len(), 2);
    assert_eq!(ids[0], ids[1]);

    // Removing the file's first name leaves the others, data and all.
    c.remove(&top, "a").await.unwrap();
    assert_eq!(c.lookup(&top, "a").await.unwrap_err(), Status::NFS3ERR_NOENT);
    assert_eq!(c.getattr(&b).await.unwrap().nlink, 2);
    assert_eq!(c.read_all(&b).await.unwrap(), b"SECOND");
    // Renaming one name onto another of the same file does nothing.
    c.rename(&top, "c", &d, "b").await.unwrap();
    assert_eq!(c.getattr(&b).await.unwrap().nlink, 2);
    c.rename(&top, "c", &top, "c2").await.unwrap();
    c.write_all(&b, 6, b"+").await.unwrap();
    gw.vol.flush_all().await.unwrap();
    assert_eq!(s3.get("a").await, None);
    assert_eq!(s3.get("c").await, None);
    assert_eq!(s3.get("c2").await.as_deref(), Some(&b"SECOND+"[..]));
    assert_eq!(s3.get("d/b").await.as_deref(), Some(&b"SECOND+"[..]));
    c.remove(&d, "b").await.unwrap();
    assert_eq!(c.getattr(&b).await.unwrap().nlink, 1);
    gw.vol.flush_all().await.unwrap();
    assert_eq!(s3.keys("").await, vec!["c2".to_string(), "d/".to_string()]);
}

#[tokio::test]
async fn mknod_makes_fifos_sockets_and_devices_as_s3fs_stores_them() {
    let (gw, s3) = on_garage(Opts::default()).await;
    let mut c = Client::connect(gw.addr).await;
    let top = c.root.clone();
    let fifo = c
        .mknod(&top, "fifo", mknoddata3::NF3FIFO(mode(0o640).sattr()))
        .await
        .unwrap();
    assert_eq!((fifo.type_, fifo.mode, fifo.size), (ftype3::NF3FIFO, 0o640, 0));
    let sock = c
        .mknod(&top, "sock", mknoddata3::NF3SOCK(mode(0o600).sattr()))
        .await
        .unwrap();
    assert_eq!(sock.type_, ftype3::NF3SOCK);
    let dev = devicedata3 {
        dev_attributes: mode(0o660).sattr(),
        spec: specdata3 {
            specdata1: 259,
            specdata2: 300,
        },
    };
    let null = c.mknod(&top, "blk", mknoddata3::NF3BLK(dev)).await.unwrap();
    assert_eq!(null.type_, ftype3::NF3BLK);
    assert_eq!((null.rdev.specdata1, null.rdev.specdata2), (259, 300));
    assert_eq!(
        c.mknod(&top, "fifo", mknoddata3::NF3FIFO(mode(0o640).sattr()))
            .await
            .unwrap_err(),
        Status::NFS3ERR_EXIST
    );
    let mut user = Client::connect_as(gw.addr, 1000, 1000, vec![]).await;
    let tmp = c.mkdir(&top, "tmp").await.unwrap();
    c.setattr(&tmp, mode(0o777)).await.unwrap();
    let dev = devicedata3 {
        dev_attributes: mode(0o660).sattr(),
        spec: specdata3 {
            specdata1: 1,
            specdata2: 3,
        },
    };
    assert_eq!(
        user.mknod(&tmp, "null", mknoddata3::NF3CHR(dev)).await.unwrap_err(),
        Status::NFS3ERR_PERM,
        "devices are root's to make"
    );

    gw.vol.flush_all().await.unwrap();
    let head = |k: &'static str| {
        let s3: &S3Side = &s3;
        async move { s3.store.head(k).await.unwrap().unwrap() }
    };
    let h = head("fifo").await;
    assert_eq!((h.size, h.user["mode"].as_str()), (0, "4512"), "S_IFIFO | 0640");
    assert_eq!(head("sock").await.user["mode"], (0o140600).to_string());
    let h = head("blk").await;
    assert_eq!(h.user["mode"], (0o060660).to_string());
    // glibc's makedev(259, 300)
    let rdev: u64 = ((259u64 & 0xfff) << 8) | ((300u64 & !0xff) << 12) | (300 & 0xff);
    assert_eq!(h.user["rdev"], rdev.to_string());
}

#[tokio::test]
async fn unstable_writes_are_committed_and_a_restart_changes_the_verifier() {
    let g = common::garage::shared();
    let bucket = g.unique_bucket();
    let mut gw = Proc::start(&bucket, "", "1h");
    let mut c = Client::connect(gw.addr()).await;
    let top = c.root.clone();
    let f = c.create(&top, "f", 0o644).await.unwrap();
    let (n, how, v1) = c.write_how(&f, 0, b"unstable", stable_how::UNSTABLE).await.unwrap();
    assert_eq!((n, how), (8, stable_how::UNSTABLE));
    assert_eq!(c.commit(&f).await.unwrap(), v1, "one verifier while the gateway runs");
    let (_, how, v) = c.write_how(&f, 8, b"+sync", stable_how::FILE_SYNC).await.unwrap();
    assert_eq!((how, v), (stable_how::FILE_SYNC, v1));
    let (_, how, _) = c.write_how(&f, 13, b"+data", stable_how::DATA_SYNC).await.unwrap();
    assert_eq!(
        how,
        stable_how::FILE_SYNC,
        "DATA_SYNC is answered with at least as much"
    );
    assert_eq!(c.link(&f, &top, "g").await.unwrap(), 2);
    drop(c);

    // A crash: the client must learn that UNSTABLE data may be lost, by the verifier.
    gw.kill9();
    gw.restart();
    let mut c = Client::connect(gw.addr()).await;
    let f = c.lookup(&c.root.clone(), "f").await.unwrap();
    assert_eq!(
        c.read_all(&f).await.unwrap(),
        b"unstable+sync+data",
        "committed data survives"
    );
    assert_eq!(c.getattr(&f).await.unwrap().nlink, 2, "hard links survive a crash");
    assert_eq!(c.lookup(&c.root.clone(), "g").await.unwrap(), f);
    let (_, _, v2) = c.write_how(&f, 0, b"U", stable_how::UNSTABLE).await.unwrap();
    assert_ne!(v2, v1, "the verifier changes when the gateway restarts");
    assert_eq!(c.commit(&f).await.unwrap(), v2);
}

#[tokio::test]
async fn durability_s3_puts_the_file_in_s3_before_commit_returns() {
    for (durability, in_s3) in [(Durability::Local, false), (Durability::S3, true)] {
        let (gw, s3) = on_garage(Opts {
            durability,
            flush_delay: Duration::from_secs(3600),
            ..Opts::default()
        })
        .await;
        let mut c = Client::connect(gw.addr).await;
        let top = c.root.clone();
        let f = c.create(&top, "f", 0o644).await.unwrap();
        c.write_how(&f, 0, b"committed", stable_how::UNSTABLE).await.unwrap();
        c.commit(&f).await.unwrap();
        let got = s3.get("f").await;
        if in_s3 {
            assert_eq!(got.as_deref(), Some(&b"committed"[..]), "{durability:?}");
        } else {
            assert_ne!(
                got.as_deref(),
                Some(&b"committed"[..]),
                "{durability:?}: uploaded only after the delay"
            );
        }
    }
}
