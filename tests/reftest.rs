//! Reference-model tests of the filesystem core (after Mountpoint's `tests/reftests/`).
//!
//! Random sequences of operations run against a [`Volume`] and against a flat in-memory model;
//! after every step the whole tree (names, kinds, bytes, modes) must be the same, and after every
//! flush the bucket must hold exactly one object per file with the file's bytes, plus a marker per
//! directory. Restarts (the volume closed and opened again on the same state) are operations too,
//! and so are hard links: every name of a file must show the same bytes, mode and link count,
//! and hold an object of its own with those bytes after a flush.
//! Names come from a three-letter alphabet so that operations collide; operation arguments are
//! indices taken modulo the current model, so every generated step means something.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use proptest::prelude::*;
use s3nfs::fs::{FsError, SetAttr, Volume, VolumeConfig};
use s3nfs::meta::Kind;
use s3nfs::store::local::LocalStore;
use s3nfs::store::ObjectStore;

/// The core called directly acts as root (permission checks are tested through NFS).
static ROOT: std::sync::LazyLock<s3nfs::fs::Cred> = std::sync::LazyLock::new(s3nfs::fs::Cred::root);

#[derive(Clone, PartialEq)]
enum Node {
    File { data: Vec<u8>, mode: u32 },
    Dir { mode: u32 },
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Node::File { data, mode } => write!(
                f,
                "File(len {}, crc {:08x}, mode {mode:o})",
                data.len(),
                crc32fast::hash(data)
            ),
            Node::Dir { mode } => write!(f, "Dir(mode {mode:o})"),
        }
    }
}

/// The model: full paths ("" is the root) to nodes. A file with several names (hard links)
/// has a node under each, kept equal, and the same number in `linked`.
#[derive(Debug, Clone, Default)]
struct Model {
    nodes: BTreeMap<String, Node>,
    linked: BTreeMap<String, u32>,
    next_group: u32,
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

fn parent(path: &str) -> &str {
    path.rfind('/').map(|i| &path[..i]).unwrap_or("")
}

impl Model {
    fn new() -> Model {
        let mut m = Model::default();
        m.nodes.insert(String::new(), Node::Dir { mode: 0o755 });
        m
    }
    fn dirs(&self) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|(_, n)| matches!(n, Node::Dir { .. }))
            .map(|(p, _)| p.clone())
            .collect()
    }
    fn files(&self) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|(_, n)| matches!(n, Node::File { .. }))
            .map(|(p, _)| p.clone())
            .collect()
    }
    /// Every name of the file at `path` (itself included).
    fn names_of(&self, path: &str) -> Vec<String> {
        match self.linked.get(path) {
            Some(g) => self
                .linked
                .iter()
                .filter(|(_, h)| *h == g)
                .map(|(p, _)| p.clone())
                .collect(),
            None => vec![path.to_string()],
        }
    }
    fn forget(&mut self, path: &str) {
        self.nodes.remove(path);
        self.linked.remove(path);
    }
    fn children(&self, dir: &str) -> Vec<String> {
        self.nodes
            .keys()
            .filter(|p| !p.is_empty() && parent(p) == dir)
            .cloned()
            .collect()
    }
}

#[derive(Debug, Clone)]
enum Op {
    Create {
        dir: usize,
        name: &'static str,
    },
    Mkdir {
        dir: usize,
        name: &'static str,
    },
    Write {
        file: usize,
        offset: u16,
        len: u16,
        byte: u8,
    },
    Truncate {
        file: usize,
        size: u16,
    },
    Chmod {
        any: usize,
        mode: u32,
    },
    Remove {
        any: usize,
    },
    Rename {
        from: usize,
        to_dir: usize,
        name: &'static str,
    },
    Link {
        file: usize,
        to_dir: usize,
        name: &'static str,
    },
    Flush,
    /// One background flush round (a share of the journal, what is due), between operations.
    Tick,
    Restart,
    /// The gateway killed between two operations: the volume is reopened from a copy of its
    /// state directory as it was at that instant (journal not checkpointed, sled not flushed),
    /// as SIGKILL leaves it, and the journal is replayed.
    Crash,
}

