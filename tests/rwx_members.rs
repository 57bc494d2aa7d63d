//! ReadWriteMany volumes with several nodes in one process: each node is a `Member` with its
//! own supervisor and state directory, all on one Garage bucket, one Lease (through the API
//! server stand-in) and one TLS key pair. Each node's cross-node address is its own loopback
//! address (127.0.0.2, .3, …) and its endpoint is on 127.0.0.1, as on separate machines. The
//! lease lasts 3 s so that a failover takes seconds.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::Actor;
use common::csi::run;
use common::gateway::{free_port, wait_for, S3Side};
use common::kube_api::KubeApi;
use common::nfs::{Client, Set};
use common::rpc::{call, X};
use common::{garage, pattern};
use nfs3_client::nfs3_types::nfs3::{ftype3, stable_how};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use s3nfs::actors::Supervisor;
use s3nfs::clock::Clock;
use s3nfs::cluster::elect::{Role, Timing};
use s3nfs::cluster::kube::KubeLeases;
use s3nfs::cluster::lease::Holder;
use s3nfs::cluster::member::{Member, MemberConfig, OwnerGateway};
use s3nfs::cluster::tls::PeerTls;
use s3nfs::config::{Backend, Export};
use s3nfs::csi::params::{OnDelete, VolumeId};
use s3nfs::csi::record::{self, VolumeRecord};
use s3nfs::csi::shared::{lease_name, SupervisedOwner};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

const NS: &str = "s3nfs";
const PREFIX: &str = "vol/";
const TIMING: Timing = Timing {
    duration: Duration::from_secs(3),
    renew_deadline: Duration::from_secs(2),
    retry: Duration::from_millis(400),
};
/// Bound on anything that should take a few lease periods at most.
const LONG: Duration = Duration::from_secs(30);

/// A pair made by the `openssl` CLI: (certificate PEM, key PEM).
fn openssl_pair(dir: &Path, name: &str) -> (Vec<u8>, Vec<u8>) {
    let (cert, key) = common::peer::openssl_pair(dir, name);
    (std::fs::read(cert).unwrap(), std::fs::read(key).unwrap())
}

fn peer_tls(dir: &Path, name: &str) -> PeerTls {
    let (cert, key) = openssl_pair(dir, name);
    PeerTls::from_pem(&cert, &key).unwrap()
}

/// One volume as the cluster sees it: its bucket, its lease and the pair every node holds.
struct Volume {
    id: String,
    api: KubeApi,
    tls: PeerTls,
    s3: S3Side,
    dir: tempfile::TempDir,
}

/// One node's part in the volume.
struct Node {
    member: Member,
    gateway: Arc<SupervisedOwner>,
    me: Holder,
    endpoint: SocketAddr,
    _state: tempfile::TempDir,
}

impl Volume {
    async fn new() -> Volume {
        let bucket = tokio::task::spawn_blocking(|| garage::shared().unique_bucket())
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        Volume {
            // The volume id as CreateVolume makes it: the bucket and the prefix.
            id: format!("{bucket}/{}", PREFIX.trim_end_matches('/')),
            api: KubeApi::start("127.0.0.1:0".parse().unwrap()).await,
            tls: peer_tls(dir.path(), "driver"),
            s3: S3Side::for_bucket(&bucket).await,
            dir,
        }
    }

    /// Node `n`: cross-node address 127.0.0.`n`, an endpoint on 127.0.0.1.
    async fn node(&self, n: u8) -> Node {
        let me = Holder {
            node: format!("node-{n}"),
            addr: SocketAddr::from(([127, 0, 0, n], free_port())),
        };
        self.node_at(me, SocketAddr::from(([127, 0, 0, 1], free_port()))).await
    }

