//! The supervisor: the set of volumes a process serves. `s3nfs serve` starts its exports
//! through it and stops them all at shutdown; the CSI node plugin starts, finds, stops and
//! restores volumes through it all day. Nothing else starts or stops a volume.
//!
//! Callers serialise requests for one volume (the CSI node service holds a per-volume lock):
//! two concurrent starts of the same name would race for its port.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use actix::prelude::*;

use super::gateway::Gateway;
use super::volume::{Abandon, Close, Handle, SetCapacity, Status, VolumeActor, VolumeStatus};
use crate::config::Export;

struct Running {
    actor: Addr<VolumeActor>,
    addr: SocketAddr,
}

#[derive(Default)]
pub struct Supervisor {
    volumes: HashMap<String, Running>,
}

impl Actor for Supervisor {
    type Context = Context<Self>;
}

/// Starts the volume an export describes, or finds it running: its NFS address.
/// An error keeps the store's error as its source (see [`crate::store::StoreError`]), so that
/// callers can tell refused credentials from an unreachable S3.
///
/// `check`: refuse to start when S3 refuses the bucket or credentials (a new volume). Without
/// it (a volume restored after a restart) the gateway starts whatever S3 says, and serves what
/// is staged locally until S3 answers again.
#[derive(Message)]
#[rtype(result = "anyhow::Result<SocketAddr>")]
pub struct StartVolume {
    pub export: Export,
    pub check: bool,
    /// A ReadWriteMany owner's term; `None` for every other volume.
    pub term: Option<OwnerTerm>,
    /// The store to serve from, when the caller has one for the volume already (the CSI node
    /// reads the volume's record through it first); `None` opens the export's backend.
    pub store: Option<Arc<dyn crate::store::ObjectStore>>,
}

/// What a ReadWriteMany owner's gateway has that others do not (see [`crate::cluster`]): file
/// handles any owner reproduces, and a fence that stops its writes to S3 at once.
#[derive(Debug, Clone)]
pub struct OwnerTerm {
    /// The volume id in every handle, the same on every owner.
    pub volume_id: u64,
    pub fence: crate::store::fenced::Fence,
}

impl Handler<StartVolume> for Supervisor {
    type Result = ResponseActFuture<Self, anyhow::Result<SocketAddr>>;
    fn handle(&mut self, m: StartVolume, _: &mut Context<Self>) -> Self::Result {
        let (export, check, term, given) = (m.export, m.check, m.term, m.store);
        if let Some(r) = self.volumes.get(&export.name) {
            return Box::pin(fut::ready(Ok(r.addr)));
        }
        let name = export.name.clone();
        Box::pin(
            async move {
                let mut store = match given {
                    Some(s) => super::checked(&export, s, check).await?,
                    None => super::open_store(&export, check).await?,
                };
                let keyed = term.as_ref().map(|t| t.volume_id);
                let fence = term.map(|t| t.fence);
                if let Some(f) = &fence {
                    store = crate::store::fenced::FencedStore::wrap(store, f.clone());
                }
                let gw = Gateway::start_with(&export, store, crate::clock::Clock::system(), keyed).await;
                gw.map(|gw| (gw, fence))
            }
            .into_actor(self)
            .map(move |r, act, _| {
                let (gw, fence) = r?;
                // A term that ended while its gateway started (the volume left, or the lease
                // lost): the gateway is not one to serve, nor to hand to a later term.
                if fence.is_some_and(|f| f.is_raised()) {
                    gw.abandon();
                    anyhow::bail!("the term of volume {name} ended while its gateway started");
                }
                let addr = gw.addr;
                if act.volumes.contains_key(&name) {
                    anyhow::bail!("volume {name} was started twice at once");
                }
                let actor = VolumeActor::new(gw).start();
                act.volumes.insert(name, Running { actor, addr });
                Ok(addr)
            }),
        )
    }
}

/// Stops a volume (see [`Gateway::close`] for the order). Ok when it is not running.
#[derive(Message)]
#[rtype(result = "Result<(), String>")]
pub struct StopVolume(pub String);

impl Handler<StopVolume> for Supervisor {
    type Result = ResponseActFuture<Self, Result<(), String>>;
    fn handle(&mut self, m: StopVolume, _: &mut Context<Self>) -> Self::Result {
        let Some(r) = self.volumes.get(&m.0) else {
            return Box::pin(fut::ready(Ok(())));
        };
        let actor = r.actor.clone();
        let name = m.0;
        Box::pin(
            async move { actor.send(Close).await.unwrap_or_else(|e| Err(e.to_string())) }
                .into_actor(self)
                .map(move |r, act, _| {
                    if r.is_ok() {
                        act.volumes.remove(&name);
                    }
                    r
                }),
        )
    }
}

