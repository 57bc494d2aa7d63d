//! The actor of one volume: owns its [`Gateway`] (listener, background tasks, database,
//! staging). Only lifecycle and queries go through its mailbox; NFS requests reach the volume
//! directly from the listener's tasks.

use actix::prelude::*;

use super::gateway::Gateway;
use crate::fs::usage::UsageSnapshot;

pub struct VolumeActor {
    /// None only while a close is running.
    gateway: Option<Gateway>,
}

impl VolumeActor {
    pub fn new(gateway: Gateway) -> VolumeActor {
        VolumeActor { gateway: Some(gateway) }
    }
}

impl Actor for VolumeActor {
    type Context = Context<Self>;
}

/// Runs the gateway's stop sequence; the actor stops when it succeeded.
#[derive(Message)]
#[rtype(result = "Result<(), String>")]
pub struct Close;

impl Handler<Close> for VolumeActor {
    type Result = ResponseActFuture<Self, Result<(), String>>;
    fn handle(&mut self, _: Close, _: &mut Context<Self>) -> Self::Result {
        let Some(gw) = self.gateway.take() else {
            return Box::pin(fut::ready(Err("a close of this volume is already running".to_string())));
        };
        Box::pin(gw.close().into_actor(self).map(|r, act, ctx| match r {
            Ok(()) => {
                ctx.stop();
                Ok(())
            }
            Err((gw, e)) => {
                act.gateway = Some(gw);
                Err(e.to_string())
            }
        }))
    }
}

/// Ends the volume now, without uploading (see [`Gateway::abandon`]); the actor stops.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Abandon;

impl Handler<Abandon> for VolumeActor {
    type Result = ();
    fn handle(&mut self, _: Abandon, ctx: &mut Context<Self>) {
        if let Some(gw) = self.gateway.take() {
            gw.abandon();
        }
        ctx.stop();
    }
}

/// Sets the volume's capacity (online expansion).
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetCapacity(pub Option<u64>);

impl Handler<SetCapacity> for VolumeActor {
    type Result = ();
    fn handle(&mut self, m: SetCapacity, _: &mut Context<Self>) {
        if let Some(gw) = &self.gateway {
            gw.vol.set_capacity(m.0);
        }
    }
}

/// What an operator asks: `s3nfs status`, NodeGetVolumeStats.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VolumeStatus {
    pub name: String,
    pub listen: String,
    pub pending_inodes: usize,
    pub dirty_bytes: u64,
    pub uploaded_bytes: u64,
    pub upload_errors: u64,
    #[serde(skip)]
    pub usage: UsageSnapshot,
    /// The first failure of a background task.
    pub failure: Option<String>,
}

#[derive(Message)]
#[rtype(result = "Option<VolumeStatus>")]
pub struct Status;

impl Handler<Status> for VolumeActor {
    type Result = MessageResult<Status>;
    fn handle(&mut self, _: Status, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.gateway.as_ref().map(|gw| {
            let s = gw.vol.stats();
            VolumeStatus {
                name: gw.name.clone(),
                listen: gw.addr.to_string(),
                pending_inodes: s.pending_inodes as usize,
                dirty_bytes: s.dirty_bytes,
                uploaded_bytes: s.uploaded_bytes,
                upload_errors: s.upload_errors,
                usage: s.usage,
                failure: gw.failure(),
            }
        }))
    }
}
