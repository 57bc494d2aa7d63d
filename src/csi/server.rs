//! Serving the CSI services on a Unix socket.

use std::future::Future;
use std::ops::Range;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;

use actix::Addr;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_stream::StreamExt;

use super::authority::{AnyAuthority, MAX_FRAME};
use super::calls::NodeCalls;
use super::controller::ControllerService;
use super::identity::IdentityService;
use super::mount::Mounter;
use super::node::NodeService;
use super::pb::{controller_server::ControllerServer, identity_server::IdentityServer, node_server::NodeServer};
use super::state::NodeState;
use super::Mode;
use crate::actors::Supervisor;

pub struct CsiOptions {
    pub mode: Mode,
    pub socket: PathBuf,
    pub node_id: String,
    pub state_dir: PathBuf,
    /// Ports the node's gateways listen on (127.0.0.1). Outside the kernel's ephemeral range,
    /// so that a restarted plugin finds its ports free.
    pub ports: Range<u16>,
    pub mounter: Arc<dyn Mounter>,
    /// ReadWriteMany volumes' leases and peers; `None` refuses them.
    pub cluster: Option<super::shared::Cluster>,
    /// Where the volumes' stores come from ([`crate::store::connect::S3Connector`] but in
    /// tests).
    pub stores: Arc<dyn crate::store::connect::Connector>,
    /// Where `s3nfs status` and `s3nfs flush` reach the node's volumes; `None`: nowhere.
    pub admin_socket: Option<PathBuf>,
}

/// Serves until `shutdown` completes. In node mode, every recorded volume's gateway is back
/// before the socket exists: a caller that can connect finds the node ready.
pub async fn serve(
    opts: CsiOptions,
    supervisor: Addr<Supervisor>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    // The admin socket is served for as long as the node is.
    let (node, _admin) = if opts.mode.node() {
        anyhow::ensure!(!opts.node_id.is_empty(), "--node-id is required in node mode");
        let state = NodeState::open(&opts.state_dir)
            .map_err(|e| anyhow::anyhow!("state directory {}: {e}", opts.state_dir.display()))?;
        let node = NodeService::new(
            opts.node_id.clone(),
            state,
            opts.ports.clone(),
            supervisor.clone(),
            opts.mounter.clone(),
            opts.stores.clone(),
        );
        let node = match opts.cluster {
            Some(c) => node.with_cluster(c),
            None => node,
        };
        node.restore().await;
        let admin = match &opts.admin_socket {
            Some(path) => {
                let source = crate::admin::source::Source::new(supervisor).with_shared(node.shared_volumes());
                crate::admin::server::serve(path, source).await?
            }
            None => None,
        };
        let calls = NodeCalls::new(Arc::new(node));
        let under_way = calls.under_way();
        (Some((NodeServer::new(calls), under_way)), admin)
    } else {
        (None, None)
    };
    let (node, node_calls) = node.unzip();
    let controller = opts
        .mode
        .controller()
        .then(|| ControllerServer::new(ControllerService::new(opts.stores.clone())));

    if let Some(dir) = opts.socket.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(&opts.socket) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            anyhow::bail!("cannot remove the old socket {}: {e}", opts.socket.display())
        }
        _ => {}
    }
    let listener = tokio::net::UnixListener::bind(&opts.socket)
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", opts.socket.display()))?;
    // Secrets travel over this socket: kubelet and the sidecars run as root.
    std::fs::set_permissions(&opts.socket, std::fs::Permissions::from_mode(0o600))?;
    tracing::info!(socket = %opts.socket.display(), mode = ?opts.mode, "CSI plugin serving");
    println!("s3nfs: CSI {:?} plugin on unix://{}", opts.mode, opts.socket.display());

    // Every client's `:authority` made acceptable to h2: gRPC's C core (Python's grpcio and
    // others) sends the socket's percent-encoded path, which h2 refuses (authority.rs).
    let incoming = UnixListenerStream::new(listener).map(|conn| conn.map(AnyAuthority::new));
    tonic::transport::Server::builder()
        // One span per call, so the RPC's work (S3 requests, the mount) nests under it.
        .trace_fn(|req| tracing::info_span!("csi", rpc = %req.uri().path().rsplit('/').next().unwrap_or("")))
        // The frame size AnyAuthority cuts rewritten header blocks to (h2's default, stated).
        .max_frame_size(MAX_FRAME as u32)
        .add_service(IdentityServer::new(IdentityService { mode: opts.mode }))
        .add_optional_service(controller)
        .add_optional_service(node)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    let _ = std::fs::remove_file(&opts.socket);
    // A call whose caller gave up still runs: its volume is left as it ends, not half-done.
    if let Some(calls) = node_calls {
        calls.idle().await;
    }
    Ok(())
}