    /// A node with a supervisor and a state directory of its own.
    async fn node_at(&self, me: Holder, endpoint: SocketAddr) -> Node {
        let state = tempfile::tempdir().unwrap();
        let export = Export {
            // The volume id: it seeds the keyed handles, so every node must use the same one.
            name: self.id.clone(),
            listen: "127.0.0.1:0".parse().unwrap(),
            backend: Backend::S3(garage::shared().s3_config(&self.s3.bucket)),
            prefix: PREFIX.into(),
            state_dir: state.path().join("owner"),
            flush_delay: Duration::from_millis(200),
            refresh: Duration::from_secs(1),
            busy_defer: s3nfs::fs::defer::MAX_DEFER,
            capacity: None,
            defaults: Default::default(),
            durability: Default::default(),
            squash: Default::default(),
        };
        let store = s3nfs::actors::open_store(&export, false).await.unwrap();
        let gateway =
            Arc::new(SupervisedOwner::new(Supervisor::default().start(), export, store).with_record(self.volume_id()));
        let cfg = MemberConfig {
            lease: lease_name(&self.id),
            me: me.clone(),
            endpoint,
            timing: TIMING,
        };
        let leases = Arc::new(KubeLeases::new(&self.api.url(), NS, None, None).unwrap());
        let member = Member::start(cfg, leases, self.tls.clone(), gateway.clone(), Clock::system())
            .await
            .unwrap();
        Node {
            member,
            gateway,
            me,
            endpoint,
            _state: state,
        }
    }

    fn volume_id(&self) -> VolumeId {
        VolumeId::parse(&self.id).unwrap()
    }

    /// The lease's spec as the API server stores it.
    fn lease(&self) -> serde_json::Value {
        self.api.lease(NS, &lease_name(&self.id)).expect("the lease exists")["spec"].clone()
    }
}

/// Waits until exactly one node owns the volume and every other one follows it; its index.
async fn one_owner(nodes: &[Node]) -> usize {
    wait_for(LONG, "one owner, followed by every other node", || {
        let roles: Vec<Role> = nodes.iter().map(|n| n.member.role()).collect();
        let owners: Vec<usize> = (0..nodes.len())
            .filter(|&i| matches!(roles[i], Role::Owner { .. }))
            .collect();
        let agreed = match owners[..] {
            [o] => {
                let following = Role::Follower {
                    owner: nodes[o].me.clone(),
                };
                (0..nodes.len()).all(|i| i == o || roles[i] == following).then_some(o)
            }
            _ => None,
        };
        async move { agreed }
    })
    .await
}

/// Mounts through `endpoint`, again until it answers: during a change of owner the relay may
/// close a connection, as a kernel's hard mount would see it, and the client connects again.
async fn mount(endpoint: SocketAddr) -> Client {
    wait_for(LONG, "a mount through the endpoint", || async move {
        tokio::time::timeout(Duration::from_secs(5), Client::try_connect(endpoint))
            .await
            .ok()?
            .ok()
    })
    .await
}

#[test]
fn one_owner_and_followers_serve_one_file_system() {
    run(async {
        let vol = Volume::new().await;
        let nodes = [vol.node(2).await, vol.node(3).await, vol.node(4).await];
        let o = one_owner(&nodes).await;
        assert_eq!(vol.lease()["holderIdentity"], nodes[o].me.identity());
        let f: Vec<usize> = (0..3).filter(|&i| i != o).collect();

        let data = pattern(1, 300_000);
        let mut c = Client::connect(nodes[f[0]].endpoint).await;
        let root = c.root.clone();
        let fh = c.create(&root, "shared.bin", 0o644).await.unwrap();
        // UNSTABLE writes, so that only the COMMIT can have put the bytes in S3.
        for (i, chunk) in data.chunks(100_000).enumerate() {
            let off = (i * 100_000) as u64;
            c.write_how(&fh, off, chunk, stable_how::UNSTABLE).await.unwrap();
        }
        c.commit(&fh).await.unwrap();
        let key = format!("{PREFIX}shared.bin");
        assert_eq!(
            vol.s3.get(&key).await.as_deref(),
            Some(&data[..]),
            "in S3 once COMMIT returned"
        );

        for i in [f[1], o] {
            let mut c = Client::connect(nodes[i].endpoint).await;
            let root = c.root.clone();
            let there = c.lookup(&root, "shared.bin").await.unwrap();
            assert_eq!(there, fh, "one gateway behind every endpoint gives one handle");
            assert_eq!(c.read_all(&there).await.unwrap(), data, "read through node {i}");
        }
    });
}