fn name() -> impl Strategy<Value = &'static str> {
    prop_oneof![Just("a"), Just("b"), Just("c")]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (any::<usize>(), name()).prop_map(|(dir, name)| Op::Create { dir, name }),
        2 => (any::<usize>(), name()).prop_map(|(dir, name)| Op::Mkdir { dir, name }),
        4 => (any::<usize>(), 0u16..5000, 1u16..3000, any::<u8>()).prop_map(|(file, offset, len, byte)| Op::Write { file, offset, len, byte }),
        1 => (any::<usize>(), 0u16..6000).prop_map(|(file, size)| Op::Truncate { file, size }),
        1 => (any::<usize>(), 0u32..0o777).prop_map(|(any, mode)| Op::Chmod { any, mode }),
        2 => any::<usize>().prop_map(|any| Op::Remove { any }),
        3 => (any::<usize>(), any::<usize>(), name()).prop_map(|(from, to_dir, name)| Op::Rename { from, to_dir, name }),
        2 => (any::<usize>(), any::<usize>(), name()).prop_map(|(file, to_dir, name)| Op::Link { file, to_dir, name }),
        1 => Just(Op::Flush),
        2 => Just(Op::Tick),
        1 => Just(Op::Restart),
        1 => Just(Op::Crash),
    ]
}

struct Harness {
    store: Arc<dyn ObjectStore>,
    state: tempfile::TempDir,
    vol: Option<Arc<Volume>>,
    model: Model,
    prefix: String,
    /// Offsets and sizes are the ops' times this: 1, or 4 KiB for files of several parts.
    scale: u64,
    /// Files staged with holes whenever fetched, and no copy kept once uploaded.
    holes: bool,
}

/// The error class both sides must agree on.
fn class(e: &FsError) -> &'static str {
    match e {
        FsError::NotFound => "noent",
        FsError::Exists => "exist",
        FsError::NotDir => "notdir",
        FsError::IsDir => "isdir",
        FsError::NotEmpty => "notempty",
        FsError::Invalid(_) => "inval",
        other => panic!("unexpected error from the core: {other:?}"),
    }
}

impl Harness {
    async fn new(store: Arc<dyn ObjectStore>, prefix: &str, scale: u64, holes: bool) -> Harness {
        let state = tempfile::tempdir().unwrap();
        let mut h = Harness {
            store,
            state,
            vol: None,
            model: Model::new(),
            prefix: prefix.to_string(),
            scale,
            holes,
        };
        h.open().await;
        h
    }

    async fn open(&mut self) {
        let mut cfg = VolumeConfig::new(self.state.path().to_path_buf());
        cfg.prefix = self.prefix.clone();
        cfg.part_size = 5 << 20;
        // Every round (Tick) finds everything idle long enough: uploads interleave with the
        // operations as the background flusher makes them.
        cfg.flush_delay = std::time::Duration::ZERO;
        if self.holes {
            // Staged with holes whenever they are fetched, and fetched again at nearly every
            // write: no copy is kept once S3 has its bytes.
            cfg.sparse_from = cfg.part_size;
            cfg.max_staged_files = 0;
        }
        self.vol = Some(Volume::open(cfg, self.store.clone()).await.unwrap());
    }

    fn vol(&self) -> &Arc<Volume> {
        self.vol.as_ref().unwrap()
    }

    async fn resolve(&self, path: &str) -> Result<u64, FsError> {
        let vol = self.vol();
        let mut ino = vol.root();
        for comp in path.split('/').filter(|c| !c.is_empty()) {
            ino = vol.lookup(&ROOT, ino, comp.as_bytes()).await?;
        }
        Ok(ino)
    }

