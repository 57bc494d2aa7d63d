//! Node: stages a volume (its gateway on 127.0.0.1, a kernel NFS mount at the staging path),
//! publishes it into pods (bind mounts), and undoes both. Gateways are started, stopped,
//! resized and restored only through the [`Supervisor`]; mounts go through the [`Mounter`].
//!
//! Every call is idempotent, as kubelet requires (it repeats calls after its own restart).
//! Calls for one volume are serialised; a call that arrives while another for the same volume
//! runs is answered Aborted, as the spec asks, and kubelet retries it.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use actix::Addr;
use tonic::{Request, Response, Status};

use super::controller::connect;
use super::mount::{MountEntry, Mounter};
use super::params::{capacity_for, check_capability, Params, S3Secret, VolumeId};
use super::pb::{self, node_server::Node, node_service_capability as nsc};
use super::record;
use super::shared::{lease_name, Cluster, SupervisedOwner};
use super::state::{DeferredStage as Deferred, NodeState, StagedVolume};
use super::{anyhow_status, store_status};
use crate::actors::{ResizeVolume, StartVolume, StopVolume, Supervisor, VolumeOf, VolumeStatusOf};
use crate::cluster::elect::Role;
use crate::cluster::lease::Holder;
use crate::cluster::member::{Member, MemberConfig};
use crate::config::{Backend, Export};
use crate::store::connect::Connector;
use crate::store::ObjectStore;
use crate::sync::LockExt;

pub struct NodeService {
    node_id: String,
    state: NodeState,
    ports: Range<u16>,
    supervisor: Addr<Supervisor>,
    mounter: Arc<dyn Mounter>,
    /// Where the volumes' stores come from: one client per staged volume.
    stores: Arc<dyn Connector>,
    /// The staged volumes, as recorded in `state`.
    staged: Arc<Mutex<HashMap<String, StagedVolume>>>,
    /// Volumes staged without a secret, waiting for the first publish to bring one.
    deferred: Mutex<HashMap<String, Deferred>>,
    port_alloc: Mutex<()>,
    busy: Arc<Mutex<HashSet<String>>>,
    /// Set when the plugin may take part in ReadWriteMany volumes.
    cluster: Option<Arc<Cluster>>,
    /// The member of each ReadWriteMany volume staged here.
    members: Arc<Mutex<HashMap<String, SharedMember>>>,
}

/// This node's part in a ReadWriteMany volume: the member, and the gateway it runs in its
/// terms as owner (which NodeExpandVolume resizes).
struct SharedMember {
    member: Member,
    owner: Arc<SupervisedOwner>,
}

/// How long NodeStage waits for a ReadWriteMany volume's owner to be known: a free lease is
/// taken at once, a lease held by a node that died is taken when it expires.
const SETTLE: std::time::Duration = std::time::Duration::from_secs(40);

/// Held while a call works on a volume.
struct VolumeLock {
    id: String,
    busy: Arc<Mutex<HashSet<String>>>,
}

impl Drop for VolumeLock {
    fn drop(&mut self) {
        self.busy.locked().remove(&self.id);
    }
}

fn required<'a>(v: &'a str, what: &str) -> Result<&'a str, Status> {
    if v.is_empty() {
        Err(Status::invalid_argument(format!("{what} is missing")))
    } else {
        Ok(v)
    }
}

fn internal(what: &str, e: impl std::fmt::Display) -> Status {
    Status::internal(format!("{what}: {e}"))
}

/// The gateway of a staged volume, as the supervisor starts it.
fn export_of(state: &NodeState, v: &StagedVolume, secret: &S3Secret) -> Result<Export, Status> {
    let id = VolumeId::parse(&v.volume_id)?;
    let ctx: HashMap<String, String> = v.context.clone().into_iter().collect();
    let params = Params::parse(&ctx, false)?;
    Ok(Export {
        name: v.volume_id.clone(),
        listen: SocketAddr::from(([127, 0, 0, 1], v.port)),
        backend: Backend::S3(secret.s3_config(&id.bucket)),
        prefix: id.prefix.clone(),
        state_dir: state.gateway_dir(&id),
        flush_delay: params.flush_delay,
        refresh: params.refresh,
        busy_defer: crate::fs::defer::MAX_DEFER,
        capacity: v.capacity,
        defaults: params.defaults,
        durability: params.durability,
        // The gateway listens on the node's loopback for the kubelet's mounts: a pod's root is
        // the volume's root, as on a disk of its own.
        squash: Default::default(),
    })
}