#[test]
fn a_new_owner_answers_the_old_owners_handles() {
    run(async {
        let vol = Volume::new().await;
        let mut nodes = vec![vol.node(2).await, vol.node(3).await, vol.node(4).await];
        let o = one_owner(&nodes).await;
        let writer = (0..3).find(|&i| i != o).unwrap();
        let data = pattern(2, 64 * 1024);
        let mut c = Client::connect(nodes[writer].endpoint).await;
        let root = c.root.clone();
        let dir = c.mkdir(&root, "sub").await.unwrap();
        let fh = c.create(&dir, "kept.bin", 0o644).await.unwrap();
        c.write_all(&fh, 0, &data).await.unwrap();
        c.commit(&fh).await.unwrap();
        drop(c);

        // A crash: the member goes without releasing the lease, and the gateway goes with the
        // process (the fence stands for that).
        let crashed = nodes.remove(o);
        let t0 = Instant::now();
        drop(crashed.member);
        crashed.gateway.fence().await;

        let new = one_owner(&nodes).await;
        assert_eq!(vol.lease()["holderIdentity"], nodes[new].me.identity());
        assert_eq!(vol.lease()["leaseTransitions"], 1);
        let follower = 1 - new;
        let mut c = mount(nodes[follower].endpoint).await;
        // The old owner's handles, with no LOOKUP: the kernels of other nodes still hold them.
        let (got, eof) = c
            .read(&fh, 0, data.len() as u32)
            .await
            .expect("READ with the old handle");
        let took = t0.elapsed();
        eprintln!("failover: {took:?} from the owner's crash to a READ through a follower");
        assert!(eof);
        assert_eq!(got, data);
        let attr = c.getattr(&dir).await.expect("GETATTR with the old directory handle");
        assert_eq!(attr.type_, ftype3::NF3DIR);
        // Nobody may take over before the lease expires. The last renewal can precede the
        // crash by up to one retry period, so the lease may expire that much sooner.
        let earliest = TIMING.duration - TIMING.retry - Duration::from_millis(100);
        assert!(
            took >= earliest,
            "served {took:?} after the crash, before the lease expired"
        );
    });
}

/// The volume's size as `df` shows it through `endpoint`.
async fn df_size(endpoint: SocketAddr) -> u64 {
    let mut c = mount(endpoint).await;
    let root = c.root.clone();
    c.fsstat(&root).await.expect("FSSTAT").tbytes
}

/// A crash of the owner (see `a_new_owner_answers_the_old_owners_handles`); the new owner.
async fn crash_owner(nodes: &mut Vec<Node>) -> usize {
    let o = one_owner(nodes).await;
    let crashed = nodes.remove(o);
    drop(crashed.member);
    crashed.gateway.fence().await;
    one_owner(nodes).await
}

#[test]
fn an_expansion_holds_on_every_node_and_in_every_later_term() {
    run(async {
        const GIB: u64 = 1 << 30;
        let vol = Volume::new().await;
        let mut nodes = vec![vol.node(2).await, vol.node(3).await, vol.node(4).await];
        let o = one_owner(&nodes).await;
        let follower = (0..3).find(|&i| i != o).unwrap();
        // Kubelet expands the volume on every node that has it staged (NodeExpandVolume).
        for n in &nodes {
            assert_eq!(n.gateway.resize(3 * GIB).await, 3 * GIB);
        }
        assert_eq!(nodes[o].gateway.resize(GIB).await, 3 * GIB, "a volume never shrinks");
        assert_eq!(df_size(nodes[follower].endpoint).await, 3 * GIB, "through a follower");

        // The next owner's term starts with the size its node was told.
        let new = crash_owner(&mut nodes).await;
        assert_eq!(df_size(nodes[new].endpoint).await, 3 * GIB, "the next owner's term");

        // The controller expanded the volume (its record) and no kubelet has told the nodes
        // yet: the term after the next change of owner reads the record.
        let rec = VolumeRecord {
            name: "pv".into(),
            capacity_bytes: 5 * GIB,
            on_delete: OnDelete::Retain,
        };
        record::write(&*vol.s3.store, &vol.volume_id(), &rec).await.unwrap();
        let last = crash_owner(&mut nodes).await;
        assert_eq!(
            df_size(nodes[last].endpoint).await,
            5 * GIB,
            "the term after the record grew"
        );
    });
}