    /// Applies `op` to both sides and checks they agree on the outcome.
    async fn step(&mut self, op: &Op) {
        let m = &mut self.model;
        let pick = |v: Vec<String>, i: usize| -> Option<String> { (!v.is_empty()).then(|| v[i % v.len()].clone()) };
        match op {
            Op::Create { dir, name } | Op::Mkdir { dir, name } => {
                let d = pick(m.dirs(), *dir).unwrap();
                let path = join(&d, name);
                let expect = if m.nodes.contains_key(&path) {
                    Err("exist")
                } else {
                    Ok(())
                };
                let dino = self.resolve(&d).await.unwrap();
                let (got, node) = if matches!(op, Op::Create { .. }) {
                    let attr = SetAttr {
                        mode: Some(0o644),
                        ..Default::default()
                    };
                    let got = self.vol().create(&ROOT, dino, name.as_bytes(), attr, true).await;
                    (
                        got,
                        Node::File {
                            data: vec![],
                            mode: 0o644,
                        },
                    )
                } else {
                    let attr = SetAttr {
                        mode: Some(0o755),
                        ..Default::default()
                    };
                    (
                        self.vol().mkdir(&ROOT, dino, name.as_bytes(), attr).await,
                        Node::Dir { mode: 0o755 },
                    )
                };
                assert_eq!(got.as_ref().map(|_| ()).map_err(class), expect, "{op:?} {path}");
                if expect.is_ok() {
                    self.model.nodes.insert(path, node);
                }
            }
            Op::Write {
                file,
                offset,
                len,
                byte,
            } => {
                let Some(f) = pick(m.files(), *file) else { return };
                let ino = self.resolve(&f).await.unwrap();
                let data = vec![*byte; *len as usize];
                let offset = *offset as u64 * self.scale;
                self.vol().write(&ROOT, ino, offset, &data).await.unwrap();
                for name in self.model.names_of(&f) {
                    if let Some(Node::File { data: d, .. }) = self.model.nodes.get_mut(&name) {
                        let end = offset as usize + data.len();
                        if d.len() < end {
                            d.resize(end, 0);
                        }
                        d[offset as usize..end].copy_from_slice(&data);
                    }
                }
            }
            Op::Truncate { file, size } => {
                let Some(f) = pick(m.files(), *file) else { return };
                let ino = self.resolve(&f).await.unwrap();
                self.vol()
                    .setattr(
                        &ROOT,
                        ino,
                        SetAttr {
                            size: Some(*size as u64 * self.scale),
                            ..Default::default()
                        },
                    )
                    .await
                    .unwrap();
                for name in self.model.names_of(&f) {
                    if let Some(Node::File { data, .. }) = self.model.nodes.get_mut(&name) {
                        data.resize((*size as u64 * self.scale) as usize, 0);
                    }
                }
            }
            Op::Chmod { any, mode } => {
                let all: Vec<String> = m.nodes.keys().filter(|p| !p.is_empty()).cloned().collect();
                let Some(p) = pick(all, *any) else { return };
                let ino = self.resolve(&p).await.unwrap();
                self.vol()
                    .setattr(
                        &ROOT,
                        ino,
                        SetAttr {
                            mode: Some(*mode),
                            ..Default::default()
                        },
                    )
                    .await
                    .unwrap();
                for name in self.model.names_of(&p) {
                    match self.model.nodes.get_mut(&name).unwrap() {
                        Node::File { mode: m, .. } | Node::Dir { mode: m } => *m = *mode,
                    }
                }
            }
            Op::Remove { any } => {
                let all: Vec<String> = m.nodes.keys().filter(|p| !p.is_empty()).cloned().collect();
                let Some(p) = pick(all, *any) else { return };
                let expect = match m.nodes[&p] {
                    Node::Dir { .. } if !m.children(&p).is_empty() => Err("notempty"),
                    _ => Ok(()),
                };
                let dino = self.resolve(parent(&p)).await.unwrap();
                let name = p.rsplit('/').next().unwrap();
                let got = self.vol().remove(&ROOT, dino, name.as_bytes()).await;
                assert_eq!(got.map_err(|e| class(&e)), expect, "remove {p}");
                if expect.is_ok() {
                    self.model.forget(&p);
                }
            }
            Op::Rename { from, to_dir, name } => {
                let all: Vec<String> = m.nodes.keys().filter(|p| !p.is_empty()).cloned().collect();
                let Some(src) = pick(all, *from) else { return };
                let td = pick(m.dirs(), *to_dir).unwrap();
                let dst = join(&td, name);
                let src_is_dir = matches!(m.nodes[&src], Node::Dir { .. });
                let same_file = m.names_of(&src).contains(&dst);
                let expect = if src == dst || same_file {
                    Ok(())
                } else if src_is_dir && (td == src || td.starts_with(&format!("{src}/"))) {
                    Err("inval")
                } else {
                    match m.nodes.get(&dst) {
                        None => Ok(()),
                        Some(Node::Dir { .. }) if !src_is_dir => Err("isdir"),
                        Some(Node::File { .. }) if src_is_dir => Err("notdir"),
                        Some(Node::Dir { .. }) if !m.children(&dst).is_empty() => Err("notempty"),
                        Some(_) => Ok(()),
                    }
                };
                let fino = self.resolve(parent(&src)).await.unwrap();
                let tino = self.resolve(&td).await.unwrap();
                let sname = src.rsplit('/').next().unwrap();
                let got = self
                    .vol()
                    .rename(&ROOT, fino, sname.as_bytes(), tino, name.as_bytes())
                    .await;
                assert_eq!(got.map_err(|e| class(&e)), expect, "rename {src} -> {dst}");
                // Renaming a name onto another name of the same file does nothing (POSIX).
                if expect.is_ok() && src != dst && !same_file {
                    let moved: Vec<(String, Node)> = self
                        .model
                        .nodes
                        .iter()
                        .filter(|(p, _)| **p == src || p.starts_with(&format!("{src}/")))
                        .map(|(p, n)| (p.clone(), n.clone()))
                        .collect();
                    self.model.forget(&dst);
                    for (p, n) in moved {
                        let group = self.model.linked.get(&p).copied();
                        self.model.forget(&p);
                        let to = format!("{dst}{}", &p[src.len()..]);
                        if let Some(g) = group {
                            self.model.linked.insert(to.clone(), g);
                        }
                        self.model.nodes.insert(to, n);
                    }
                }
            }
            Op::Link { file, to_dir, name } => {
                let Some(f) = pick(m.files(), *file) else { return };
                let td = pick(m.dirs(), *to_dir).unwrap();
                let dst = join(&td, name);
                let expect = if m.nodes.contains_key(&dst) {
                    Err("exist")
                } else {
                    Ok(())
                };
                let ino = self.resolve(&f).await.unwrap();
                let tino = self.resolve(&td).await.unwrap();
                let got = self.vol().link(&ROOT, ino, tino, name.as_bytes()).await;
                assert_eq!(got.as_ref().map(|_| ()).map_err(class), expect, "link {f} -> {dst}");
                if expect.is_ok() {
                    let g = match self.model.linked.get(&f) {
                        Some(g) => *g,
                        None => {
                            self.model.next_group += 1;
                            self.model.linked.insert(f.clone(), self.model.next_group);
                            self.model.next_group
                        }
                    };
                    let node = self.model.nodes[&f].clone();
                    self.model.linked.insert(dst.clone(), g);
                    self.model.nodes.insert(dst, node);
                    assert_eq!(got.unwrap().nlink as usize, self.model.names_of(&f).len());
                }
            }
            Op::Flush => {
                self.vol().flush_all().await.unwrap();
                self.check_bucket().await;
            }
            Op::Tick => {
                self.vol().flush_round(false).await.unwrap();
            }
            Op::Restart => {
                // Closing without a flush: what is pending must come back from the journal.
                let vol = self.vol.take().unwrap();
                // Background jobs (a read-ahead started by the walk) hold the volume until they
                // end, as a gateway's close waits for them; anything else holding it is a leak.
                vol.tasks().idle().await;
                assert_eq!(Arc::strong_count(&vol), 1, "nothing else may hold the volume");
                drop(vol);
                self.open().await;
            }
            Op::Crash => {
                let crashed = tempfile::tempdir().unwrap();
                common::copy_tree(self.state.path(), crashed.path());
                let vol = self.vol.take().unwrap();
                drop(vol);
                self.state = crashed;
                self.open().await;
            }
        }
        self.check_tree().await;
    }