impl NodeService {
    pub fn new(
        node_id: String,
        state: NodeState,
        ports: Range<u16>,
        supervisor: Addr<Supervisor>,
        mounter: Arc<dyn Mounter>,
        stores: Arc<dyn Connector>,
    ) -> NodeService {
        NodeService {
            node_id,
            state,
            ports,
            supervisor,
            mounter,
            stores,
            staged: Default::default(),
            deferred: Default::default(),
            port_alloc: Mutex::new(()),
            busy: Default::default(),
            cluster: None,
            members: Default::default(),
        }
    }

    /// Lists the ReadWriteMany volumes staged here with their roles, whenever called (for
    /// `s3nfs status`).
    pub fn shared_volumes(&self) -> impl Fn() -> Vec<crate::admin::source::SharedVolume> + Send + Sync + 'static {
        let (staged, members) = (self.staged.clone(), self.members.clone());
        move || {
            let ports: HashMap<String, u16> = staged.locked().iter().map(|(k, v)| (k.clone(), v.port)).collect();
            members
                .locked()
                .iter()
                .map(|(name, m)| crate::admin::source::SharedVolume {
                    name: name.clone(),
                    port: ports.get(name).copied().unwrap_or(0),
                    role: m.member.role(),
                })
                .collect()
        }
    }

    /// Lets the plugin serve ReadWriteMany volumes.
    pub fn with_cluster(mut self, cluster: Cluster) -> NodeService {
        self.cluster = Some(Arc::new(cluster));
        self
    }

    /// Starts the volume's member (or finds it running). With `settle`, waits until an owner
    /// is known and fails if none is.
    async fn start_member(
        &self,
        v: &StagedVolume,
        export: Export,
        store: Arc<dyn ObjectStore>,
        settle: bool,
    ) -> Result<(), Status> {
        let c = self.cluster.clone().ok_or_else(|| {
            Status::failed_precondition(format!(
                "volume {}: ReadWriteMany needs the node plugin started with --lease-api, --node-address and --peer-cert/--peer-key (the Helm chart sets them)",
                v.volume_id
            ))
        })?;
        if !self.members.locked().contains_key(&v.volume_id) {
            let vol = VolumeId::parse(&v.volume_id)?;
            let owner = Arc::new(SupervisedOwner::new(self.supervisor.clone(), export, store).with_record(vol));
            let cfg = MemberConfig {
                lease: lease_name(&v.volume_id),
                me: Holder {
                    node: self.node_id.clone(),
                    addr: SocketAddr::new(c.address, v.port),
                },
                endpoint: SocketAddr::from(([127, 0, 0, 1], v.port)),
                timing: c.timing,
            };
            let member = Member::start(
                cfg,
                c.leases.clone(),
                c.tls.clone(),
                owner.clone(),
                crate::clock::Clock::system(),
            )
            .await
            .map_err(|e| Status::internal(format!("volume {}: {e:#}", v.volume_id)))?;
            self.members
                .locked()
                .insert(v.volume_id.clone(), SharedMember { member, owner });
        }
        if !settle {
            return Ok(());
        }
        let m = self.members.locked().remove(&v.volume_id);
        let Some(m) = m else { return Ok(()) };
        let role = m.member.settled(SETTLE).await;
        if role == Role::Unknown {
            m.member.leave().await;
            return Err(Status::unavailable(format!(
                "volume {}: no owner within {SETTLE:?}: is the Kubernetes API server reachable? will retry",
                v.volume_id
            )));
        }
        tracing::info!(volume = %v.volume_id, ?role, "ReadWriteMany volume joined");
        self.members.locked().insert(v.volume_id.clone(), m);
        Ok(())
    }

    /// Brings back the gateway of every recorded volume on its port, before any call is
    /// answered. S3 need not be reachable: the gateway serves what is staged and uploads later.
    pub async fn restore(&self) {
        for d in self.state.load_deferred() {
            match d {
                Ok((id, d)) => {
                    tracing::info!(volume = %id, "stage deferred to the first publish, as recorded");
                    self.deferred.locked().insert(id, d);
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot read a deferred stage's record; the volume's publish will fail until it is staged again")
                }
            }
        }
        let recorded = self.state.load_all();
        if !recorded.is_empty() {
            tracing::info!(volumes = recorded.len(), "restoring the gateways of staged volumes");
        }
        for r in recorded {
            let (v, secret) = match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read a staged volume's record; its mount will hang until it is staged again");
                    continue;
                }
            };
            if v.multi_node {
                let started = match self.recorded_export(&v, &secret).await {
                    Ok((export, store)) => self.start_member(&v, export, store, false).await,
                    Err(s) => Err(s),
                };
                match started {
                    Ok(()) => tracing::info!(volume = %v.volume_id, "ReadWriteMany member restored"),
                    Err(e) => {
                        tracing::error!(volume = %v.volume_id, error = %e.message(), "cannot restore the ReadWriteMany member")
                    }
                }
                self.staged.locked().insert(v.volume_id.clone(), v);
                continue;
            }
            match self.start_recorded(&v, &secret).await {
                Ok(addr) => tracing::info!(volume = %v.volume_id, %addr, "gateway restored"),
                Err(e) => tracing::error!(volume = %v.volume_id, error = %e, "cannot restore the gateway"),
            }
            self.staged.locked().insert(v.volume_id.clone(), v);
        }
    }

    fn lock(&self, id: &str) -> Result<VolumeLock, Status> {
        if !self.busy.locked().insert(id.to_string()) {
            return Err(Status::aborted(format!(
                "an operation on volume {id} is already in progress"
            )));
        }
        Ok(VolumeLock {
            id: id.to_string(),
            busy: self.busy.clone(),
        })
    }

    fn staged(&self, id: &str) -> Option<StagedVolume> {
        self.staged.locked().get(id).cloned()
    }

    fn save(&self, v: &StagedVolume, secret: Option<&S3Secret>) -> Result<(), Status> {
        self.state
            .save(v, secret)
            .map_err(|e| internal("recording the volume in the state directory", e))?;
        self.staged.locked().insert(v.volume_id.clone(), v.clone());
        Ok(())
    }

    /// A port in the range that no recorded volume holds and that is free now.
    fn free_port(&self) -> Result<u16, Status> {
        let held: HashSet<u16> = self.staged.locked().values().map(|v| v.port).collect();
        self.ports
            .clone()
            .filter(|p| !held.contains(p))
            .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
            .ok_or_else(|| {
                Status::resource_exhausted(format!(
                    "no free port in {}-{} for another gateway",
                    self.ports.start,
                    self.ports.end - 1
                ))
            })
    }

    /// Starts (or finds) the volume's gateway and mounts it at the staging path. Leaves nothing
    /// behind when it fails. The caller holds the volume's lock.
    async fn stage(&self, vol: &VolumeId, d: Deferred, secret: &S3Secret) -> Result<(), Status> {
        let id = vol.to_id();
        let staging = d.staging_path;
        if let Some(v) = self.staged(&id) {
            if v.staging_path != staging {
                return Err(Status::already_exists(format!(
                    "volume {id} is already staged at {}",
                    v.staging_path.display()
                )));
            }
            if self.is_staged_at(&staging, v.port).await? {
                let same = (v.single_target, v.read_only, v.multi_node) == (d.single_target, d.read_only, d.multi_node);
                if !same {
                    // The spec's answer for a volume staged here with a capability this one
                    // contradicts: it is not staged again under other terms.
                    return Err(Status::already_exists(format!(
                        "volume {id} is staged at {} with another access mode",
                        staging.display()
                    )));
                }
                return Ok(());
            }
        }

        // The volume's capacity as last expanded, from its record (none for a static PV);
        // this is also where refused credentials or an unreachable S3 show, before anything
        // is made.
        let store = connect(&*self.stores, secret, &vol.bucket).await?;
        let capacity = record::read(&*store, vol)
            .await
            .map_err(|e| store_status(&e, &format!("reading volume {id} in S3")))?
            .map(|rec| rec.capacity_bytes);
        // Choosing a port and recording it are one step: volumes staged at the same time
        // (each under its own lock) must not pick the same free port.
        let alloc = self.port_alloc.locked();
        let port = match self.staged(&id) {
            Some(v) => v.port,
            None => self.free_port()?,
        };
        let v = StagedVolume {
            volume_id: id.clone(),
            port,
            staging_path: staging.clone(),
            capacity,
            context: d.context,
            single_target: d.single_target,
            read_only: d.read_only,
            targets: self.staged(&id).map(|v| v.targets).unwrap_or_default(),
            multi_node: d.multi_node,
        };
        let export = export_of(&self.state, &v, secret)?;
        // A gateway's state from before (a node rebooted with the volume staged) may hold
        // what is not in S3 yet: a stage that fails keeps it for the next try.
        let had_state = self.state.gateway_dir(vol).exists();
        // Recorded before the mount exists: a plugin that dies between the two brings the
        // gateway back for the mount.
        self.save(&v, Some(secret))?;
        drop(alloc);
        // `stopped`: no gateway of this call runs on (one that would not stop still has its
        // state in use).
        let undo = |this: &Self, stopped: bool| {
            this.staged.locked().remove(&id);
            if stopped && !had_state {
                let _ = this.state.remove(vol);
            }
        };
        let started = if v.multi_node {
            self.start_member(&v, export, store, true)
                .await
                .map(|()| Ok(Ok(SocketAddr::from(([127, 0, 0, 1], port)))))
        } else {
            Ok(self
                .supervisor
                .send(StartVolume {
                    export,
                    check: true,
                    term: None,
                    store: Some(store),
                })
                .await)
        };
        let started = match started {
            Ok(s) => s,
            Err(status) => {
                undo(self, true);
                return Err(status);
            }
        };
        match started {
            Ok(Ok(addr)) => tracing::info!(volume = %id, %addr, "gateway started"),
            Ok(Err(e)) => {
                undo(self, true);
                return Err(anyhow_status(&e, &format!("starting the gateway of volume {id}")));
            }
            Err(e) => {
                undo(self, true);
                return Err(internal("supervisor", e));
            }
        }
        let st = staging.clone();
        let mounted = self
            .mnt(move |m| {
                std::fs::create_dir_all(&st)?;
                m.mount_nfs(port, &st)
            })
            .await
            .map_err(|e| internal(&format!("NFS mount of the gateway on {}", staging.display()), e));
        if let Err(s) = mounted {
            let member = self.members.locked().remove(&id);
            let stopped = match member {
                Some(m) => {
                    m.member.leave().await;
                    true
                }
                None => matches!(self.supervisor.send(StopVolume(id.clone())).await, Ok(Ok(()))),
            };
            undo(self, stopped);
            return Err(s);
        }
        // Done, whichever call staged it (a publish takes the deferred stage out of the map
        // before it stages).
        self.deferred.locked().remove(&id);
        if let Err(e) = self.state.remove_deferred(vol) {
            // Harmless: a restarted plugin would find the volume staged at that path.
            tracing::warn!(volume = %id, error = %e, "cannot remove the record of the deferred stage");
        }
        tracing::info!(volume = %id, staging = %staging.display(), port, "volume staged");
        Ok(())
    }

    /// A recorded volume's export and store, as its record and secret say.
    async fn recorded_export(
        &self,
        v: &StagedVolume,
        secret: &S3Secret,
    ) -> Result<(Export, Arc<dyn ObjectStore>), Status> {
        let export = export_of(&self.state, v, secret)?;
        let id = VolumeId::parse(&v.volume_id)?;
        Ok((export, connect(&*self.stores, secret, &id.bucket).await?))
    }

    /// Starts the gateway of a recorded single-node volume from its record; its address. S3 is
    /// not checked: the gateway serves what is staged and uploads later.
    async fn start_recorded(&self, v: &StagedVolume, secret: &S3Secret) -> Result<SocketAddr, String> {
        let (export, store) = self
            .recorded_export(v, secret)
            .await
            .map_err(|s| s.message().to_string())?;
        self.supervisor
            .send(StartVolume {
                export,
                check: false,
                term: None,
                store: Some(store),
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("{e:#}"))
    }

    /// Starts the gateway of a recorded volume that is not running, for its close to upload
    /// what its state holds; nothing to do for one running or without state. Unavailable (kubelet
    /// retries, the state stays) when it cannot start.
    async fn start_to_unstage(&self, vol: &VolumeId) -> Result<(), Status> {
        let id = vol.to_id();
        if !self.state.gateway_dir(vol).exists()
            || self
                .supervisor
                .send(VolumeOf(id.clone()))
                .await
                .ok()
                .flatten()
                .is_some()
        {
            return Ok(());
        }
        let cannot = |e: String| {
            Status::unavailable(format!(
                "volume {id}: its gateway is not running and cannot start to upload what it holds ({e}); its state is kept; will retry"
            ))
        };
        let (v, secret) = self.state.load(vol).map_err(cannot)?;
        if v.multi_node {
            // A ReadWriteMany owner's terms start from S3 alone (each throws away the local
            // state of the one before), and a gateway outside a term must not write for it.
            return Ok(());
        }
        self.start_recorded(&v, &secret).await.map_err(cannot)?;
        tracing::info!(volume = %id, "gateway started to upload what it holds before unstaging");
        Ok(())
    }

    /// Runs mount work on a blocking thread. Not only because it blocks: an NFS mount or
    /// unmount waits for the gateway, which answers from this same process's runtime; on a
    /// one-CPU node a mount(2) on the runtime's only worker would wait for itself.
    async fn mnt<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Mounter) -> std::io::Result<T> + Send + 'static,
    ) -> std::io::Result<T> {
        let m = self.mounter.clone();
        tokio::task::spawn_blocking(move || f(&*m))
            .await
            .map_err(std::io::Error::other)?
    }

    async fn mounted(&self, path: &Path) -> Result<Option<MountEntry>, Status> {
        let p = path.to_path_buf();
        self.mnt(move |m| m.mounted(&p))
            .await
            .map_err(|e| internal("reading the mount table", e))
    }

    /// Whether `path` holds the NFS mount of the gateway on `port`.
    async fn is_staged_at(&self, path: &Path, port: u16) -> Result<bool, Status> {
        let m = self.mounted(path).await?;
        Ok(m.is_some_and(|m| m.fstype.starts_with("nfs") && m.port == Some(port)))
    }
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(
        &self,
        req: Request<pb::NodeStageVolumeRequest>,
    ) -> Result<Response<pb::NodeStageVolumeResponse>, Status> {
        let r = req.into_inner();
        let vol = VolumeId::parse(&r.volume_id)?;
        let staging = PathBuf::from(required(&r.staging_target_path, "staging_target_path")?);
        let cap = r
            .volume_capability
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("volume_capability is missing"))?;
        let access = check_capability(cap).map_err(Status::invalid_argument)?;
        Params::parse(&r.volume_context, false)?;
        if access.multi_node && self.cluster.is_none() {
            return Err(Status::failed_precondition(format!(
                "volume {}: ReadWriteMany needs the node plugin started with --lease-api, --node-address and --peer-cert/--peer-key (the Helm chart sets them)",
                vol.to_id()
            )));
        }
        let id = vol.to_id();
        let _lock = self.lock(&id)?;
        if r.secrets.is_empty() {
            // A static PV written for csi-s3 may carry only a node-publish secret: stage at
            // the first publish, which brings it.
            tracing::info!(volume = %id, "no node-stage secret: the gateway starts at the first publish");
            let d = Deferred {
                staging_path: staging,
                context: r.volume_context.into_iter().collect(),
                single_target: access.single_target,
                read_only: access.read_only,
                multi_node: access.multi_node,
            };
            self.state
                .save_deferred(&vol, &d)
                .map_err(|e| internal("recording the deferred stage", e))?;
            self.deferred.locked().insert(id, d);
            return Ok(Response::new(pb::NodeStageVolumeResponse {}));
        }
        let secret = S3Secret::parse(&r.secrets, "node-stage")?;
        self.stage(
            &vol,
            Deferred {
                staging_path: staging,
                context: r.volume_context.into_iter().collect(),
                single_target: access.single_target,
                read_only: access.read_only,
                multi_node: access.multi_node,
            },
            &secret,
        )
        .await?;
        Ok(Response::new(pb::NodeStageVolumeResponse {}))
    }

    async fn node_unstage_volume(
        &self,
        req: Request<pb::NodeUnstageVolumeRequest>,
    ) -> Result<Response<pb::NodeUnstageVolumeResponse>, Status> {
        let r = req.into_inner();
        let vol = VolumeId::parse(&r.volume_id)?;
        let staging = PathBuf::from(required(&r.staging_target_path, "staging_target_path")?);
        let id = vol.to_id();
        let _lock = self.lock(&id)?;
        // Unmounting first makes the kernel client send what it still holds.
        let st = staging.clone();
        self.mnt(move |m| m.unmount(&st))
            .await
            .map_err(|e| internal(&format!("unmounting {}", staging.display()), e))?;
        if let Some(v) = self.staged(&id) {
            if v.staging_path != staging {
                return Err(Status::invalid_argument(format!(
                    "volume {id} is staged at {}, not {}",
                    v.staging_path.display(),
                    staging.display()
                )));
            }
        }
        let member = self.members.locked().remove(&id);
        if let Some(m) = member {
            // Hands the volume over if this node owns it (see `Member::leave`).
            m.member.leave().await;
        } else {
            // A recorded volume whose gateway is not running (it could not be brought back
            // after a restart) may hold what is not in S3 yet: its gateway runs once more, to
            // upload it, before its state goes.
            self.start_to_unstage(&vol).await?;
            // Returns once every byte is in S3; if S3 refuses, the gateway and its record stay
            // (still uploading in the background) and kubelet retries.
            match self.supervisor.send(StopVolume(id.clone())).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(Status::unavailable(format!("volume {id}: {e}; will retry"))),
                Err(e) => return Err(internal("supervisor", e)),
            }
        }
        self.staged.locked().remove(&id);
        self.state
            .remove(&vol)
            .map_err(|e| internal("removing the volume's local state", e))?;
        // Its record went with the state.
        self.deferred.locked().remove(&id);
        tracing::info!(volume = %id, "volume unstaged; all its data is in S3");
        Ok(Response::new(pb::NodeUnstageVolumeResponse {}))
    }

    async fn node_publish_volume(
        &self,
        req: Request<pb::NodePublishVolumeRequest>,
    ) -> Result<Response<pb::NodePublishVolumeResponse>, Status> {
        let r = req.into_inner();
        let vol = VolumeId::parse(&r.volume_id)?;
        let staging = PathBuf::from(required(&r.staging_target_path, "staging_target_path")?);
        let target = PathBuf::from(required(&r.target_path, "target_path")?);
        let cap = r
            .volume_capability
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("volume_capability is missing"))?;
        let access = check_capability(cap).map_err(Status::invalid_argument)?;
        let mut read_only = r.readonly || access.read_only;
        let id = vol.to_id();
        let _lock = self.lock(&id)?;
        let deferred = self.deferred.locked().remove(&id);
        if let Some(d) = deferred {
            if d.staging_path == staging {
                let staged = match S3Secret::parse(&r.secrets, "node-publish") {
                    Ok(secret) => self.stage(&vol, d.clone(), &secret).await,
                    Err(s) => Err(s),
                };
                if let Err(s) = staged {
                    self.deferred.locked().insert(id.clone(), d);
                    return Err(s);
                }
            } else {
                self.deferred.locked().insert(id.clone(), d);
            }
        }
        let mut v = self.staged(&id).filter(|v| v.staging_path == staging).ok_or_else(|| {
            Status::failed_precondition(format!("volume {id} is not staged at {}", staging.display()))
        })?;
        // Staged in a read-only mode: no target may write, whatever this call says.
        read_only |= v.read_only;
        if !self.is_staged_at(&staging, v.port).await? {
            return Err(Status::failed_precondition(format!(
                "volume {id}: nothing is mounted at the staging path {}",
                staging.display()
            )));
        }
        let stage_dev = self.mounted(&staging).await?.map(|m| m.device);
        if let Some(m) = self.mounted(&target).await? {
            if Some(&m.device) == stage_dev.as_ref() && m.read_only == read_only {
                if !v.targets.contains_key(&target) {
                    // This volume's bind, made by a publish that ended before recording it (the
                    // plugin killed in between): recorded now, so its unpublish and unstage
                    // know it.
                    v.targets.insert(target, read_only);
                    self.save(&v, None)?;
                }
                return Ok(Response::new(pb::NodePublishVolumeResponse {}));
            }
            return Err(Status::already_exists(format!(
                "{} is already mounted, from something else or with other options",
                target.display()
            )));
        }
        if (access.single_target || v.single_target) && v.targets.keys().any(|t| *t != target) {
            return Err(Status::failed_precondition(format!(
                "volume {id} is SINGLE_NODE_SINGLE_WRITER and already published at {}",
                v.targets.keys().next().unwrap().display()
            )));
        }
        let (st, t) = (staging.clone(), target.clone());
        self.mnt(move |m| {
            std::fs::create_dir_all(&t)?;
            m.bind(&st, &t, read_only)
        })
        .await
        .map_err(|e| internal(&format!("bind mount on {}", target.display()), e))?;
        v.targets.insert(target, read_only);
        self.save(&v, None)?;
        Ok(Response::new(pb::NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        req: Request<pb::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<pb::NodeUnpublishVolumeResponse>, Status> {
        let r = req.into_inner();
        let vol = VolumeId::parse(&r.volume_id)?;
        let target = PathBuf::from(required(&r.target_path, "target_path")?);
        let id = vol.to_id();
        let _lock = self.lock(&id)?;
        let t = target.clone();
        self.mnt(move |m| {
            m.unmount(&t)?;
            match std::fs::remove_dir(&t) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        })
        .await
        .map_err(|e| internal(&format!("unmounting and removing {}", target.display()), e))?;
        if let Some(mut v) = self.staged(&id) {
            if v.targets.remove(&target).is_some() {
                self.save(&v, None)?;
            }
        }
        Ok(Response::new(pb::NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        req: Request<pb::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<pb::NodeGetVolumeStatsResponse>, Status> {
        let r = req.into_inner();
        let vol = VolumeId::parse(&r.volume_id)?;
        let path = PathBuf::from(required(&r.volume_path, "volume_path")?);
        let id = vol.to_id();
        let v = self
            .staged(&id)
            .ok_or_else(|| Status::not_found(format!("volume {id} is not staged on this node")))?;
        if path != v.staging_path && !v.targets.contains_key(&path) {
            return Err(Status::not_found(format!(
                "{} is not a path of volume {id}",
                path.display()
            )));
        }
        let role = self.members.locked().get(&id).map(|m| m.member.role());
        match role {
            None | Some(Role::Owner { .. }) => {}
            Some(r) => {
                // Usage is the owner's to tell; this node only relays.
                let message = match &r {
                    Role::Follower { owner } => format!("ReadWriteMany volume owned by node {}", owner.node),
                    _ => "ReadWriteMany volume: no owner known; writes wait".into(),
                };
                return Ok(Response::new(pb::NodeGetVolumeStatsResponse {
                    usage: vec![],
                    volume_condition: Some(pb::VolumeCondition {
                        abnormal: matches!(r, Role::Unknown),
                        message,
                    }),
                }));
            }
        }
        let owner_note = if role.is_some() {
            format!("ReadWriteMany volume owned by this node ({})", self.node_id)
        } else {
            "gateway serving".into()
        };
        let st = self
            .supervisor
            .send(VolumeStatusOf(id.clone()))
            .await
            .map_err(|e| internal("supervisor", e))?
            .ok_or_else(|| Status::not_found(format!("volume {id} has no running gateway")))?;
        let u = st.stats.usage;
        let usage = |unit: pb::volume_usage::Unit, total: u64, used: u64| pb::VolumeUsage {
            available: total.saturating_sub(used) as i64,
            total: total as i64,
            used: used as i64,
            unit: unit as i32,
        };
        Ok(Response::new(pb::NodeGetVolumeStatsResponse {
            usage: vec![
                usage(pb::volume_usage::Unit::Bytes, u.capacity, u.used_bytes),
                usage(pb::volume_usage::Unit::Inodes, crate::fs::usage::FILE_SLOTS, u.files),
            ],
            volume_condition: Some(pb::VolumeCondition {
                abnormal: st.stats.failure.is_some(),
                message: st.stats.failure.unwrap_or(owner_note),
            }),
        }))
    }

    async fn node_expand_volume(
        &self,
        req: Request<pb::NodeExpandVolumeRequest>,
    ) -> Result<Response<pb::NodeExpandVolumeResponse>, Status> {
        let r = req.into_inner();
        let vol = VolumeId::parse(&r.volume_id)?;
        required(&r.volume_path, "volume_path")?;
        let id = vol.to_id();
        let _lock = self.lock(&id)?;
        let mut v = self
            .staged(&id)
            .ok_or_else(|| Status::not_found(format!("volume {id} is not staged on this node")))?;
        let wanted = match &r.capacity_range {
            Some(range) => capacity_for(Some(range))?,
            None => {
                // No size given: the record in the bucket says what the controller set.
                let (_, secret) = self
                    .state
                    .load(&vol)
                    .map_err(|e| Status::not_found(format!("volume {id} has no credentials on this node: {e}")))?;
                let store = connect(&*self.stores, &secret, &vol.bucket).await?;
                record::read(&*store, &vol)
                    .await
                    .map_err(|e| store_status(&e, &format!("reading volume {id}")))?
                    .map(|rec| rec.capacity_bytes)
                    .ok_or_else(|| Status::failed_precondition(format!("volume {id} has no capacity record")))?
            }
        };
        let capacity = v.capacity.map_or(wanted, |c| c.max(wanted));
        v.capacity = Some(capacity);
        self.save(&v, None)?;
        if v.multi_node {
            // Kubelet expands the volume on every node that has it staged: each member keeps
            // the capacity for its terms as owner, and the owner's gateway takes it now.
            let owner = self.members.locked().get(&id).map(|m| m.owner.clone());
            let owner = owner.ok_or_else(|| {
                Status::unavailable(format!(
                    "volume {id}: its ReadWriteMany member is not running; will retry"
                ))
            })?;
            let capacity = owner.resize(capacity).await;
            tracing::info!(volume = %id, capacity, "ReadWriteMany volume capacity raised");
            return Ok(Response::new(pb::NodeExpandVolumeResponse {
                capacity_bytes: capacity as i64,
            }));
        }
        if !self
            .supervisor
            .send(ResizeVolume(id.clone(), Some(capacity)))
            .await
            .map_err(|e| internal("supervisor", e))?
        {
            return Err(Status::not_found(format!("volume {id} has no running gateway")));
        }
        tracing::info!(volume = %id, capacity, "volume capacity raised");
        Ok(Response::new(pb::NodeExpandVolumeResponse {
            capacity_bytes: capacity as i64,
        }))
    }

    async fn node_get_capabilities(
        &self,
        _: Request<pb::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<pb::NodeGetCapabilitiesResponse>, Status> {
        let rpc = |t: nsc::rpc::Type| pb::NodeServiceCapability {
            r#type: Some(nsc::Type::Rpc(nsc::Rpc { r#type: t as i32 })),
        };
        Ok(Response::new(pb::NodeGetCapabilitiesResponse {
            capabilities: vec![
                rpc(nsc::rpc::Type::StageUnstageVolume),
                rpc(nsc::rpc::Type::GetVolumeStats),
                rpc(nsc::rpc::Type::ExpandVolume),
                rpc(nsc::rpc::Type::VolumeCondition),
                rpc(nsc::rpc::Type::SingleNodeMultiWriter),
            ],
        }))
    }

    async fn node_get_info(
        &self,
        _: Request<pb::NodeGetInfoRequest>,
    ) -> Result<Response<pb::NodeGetInfoResponse>, Status> {
        Ok(Response::new(pb::NodeGetInfoResponse {
            node_id: self.node_id.clone(),
            max_volumes_per_node: 0,
        }))
    }
}
