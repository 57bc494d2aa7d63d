//! One node's part in one ReadWriteMany volume: its campaign for the lease, its node-local
//! endpoint, and, while it owns the volume, the owner gateway and the cross-node port.
//!
//! The role decides everything, in this order when it changes:
//! - **Losing the volume** (to another node, or the renew deadline passed): the gateway's
//!   fence goes up first, then the endpoint's connections are closed and the gateway and the
//!   cross-node port are dropped ([`OwnerGateway::fence`]). Nothing of the term survives.
//! - **Owning it**: a gateway starts from S3 alone, with no local state from any earlier term
//!   ([`OwnerGateway::start`]); the endpoint sends connections to it, the cross-node port takes
//!   the other nodes' relays.
//! - **Following**: the endpoint relays to the owner's cross-node port.
//!
//! The endpoint's port never changes while the volume is staged: the kernel's mount stays, and
//! its hard mount carries it over every change of owner.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::tasks::{owned, Owned};
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::elect::{self, Campaign, Role, Timing};
use super::lease::{Holder, LeaseApi};
use super::relay::{self, Target};
use super::tls::PeerTls;
use crate::clock::Clock;

/// The owner gateway's life, as the node plugin runs it.
#[async_trait::async_trait]
pub trait OwnerGateway: Send + Sync {
    /// Starts a gateway for the term `epoch` from S3 alone; its address on 127.0.0.1.
    async fn start(&self, epoch: u32) -> anyhow::Result<SocketAddr>;
    /// Ends the term now: no write reaches S3 after this begins. Done if none is running.
    async fn fence(&self);
    /// Ends the term cleanly (unstage): uploads what is pending, then stops.
    async fn close(&self) -> anyhow::Result<()>;
}

/// Where a member is and what it campaigns for.
#[derive(Debug, Clone)]
pub struct MemberConfig {
    /// The lease's name.
    pub lease: String,
    /// This node, with its cross-node address.
    pub me: Holder,
    /// The node-local endpoint: 127.0.0.1 and the port the kernel mounts.
    pub endpoint: SocketAddr,
    pub timing: Timing,
}

pub struct Member {
    role: watch::Receiver<Role>,
    stop: watch::Sender<bool>,
    // Each ends with the member (see [`crate::tasks::Owned`]).
    campaign: Owned<()>,
    follower: Owned<()>,
    endpoint: Owned<()>,
    gateway: Arc<dyn OwnerGateway>,
}

impl Member {
    /// Binds the endpoint and starts campaigning. The endpoint holds connections until a role
    /// is known ([`Member::settled`]).
    pub async fn start(
        cfg: MemberConfig,
        api: Arc<dyn LeaseApi>,
        tls: PeerTls,
        gateway: Arc<dyn OwnerGateway>,
        clock: Clock,
    ) -> anyhow::Result<Member> {
        cfg.timing.check().map_err(anyhow::Error::msg)?;
        let listener = TcpListener::bind(cfg.endpoint)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {} for the volume's local endpoint: {e}", cfg.endpoint))?;
        let (target_tx, target_rx) = watch::channel(Target::None);
        let endpoint = owned(relay::endpoint(listener, target_rx, tls.clone()));
        let (role_tx, role_rx) = watch::channel(Role::Unknown);
        let (stop, stop_rx) = watch::channel(false);
        let campaign = owned(elect::run(
            api,
            cfg.lease.clone(),
            Campaign::new(cfg.me.clone(), cfg.timing),
            clock.clone(),
            role_tx,
            stop_rx,
        ));
        let follower = owned(follow(
            role_rx.clone(),
            target_tx,
            gateway.clone(),
            tls,
            cfg.me.addr,
            cfg.timing.retry,
            clock,
        ));
        Ok(Member {
            role: role_rx,
            stop,
            campaign,
            follower,
            endpoint,
            gateway,
        })
    }

    pub fn role(&self) -> Role {
        self.role.borrow().clone()
    }

    /// Waits up to `limit` for a role other than [`Role::Unknown`]; the role then.
    pub async fn settled(&self, limit: Duration) -> Role {
        let mut rx = self.role.clone();
        let _ = tokio::time::timeout(limit, rx.wait_for(|r| *r != Role::Unknown)).await;
        self.role()
    }