    /// Walks the volume and compares it with the model.
    async fn check_tree(&self) {
        let vol = self.vol();
        let mut seen = BTreeMap::new();
        let mut stack = vec![(String::new(), vol.root())];
        while let Some((path, ino)) = stack.pop() {
            let attr = vol.getattr(ino).await.unwrap();
            match attr.kind {
                Kind::Dir => {
                    seen.insert(path.clone(), Node::Dir { mode: attr.mode });
                    let mut after = 0;
                    loop {
                        let (entries, end) = vol.readdir(&ROOT, ino, after, 2).await.unwrap();
                        for e in &entries {
                            stack.push((join(&path, std::str::from_utf8(&e.name).unwrap()), e.ino));
                        }
                        if let Some(last) = entries.last() {
                            after = last.cookie;
                        }
                        if end {
                            break;
                        }
                    }
                }
                Kind::File => {
                    let (data, eof) = vol.read(&ROOT, ino, 0, 1 << 26).await.unwrap();
                    let data = data.to_vec();
                    assert!(eof);
                    assert_eq!(data.len() as u64, attr.size, "size of {path}");
                    assert_eq!(attr.nlink as usize, self.model.names_of(&path).len(), "nlink of {path}");
                    seen.insert(path, Node::File { data, mode: attr.mode });
                }
                other => unreachable!("the model makes no {other:?}"),
            }
        }
        let mut want = self.model.nodes.clone();
        // The root's mode is the volume's, not the model's business.
        want.remove("");
        seen.remove("");
        assert_eq!(seen, want, "tree differs from the model");
    }