/// A namespace change acknowledged by the owner is in S3 when answered (RFC 1813's stable
/// storage for these operations), so an owner's crash right after loses none: the next owner
/// starts from S3 alone. They reached S3 only with the next flush round, and a crash before it
/// took them with it.
#[test]
fn namespace_changes_are_in_s3_when_answered_and_survive_the_owners_crash() {
    run(async {
        let vol = Volume::new().await;
        let mut nodes = vec![vol.node(2).await, vol.node(3).await];
        let o = one_owner(&nodes).await;
        let mut c = Client::connect(nodes[1 - o].endpoint).await;
        let root = c.root.clone();
        let mut fhs = Vec::new();
        for name in ["a", "b", "c"] {
            let fh = c.create(&root, name, 0o644).await.unwrap();
            c.write(&fh, 0, name.as_bytes()).await.unwrap();
            c.commit(&fh).await.unwrap();
            fhs.push(fh);
        }
        let d = c.mkdir(&root, "d").await.unwrap();
        c.rename(&root, "a", &d, "a2").await.unwrap();
        c.remove(&root, "b").await.unwrap();
        c.setattr(
            &fhs[2],
            Set {
                mode: Some(0o600),
                ..Set::default()
            },
        )
        .await
        .unwrap();
        c.symlink(&d, "to-c", "../c").await.unwrap();
        drop(c);

        // In S3 as the replies came back.
        let key = |k: &str| format!("{PREFIX}{k}");
        assert!(vol.s3.head(&key("d/")).await.is_some(), "the new directory's marker");
        assert_eq!(
            vol.s3.get(&key("d/a2")).await.as_deref(),
            Some(&b"a"[..]),
            "the renamed file"
        );
        assert!(vol.s3.head(&key("a")).await.is_none(), "the renamed file's old name");
        assert!(vol.s3.head(&key("b")).await.is_none(), "the removed file");
        let c_meta = vol.s3.head(&key("c")).await.expect("c");
        assert_eq!(
            c_meta.user.get("mode").map(String::as_str),
            Some("33152"),
            "c's mode (0o100600)"
        );
        assert_eq!(
            vol.s3.get(&key("d/to-c")).await.as_deref(),
            Some(&b"../c"[..]),
            "the symlink"
        );

        // The owner crashes right after: the next one serves every change.
        let new = crash_owner(&mut nodes).await;
        let mut c = mount(nodes[new].endpoint).await;
        let root = c.root.clone();
        let d = c.lookup(&root, "d").await.expect("d");
        let a2 = c.lookup(&d, "a2").await.expect("d/a2");
        assert_eq!(c.read_all(&a2).await.unwrap(), b"a");
        assert!(c.lookup(&root, "a").await.is_err(), "a is back");
        assert!(c.lookup(&root, "b").await.is_err(), "b is back");
        let cf = c.lookup(&root, "c").await.unwrap();
        assert_eq!(c.getattr(&cf).await.unwrap().mode & 0o7777, 0o600);
    });
}

#[test]
fn leaving_hands_over_at_once() {
    run(async {
        let vol = Volume::new().await;
        let mut nodes = vec![vol.node(2).await, vol.node(3).await];
        let o = one_owner(&nodes).await;
        let data = pattern(3, 50_000);
        let mut c = Client::connect(nodes[o].endpoint).await;
        let root = c.root.clone();
        let fh = c.create(&root, "handed.bin", 0o644).await.unwrap();
        // Not committed: leaving uploads what is pending.
        c.write_how(&fh, 0, &data, stable_how::UNSTABLE).await.unwrap();
        drop(c);

        let leaving = nodes.remove(o);
        leaving.member.leave().await;
        let t0 = Instant::now();
        wait_for(TIMING.duration, "the other node to own the volume", || {
            let owns = matches!(nodes[0].member.role(), Role::Owner { .. });
            async move { owns.then_some(()) }
        })
        .await;
        let took = t0.elapsed();
        eprintln!("hand-over: the other node owns the volume {took:?} after the owner left");
        // Without the release the other node would wait out the lease: a full duration less
        // at most one retry period.
        assert!(took < TIMING.duration / 2, "took over after {took:?}");
        assert_eq!(vol.lease()["holderIdentity"], nodes[0].me.identity());

        let mut c = mount(nodes[0].endpoint).await;
        let root = c.root.clone();
        let there = c.lookup(&root, "handed.bin").await.unwrap();
        assert_eq!(c.read_all(&there).await.unwrap(), data);
    });
}

/// An NFS NULL call in one RPC record.
fn null_call(xid: u32) -> Vec<u8> {
    let body = call(xid, 100_003, 3, 0, X::default());
    [(0x8000_0000 | body.len() as u32).to_be_bytes().to_vec(), body].concat()
}

/// Sends a NULL call and reads until the peer closes; what came back. A peer that keeps the
/// connection open fails the test after the server's own handshake limit (10 s) has passed.
async fn call_until_closed<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) -> Vec<u8> {
    let _ = s.write_all(&null_call(7)).await;
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut got)).await;
    assert!(read.is_ok(), "the connection was not closed; received {got:02x?}");
    got
}

