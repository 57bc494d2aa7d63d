//! The actor of one volume: owns its [`Gateway`] (listener, background tasks, database,
//! staging). Only lifecycle and queries go through its mailbox; NFS requests reach the volume
//! directly from the listener's tasks.

use actix::prelude::*;

use super::gateway::Gateway;
use crate::fs::VolumeStats;

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
#[derive(Debug, Clone)]
pub struct VolumeStatus {
    pub name: String,
    pub listen: std::net::SocketAddr,
    pub stats: VolumeStats,
}

#[derive(Message)]
#[rtype(result = "Option<VolumeStatus>")]
pub struct Status;

impl Handler<Status> for VolumeActor {
    type Result = MessageResult<Status>;
    fn handle(&mut self, _: Status, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.gateway.as_ref().map(|gw| VolumeStatus {
            name: gw.name.clone(),
            listen: gw.addr,
            stats: gw.vol.stats(),
        }))
    }
}

/// The volume itself, for work an operator asks for beside the NFS clients' (`s3nfs flush`).
#[derive(Message)]
#[rtype(result = "Option<std::sync::Arc<crate::fs::Volume>>")]
pub struct Handle;

impl Handler<Handle> for VolumeActor {
    type Result = MessageResult<Handle>;
    fn handle(&mut self, _: Handle, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.gateway.as_ref().map(|gw| gw.vol.clone()))
    }
}