    /// After a flush the bucket holds exactly the model: an object per file, a marker per dir.
    async fn check_bucket(&self) {
        let mut keys = BTreeMap::new();
        let mut token = None;
        loop {
            let page = self.store.list(&self.prefix, None, token, 1000).await.unwrap();
            for o in page.objects {
                keys.insert(o.key.clone(), o);
            }
            token = page.next;
            if token.is_none() {
                break;
            }
        }
        let mut want = BTreeMap::new();
        for (p, n) in &self.model.nodes {
            match n {
                Node::Dir { .. } if p.is_empty() => {}
                Node::Dir { .. } => {
                    want.insert(format!("{}{p}/", self.prefix), None);
                }
                Node::File { data, .. } => {
                    want.insert(format!("{}{p}", self.prefix), Some(data.clone()));
                }
            }
        }
        assert_eq!(
            keys.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>(),
            "keys in the bucket"
        );
        for (k, data) in want {
            if let Some(data) = data {
                let got = self.store.get_range(&k, 0..1 << 26).await.unwrap();
                assert!(got.as_ref() == data.as_slice(), "bytes of {k}");
                let head = self.store.head(&k).await.unwrap().unwrap();
                let mode: u32 = head.user["mode"].parse().unwrap();
                let Node::File { mode: want_mode, .. } = self.model.nodes[&k[self.prefix.len()..]] else {
                    unreachable!()
                };
                assert_eq!(mode, 0o100000 | want_mode, "x-amz-meta-mode of {k}");
            }
        }
    }
}

/// A store for one case, its volume prefix, and the directory it lives in, if any (removed
/// when the case ends: a proptest run makes hundreds of them).
type CaseStore = (Arc<dyn ObjectStore>, String, Option<tempfile::TempDir>);

fn run(ops: Vec<Op>, store: impl FnOnce() -> CaseStore) {
    run_scaled(ops, store, 1, false)
}

fn run_scaled(ops: Vec<Op>, store: impl FnOnce() -> CaseStore, scale: u64, holes: bool) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let (store, prefix, _dir) = store();
        let mut h = Harness::new(store, &prefix, scale, holes).await;
        for op in &ops {
            h.step(op).await;
        }
        h.step(&Op::Flush).await;
        h.step(&Op::Restart).await;
    });
}

fn local_store() -> CaseStore {
    let dir = tempfile::tempdir().unwrap();
    (
        Arc::new(LocalStore::open(dir.path()).unwrap()),
        "vol/".into(),
        Some(dir),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, max_shrink_iters: 4000, ..ProptestConfig::default() })]

    #[test]
    fn reference_model_on_embedded_store(ops in proptest::collection::vec(op(), 1..40)) {
        run(ops, local_store);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, max_shrink_iters: 400, ..ProptestConfig::default() })]

    /// Files of up to five parts (offsets and sizes in units of 4 KiB), staged with holes.
    #[test]
    fn reference_model_with_holes_on_embedded_store(ops in proptest::collection::vec(op(), 1..30)) {
        run_scaled(ops, local_store, 4096, true);
    }

    /// Files of up to five parts, staged whole and kept once uploaded: later uploads copy the
    /// parts not written from the object.
    #[test]
    fn reference_model_with_large_files_on_embedded_store(ops in proptest::collection::vec(op(), 1..30)) {
        run_scaled(ops, local_store, 4096, false);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, max_shrink_iters: 400, ..ProptestConfig::default() })]

    #[test]
    fn reference_model_on_garage(ops in proptest::collection::vec(op(), 1..30)) {
        run(ops, || {
            let g = common::garage::shared();
            let bucket = g.unique_bucket();
            let cfg = g.s3_config(&bucket);
            let store = futures::executor::block_on(s3nfs::store::s3::S3Store::connect(cfg)).unwrap();
            (Arc::new(store) as Arc<dyn ObjectStore>, "ref/".into(), None)
        });
    }
}

