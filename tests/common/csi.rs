//! The CSI plugin for tests: in-process (the real services and supervisor, with the fake
//! mounter, since this machine's kernel has no NFS client) or the `s3nfs csi` binary, and gRPC
//! clients on its Unix socket.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use s3nfs::csi::mount::{FakeMounter, Mounter};
use s3nfs::csi::pb::controller_client::ControllerClient;
use s3nfs::csi::pb::identity_client::IdentityClient;
use s3nfs::csi::pb::node_client::NodeClient;
use s3nfs::csi::pb::{self, volume_capability};
use tonic::transport::Channel;

/// Runs `f` inside an actix system on a multi-threaded tokio runtime, as `s3nfs csi` does.
pub fn run<F: Future>(f: F) -> F::Output {
    let sys = actix_rt::System::with_tokio_rt(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    });
    sys.block_on(f)
}

pub struct Clients {
    pub identity: IdentityClient<Channel>,
    pub controller: ControllerClient<Channel>,
    pub node: NodeClient<Channel>,
}

/// Connects to the socket, waiting until it answers (the node restores its gateways first).
pub async fn connect(socket: &Path) -> Clients {
    let path = socket.to_path_buf();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let p = path.clone();
        let r = tonic::transport::Endpoint::try_from("http://[::1]:1")
            .unwrap()
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let p = p.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(p).await?))
                }
            }))
            .await;
        match r {
            Ok(ch) => {
                return Clients {
                    identity: IdentityClient::new(ch.clone()),
                    controller: ControllerClient::new(ch.clone()),
                    node: NodeClient::new(ch),
                }
            }
            Err(e) if std::time::Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("cannot connect to {}: {e}", path.display()),
        }
    }
}

/// The plugin (mode all) inside the test process.
pub struct InProcPlugin {
    pub socket: PathBuf,
    pub state: PathBuf,
    pub mounter: Arc<FakeMounter>,
    pub supervisor: actix::Addr<s3nfs::actors::Supervisor>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl InProcPlugin {
    /// `dir` holds the socket and the state directory.
    pub async fn start(dir: &Path, ports: std::ops::Range<u16>) -> InProcPlugin {
        Self::start_on(dir, ports, Arc::new(s3nfs::store::connect::S3Connector)).await
    }

    /// [`InProcPlugin::start`] with the services' stores from `stores` (S3, or embedded buckets
    /// with or without faults).
    pub async fn start_on(
        dir: &Path,
        ports: std::ops::Range<u16>,
        stores: Arc<dyn s3nfs::store::connect::Connector>,
    ) -> InProcPlugin {
        use actix::Actor;
        let socket = dir.join("csi.sock");
        let state = dir.join("state");
        let mounter = Arc::new(FakeMounter::default());
        let supervisor = s3nfs::actors::Supervisor::default().start();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let opts = s3nfs::csi::CsiOptions {
            mode: s3nfs::csi::Mode::All,
            socket: socket.clone(),
            node_id: "test-node".into(),
            state_dir: state.clone(),
            ports,
            mounter: mounter.clone() as Arc<dyn Mounter>,
            cluster: None,
            stores,
            admin_socket: None,
        };
        let sup = supervisor.clone();
        let task = actix_rt::spawn(async move {
            s3nfs::csi::serve(opts, sup, async {
                let _ = rx.await;
            })
            .await
        });
        InProcPlugin {
            socket,
            state,
            mounter,
            supervisor,
            stop: Some(tx),
            task: Some(task),
        }
    }

    pub async fn stop(mut self) {
        drop(self.stop.take());
        if let Some(t) = self.task.take() {
            t.await.unwrap().unwrap();
        }
    }
}

/// A mount capability in `mode`.
pub fn mount_cap(mode: volume_capability::access_mode::Mode) -> pb::VolumeCapability {
    pb::VolumeCapability {
        access_type: Some(volume_capability::AccessType::Mount(
            volume_capability::MountVolume::default(),
        )),
        access_mode: Some(volume_capability::AccessMode { mode: mode as i32 }),
    }
}

pub fn rwo() -> pb::VolumeCapability {
    mount_cap(volume_capability::access_mode::Mode::SingleNodeWriter)
}

/// The fd count and resident memory of this process.
pub fn fds_and_rss() -> (usize, u64) {
    let fds = std::fs::read_dir("/proc/self/fd").unwrap().count();
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        * 1024;
    (fds, rss)
}

pub fn stage_req(
    id: &str,
    staging: &Path,
    cap: pb::VolumeCapability,
    secrets: std::collections::HashMap<String, String>,
    context: &[(&str, &str)],
) -> pb::NodeStageVolumeRequest {
    pb::NodeStageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.to_string_lossy().into(),
        volume_capability: Some(cap),
        secrets,
        volume_context: context.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        ..Default::default()
    }
}

pub fn publish_req(
    id: &str,
    staging: &Path,
    target: &Path,
    cap: pb::VolumeCapability,
    read_only: bool,
    secrets: std::collections::HashMap<String, String>,
) -> pb::NodePublishVolumeRequest {
    pb::NodePublishVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.to_string_lossy().into(),
        target_path: target.to_string_lossy().into(),
        volume_capability: Some(cap),
        readonly: read_only,
        secrets,
        ..Default::default()
    }
}

pub fn unpublish_req(id: &str, target: &Path) -> pb::NodeUnpublishVolumeRequest {
    pb::NodeUnpublishVolumeRequest {
        volume_id: id.into(),
        target_path: target.to_string_lossy().into(),
    }
}

pub fn unstage_req(id: &str, staging: &Path) -> pb::NodeUnstageVolumeRequest {
    pb::NodeUnstageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.to_string_lossy().into(),
    }
}
