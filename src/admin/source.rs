//! What the admin endpoint reports on: the supervisor's volumes, and on a CSI node the
//! ReadWriteMany volumes it follows (whose gateways run on other nodes).

use std::sync::Arc;
use std::time::UNIX_EPOCH;

use actix::Addr;

use super::VolumeReport;
use crate::actors::{StatusAll, Supervisor, VolumeOf};
use crate::cluster::elect::Role;
use crate::fs::Volume;

/// One ReadWriteMany volume staged on this node: its node-local port and its role now.
#[derive(Debug, Clone)]
pub struct SharedVolume {
    pub name: String,
    pub port: u16,
    pub role: Role,
}

type Shared = dyn Fn() -> Vec<SharedVolume> + Send + Sync;

pub struct Source {
    supervisor: Addr<Supervisor>,
    shared: Option<Arc<Shared>>,
}

impl Source {
    pub fn new(supervisor: Addr<Supervisor>) -> Source {
        Source {
            supervisor,
            shared: None,
        }
    }

    /// Adds the node's ReadWriteMany volumes, as `shared` lists them when asked.
    pub fn with_shared(mut self, shared: impl Fn() -> Vec<SharedVolume> + Send + Sync + 'static) -> Source {
        self.shared = Some(Arc::new(shared));
        self
    }

    pub async fn volumes(&self) -> Vec<VolumeReport> {
        let running = self.supervisor.send(StatusAll).await.unwrap_or_default();
        let mut out: Vec<VolumeReport> = running
            .into_iter()
            .map(|st| {
                let s = st.stats;
                let secs = |t: std::time::SystemTime| t.duration_since(UNIX_EPOCH).ok().map(|d| d.as_secs());
                VolumeReport {
                    name: st.name,
                    port: st.listen.port(),
                    role: "single-node".into(),
                    owner: None,
                    local: true,
                    pending_files: s.pending_inodes,
                    pending_bytes: s.dirty_bytes,
                    pending_seconds: s.pending_for.as_secs_f64(),
                    uploads_in_flight: s.uploads_in_flight as u64,
                    last_error_at: s.last_error.as_ref().and_then(|(_, t)| secs(*t)),
                    last_error: s.last_error.map(|(e, _)| e),
                    last_upload_at: s.last_upload.and_then(secs),
                    capacity_bytes: s.usage.limited().then_some(s.usage.capacity),
                    used_bytes: s.usage.used_bytes,
                    files: s.usage.files,
                    failure: s.failure,
                }
            })
            .collect();
        for v in self.shared.as_ref().map(|f| f()).unwrap_or_default() {
            let (role, owner) = match &v.role {
                Role::Owner { .. } => ("owner", Some("this node".to_string())),
                Role::Follower { owner } => ("follower", Some(owner.identity())),
                Role::Unknown => ("unknown", None),
            };
            match out.iter_mut().find(|r| r.name == v.name) {
                // The owner gateway listens on an ephemeral port behind the node's endpoint:
                // the endpoint's is the port that is mounted.
                Some(r) => {
                    r.role = role.into();
                    r.owner = owner;
                    r.port = v.port;
                }
                None => out.push(VolumeReport {
                    name: v.name,
                    port: v.port,
                    role: role.into(),
                    owner,
                    local: false,
                    pending_files: 0,
                    pending_bytes: 0,
                    pending_seconds: 0.0,
                    uploads_in_flight: 0,
                    last_error: None,
                    last_error_at: None,
                    last_upload_at: None,
                    capacity_bytes: None,
                    used_bytes: 0,
                    files: 0,
                    failure: None,
                }),
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// The running volume `name`, when this process holds its data.
    pub async fn volume(&self, name: &str) -> Option<Arc<Volume>> {
        self.supervisor.send(VolumeOf(name.to_string())).await.ok().flatten()
    }
}