    /// Leaves the volume (unstage): a gateway this node runs uploads what is pending and
    /// stops, then the lease is released so that another node takes over at once. The kernel
    /// has unmounted before, so every write it made was committed, and with the owner's
    /// durability (S3) is there already: a failing final upload can only concern namespace
    /// changes still queued, and the gateway is then fenced all the same (logged).
    pub async fn leave(mut self) {
        self.follower.abort();
        let _ = (&mut self.follower).await;
        // The campaign still runs, so the lease stays held while the close uploads; should
        // it be lost all the same (the renew deadline passes while the API server is away),
        // the close is given up and the gateway fenced, as `follow` would have.
        let mut role = self.role.clone();
        let lost = async {
            let _ = role.wait_for(|r| !matches!(r, Role::Owner { .. })).await;
        };
        let closed = tokio::select! {
            // A follower (or a node that never knew its role) has nothing to close: its close
            // returns at once, before the role is looked at.
            biased;
            closed = self.gateway.close() => closed,
            () = lost => Err(anyhow::anyhow!("the lease was lost during the final upload")),
        };
        if let Err(e) = closed {
            tracing::error!(error = %format!("{e:#}"), "leaving a ReadWriteMany volume: final upload failed; fencing");
            self.gateway.fence().await;
        }
        let _ = self.stop.send(true);
        let _ = (&mut self.campaign).await;
        // The endpoint's port is free when this returns: the volume may be staged again.
        self.endpoint.abort();
        let _ = (&mut self.endpoint).await;
    }
}

/// Acts on every change of role (see the module docs).
async fn follow(
    mut role: watch::Receiver<Role>,
    target: watch::Sender<Target>,
    gateway: Arc<dyn OwnerGateway>,
    tls: PeerTls,
    cross_node: SocketAddr,
    retry: Duration,
    clock: Clock,
) {
    // Aborted when dropped: `follow` itself is aborted by `leave` and `Drop`, and a detached
    // cross-node port would go on handing peers to a gateway that is gone.
    let mut serving: Option<Owned<()>> = None;
    loop {
        let now = role.borrow_and_update().clone();
        let mut start_failed = false;
        match now {
            Role::Owner { epoch } => {
                if serving.is_none() {
                    match start_owner(&*gateway, epoch, cross_node, &tls).await {
                        Ok((addr, port)) => {
                            serving = Some(port);
                            target.send_replace(Target::Local(addr));
                            tracing::info!(%addr, %cross_node, epoch, "this node owns the volume now");
                        }
                        Err(e) => {
                            tracing::error!(error = %format!("{e:#}"), "cannot start the owner gateway; retrying");
                            start_failed = true;
                        }
                    }
                }
            }
            Role::Follower { owner } => {
                end_term(&mut serving, &target, &*gateway).await;
                target.send_replace(Target::Remote(owner.addr));
            }
            Role::Unknown => end_term(&mut serving, &target, &*gateway).await,
        }
        if start_failed {
            tokio::select! {
                _ = clock.sleep(retry) => continue,
                r = role.changed() => if r.is_err() { break },
            }
        } else if role.changed().await.is_err() {
            break;
        }
    }
    end_term(&mut serving, &target, &*gateway).await;
}

async fn start_owner(
    gateway: &dyn OwnerGateway,
    epoch: u32,
    cross_node: SocketAddr,
    tls: &PeerTls,
) -> anyhow::Result<(SocketAddr, Owned<()>)> {
    let addr = gateway.start(epoch).await?;
    let listener = match TcpListener::bind(cross_node).await {
        Ok(l) => l,
        Err(e) => {
            gateway.fence().await;
            anyhow::bail!("cannot listen on {cross_node} for other nodes: {e}");
        }
    };
    Ok((addr, owned(relay::cross_node(listener, addr, tls.clone()))))
}

async fn end_term(serving: &mut Option<Owned<()>>, target: &watch::Sender<Target>, gateway: &dyn OwnerGateway) {
    // The fence first: nothing else here may delay it.
    let Some(port) = serving.take() else { return };
    gateway.fence().await;
    drop(port);
    target.send_if_modified(|t| {
        let change = matches!(t, Target::Local(_));
        if change {
            *t = Target::None;
        }
        change
    });
}