#[test]
fn regression_rename_dir_then_restart_moves_every_object() {
    run(
        vec![
            Op::Mkdir { dir: 0, name: "a" },
            Op::Create { dir: 1, name: "b" },
            Op::Write {
                file: 0,
                offset: 0,
                len: 10,
                byte: 7,
            },
            Op::Flush,
            Op::Rename {
                from: 0,
                to_dir: 0,
                name: "c",
            },
            Op::Restart,
            Op::Flush,
        ],
        local_store,
    );
}

/// A file's first name replaced by a rename while another name keeps the file: the other name
/// takes over the file's object, and nothing is left at a name that no longer exists.
#[test]
fn regression_rename_over_a_linked_name() {
    run(
        vec![
            Op::Create { dir: 0, name: "b" },
            Op::Link {
                file: 0,
                to_dir: 0,
                name: "a",
            },
            Op::Create { dir: 0, name: "c" },
            Op::Flush,
            Op::Rename {
                from: 2,
                to_dir: 0,
                name: "b",
            },
            Op::Rename {
                from: 0,
                to_dir: 0,
                name: "b",
            },
            Op::Flush,
        ],
        local_store,
    );
}

/// A name removed, then taken by a hard link that is removed in turn before its copy was
/// made: the first file's object must not outlive both.
#[test]
fn regression_deleted_key_taken_by_a_link_removed_before_its_copy() {
    run(
        vec![
            Op::Create { dir: 0, name: "c" },
            Op::Create { dir: 0, name: "b" },
            Op::Flush,
            Op::Remove { any: 0 },
            Op::Link {
                file: 0,
                to_dir: 0,
                name: "b",
            },
            Op::Write {
                file: 0,
                offset: 0,
                len: 1,
                byte: 0,
            },
            Op::Tick,
            Op::Remove { any: 0 },
        ],
        local_store,
    );
}

/// A linked file flushed, its two names renamed in turn (the second onto the first's old
/// name), a flush round, then that name removed: the file must live on under its other name.
#[test]
fn regression_linked_names_renamed_in_turn_then_one_removed() {
    run(
        vec![
            Op::Create { dir: 0, name: "b" },
            Op::Link {
                file: 0,
                to_dir: 0,
                name: "a",
            },
            Op::Flush,
            // "a" -> "c", then "b" -> "a".
            Op::Rename {
                from: 0,
                to_dir: 0,
                name: "c",
            },
            Op::Rename {
                from: 0,
                to_dir: 0,
                name: "a",
            },
            Op::Tick,
            Op::Remove { any: 0 },
        ],
        local_store,
    );
}

/// A chmod while a large file's multipart upload is under way (streaming): the object must get
/// the new mode, which the upload created before it does not carry.
#[test]
fn regression_chmod_of_a_large_file_while_it_streams() {
    run_scaled(
        vec![
            Op::Create { dir: 0, name: "a" },
            Op::Write {
                file: 0,
                offset: 2560,
                len: 1,
                byte: 0,
            },
            Op::Tick,
            Op::Chmod { any: 0, mode: 0 },
        ],
        local_store,
        4096,
        false,
    );
}

/// A hard link's name waits for its file's upload (here, a large file streaming, so not
/// uploaded by the round): the name's own work is done, and S3 has no object for it yet. A
/// listing after the restart must keep it.
#[test]
fn regression_link_to_a_file_not_yet_uploaded_then_restart() {
    run_scaled(
        vec![
            Op::Mkdir { dir: 0, name: "a" },
            Op::Create { dir: 0, name: "b" },
            Op::Write {
                file: 0,
                offset: 2560,
                len: 1,
                byte: 0,
            },
            Op::Link {
                file: 0,
                to_dir: 683749124886913735,
                name: "a",
            },
            Op::Tick,
            Op::Restart,
        ],
        local_store,
        4096,
        true,
    );
}

/// A flushed name removed and taken at once by a hard link to a large file that then streams
/// (its upload not done by the round), then a restart: the link must keep both names, and the
/// removed file's object must not come back at the name.
#[test]
fn regression_removed_name_taken_by_a_link_to_a_streaming_file_then_restart() {
    run_scaled(
        vec![
            Op::Create { dir: 0, name: "b" },
            Op::Flush,
            Op::Remove { any: 0 },
            Op::Create { dir: 0, name: "c" },
            Op::Link {
                file: 0,
                to_dir: 0,
                name: "b",
            },
            Op::Write {
                file: 0,
                offset: 3575,
                len: 171,
                byte: 253,
            },
            Op::Tick,
            Op::Restart,
        ],
        local_store,
        4096,
        false,
    );
}