/// Ends a volume at once, uploading nothing more (a ReadWriteMany owner that lost its lease;
/// see [`Gateway::abandon`]). Done when it is not running.
#[derive(Message)]
#[rtype(result = "()")]
pub struct AbandonVolume(pub String);

impl Handler<AbandonVolume> for Supervisor {
    type Result = ResponseFuture<()>;
    fn handle(&mut self, m: AbandonVolume, _: &mut Context<Self>) -> Self::Result {
        let actor = self.volumes.remove(&m.0).map(|r| r.actor);
        Box::pin(async move {
            if let Some(a) = actor {
                let _ = a.send(Abandon).await;
            }
        })
    }
}

/// Stops every volume, each after its uploads (shutdown). Errors are per volume.
#[derive(Message)]
#[rtype(result = "Vec<(String, Result<(), String>)>")]
pub struct StopAll;

impl Handler<StopAll> for Supervisor {
    type Result = ResponseActFuture<Self, Vec<(String, Result<(), String>)>>;
    fn handle(&mut self, _: StopAll, _: &mut Context<Self>) -> Self::Result {
        let vols: Vec<_> = self.volumes.iter().map(|(n, r)| (n.clone(), r.actor.clone())).collect();
        Box::pin(
            async move {
                let closes = vols.into_iter().map(|(name, a)| async move {
                    let r = a.send(Close).await.unwrap_or_else(|e| Err(e.to_string()));
                    (name, r)
                });
                futures::future::join_all(closes).await
            }
            .into_actor(self)
            .map(|out, act, _| {
                for (name, r) in &out {
                    if r.is_ok() {
                        act.volumes.remove(name);
                    }
                }
                out
            }),
        )
    }
}

/// Sets a running volume's capacity; false when it is not running.
#[derive(Message)]
#[rtype(result = "bool")]
pub struct ResizeVolume(pub String, pub Option<u64>);

impl Handler<ResizeVolume> for Supervisor {
    type Result = bool;
    fn handle(&mut self, m: ResizeVolume, _: &mut Context<Self>) -> bool {
        match self.volumes.get(&m.0) {
            Some(r) => {
                r.actor.do_send(SetCapacity(m.1));
                true
            }
            None => false,
        }
    }
}

/// The volume itself, if it is running (see [`super::volume::Handle`]).
#[derive(Message)]
#[rtype(result = "Option<std::sync::Arc<crate::fs::Volume>>")]
pub struct VolumeOf(pub String);

impl Handler<VolumeOf> for Supervisor {
    type Result = ResponseFuture<Option<Arc<crate::fs::Volume>>>;
    fn handle(&mut self, m: VolumeOf, _: &mut Context<Self>) -> Self::Result {
        let actor = self.volumes.get(&m.0).map(|r| r.actor.clone());
        Box::pin(async move { actor?.send(Handle).await.ok().flatten() })
    }
}

/// The status of one volume, if it is running.
#[derive(Message)]
#[rtype(result = "Option<VolumeStatus>")]
pub struct VolumeStatusOf(pub String);

impl Handler<VolumeStatusOf> for Supervisor {
    type Result = ResponseFuture<Option<VolumeStatus>>;
    fn handle(&mut self, m: VolumeStatusOf, _: &mut Context<Self>) -> Self::Result {
        let actor = self.volumes.get(&m.0).map(|r| r.actor.clone());
        Box::pin(async move { actor?.send(Status).await.ok().flatten() })
    }
}

#[derive(Message)]
#[rtype(result = "Vec<VolumeStatus>")]
pub struct StatusAll;

impl Handler<StatusAll> for Supervisor {
    type Result = ResponseFuture<Vec<VolumeStatus>>;
    fn handle(&mut self, _: StatusAll, _: &mut Context<Self>) -> Self::Result {
        let vols: Vec<_> = self.volumes.values().map(|r| r.actor.clone()).collect();
        Box::pin(async move {
            let mut out = Vec::new();
            for a in vols {
                if let Ok(Some(s)) = a.send(Status).await {
                    out.push(s);
                }
            }
            out
        })
    }
}