/// Whether `got` holds an RPC reply (a record whose XID is 7): a TLS alert does not.
fn has_rpc_reply(got: &[u8]) -> bool {
    got.len() >= 12 && got[4..8] == 7u32.to_be_bytes() && got[8..12] == 1u32.to_be_bytes()
}

/// Trusts any server: a stranger that gets past its own check, so the owner's check of the
/// client's certificate is what refuses it.
#[derive(Debug)]
struct AnyServer(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(m, c, d, &self.0)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(m, c, d, &self.0)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

#[test]
fn the_cross_node_port_refuses_strangers() {
    run(async {
        let vol = Volume::new().await;
        let nodes = [vol.node(2).await];
        one_owner(&nodes).await;
        let port = nodes[0].me.addr;
        let refused = || s3nfs::metrics::global().peer_refused.load(Ordering::Relaxed);
        let before = refused();

        // The driver's pair gets an answer: the silence below is a refusal, not a dead port.
        let s = wait_for(LONG, "the owner's cross-node port", || async move {
            TcpStream::connect(port).await.ok()
        })
        .await;
        let mut s = vol.tls.connector().connect(PeerTls::server_name(), s).await.unwrap();
        s.write_all(&null_call(7)).await.unwrap();
        let mut reply = [0u8; 12];
        s.read_exact(&mut reply).await.unwrap();
        assert!(
            has_rpc_reply(&reply),
            "no NULL reply through the driver's pair: {reply:02x?}"
        );

        // Plain TCP.
        let got = call_until_closed(TcpStream::connect(port).await.unwrap()).await;
        assert!(!has_rpc_reply(&got), "plain TCP got an RPC reply: {got:02x?}");

        // Another pair: its client does not trust the owner's certificate either.
        let stranger = peer_tls(vol.dir.path(), "stranger");
        let s = TcpStream::connect(port).await.unwrap();
        if let Ok(s) = stranger.connector().connect(PeerTls::server_name(), s).await {
            let got = call_until_closed(s).await;
            assert!(!has_rpc_reply(&got), "another pair got an RPC reply: {got:02x?}");
        }

        // Another pair whose client trusts anything.
        let (cert, key) = openssl_pair(vol.dir.path(), "trusting");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyServer(provider.signature_verification_algorithms)))
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(&cert).unwrap()],
                PrivateKeyDer::from_pem_slice(&key).unwrap(),
            )
            .unwrap();
        let s = TcpStream::connect(port).await.unwrap();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        if let Ok(s) = connector.connect(PeerTls::server_name(), s).await {
            let got = call_until_closed(s).await;
            assert!(
                !has_rpc_reply(&got),
                "a client certificate not the driver's got an RPC reply: {got:02x?}"
            );
        }

        // All three counted (other tests in this process only add to the count).
        wait_for(LONG, "three refusals counted", || {
            let n = refused();
            async move { (n >= before + 3).then_some(()) }
        })
        .await;
    });
}

/// Unstaging and staging the volume again on one node (a pod moved away and back) reuses the
/// volume's port, on 127.0.0.1 for the endpoint and on the node's address for the cross-node port.
#[test]
fn a_node_that_left_can_own_the_volume_again() {
    run(async {
        let vol = Volume::new().await;
        let node = vol.node(2).await;
        one_owner(std::slice::from_ref(&node)).await;
        let mut c = Client::connect(node.endpoint).await;
        let root = c.root.clone();
        let fh = c.create(&root, "again.txt", 0o644).await.unwrap();
        c.write_all(&fh, 0, b"again").await.unwrap();
        drop(c);
        let (me, endpoint) = (node.me.clone(), node.endpoint);
        node.member.leave().await;
        for (port, what) in [(endpoint, "endpoint"), (me.addr, "cross-node port")] {
            wait_for(
                Duration::from_secs(5),
                &format!("the {what} to be closed after leaving"),
                || {
                    let free = std::net::TcpListener::bind(port).is_ok();
                    async move { free.then_some(()) }
                },
            )
            .await;
        }
        let again = vol.node_at(me, endpoint).await;
        wait_for(LONG, "the node to own the volume again", || {
            let owns = matches!(again.member.role(), Role::Owner { .. });
            async move { owns.then_some(()) }
        })
        .await;
        let mut c = mount(endpoint).await;
        let root = c.root.clone();
        let fh = c.lookup(&root, "again.txt").await.unwrap();
        assert_eq!(c.read_all(&fh).await.unwrap(), b"again");
    });
}
