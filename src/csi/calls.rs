//! The node's calls that change a volume run to their end, whether or not kubelet still waits.
//!
//! Kubelet gives every call a deadline and calls again when it passes; the gRPC server then
//! drops the call's future at whatever await point it had reached. Work already handed
//! elsewhere went on regardless (a mount on a blocking thread, a gateway's start or close in the
//! supervisor), but the volume's lock went with the future, so the retry ran beside that work,
//! and the rest of the dropped call (recording what it made, undoing a stage that failed) never
//! ran. Here each call that changes a volume runs as a job of its own and holds the volume's
//! lock until it ends: a retry meanwhile is answered Aborted, as the spec asks, and the one
//! after finds the work done.

use std::future::Future;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::node::NodeService;
use super::pb::{self, node_server::Node};
use crate::tasks::Tasks;

pub struct NodeCalls {
    node: Arc<NodeService>,
    /// The calls under way; a call whose caller went away stays here until it ends.
    calls: Arc<Tasks>,
}

impl NodeCalls {
    pub fn new(node: Arc<NodeService>) -> NodeCalls {
        NodeCalls {
            node,
            calls: Arc::new(Tasks::new()),
        }
    }

    /// The calls under way, to wait for at shutdown.
    pub fn under_way(&self) -> Arc<Tasks> {
        self.calls.clone()
    }

    async fn to_the_end<T, F>(&self, call: impl FnOnce(Arc<NodeService>) -> F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, Status>> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let work = call(self.node.clone());
        self.calls.spawn("a CSI node call", async move {
            // The caller may be gone: then the answer is nobody's.
            let _ = tx.send(work.await);
        });
        rx.await.unwrap_or_else(|_| {
            Err(Status::internal(
                "the call's work ended without an answer (the plugin is stopping)",
            ))
        })
    }
}

#[tonic::async_trait]
impl Node for NodeCalls {
    async fn node_stage_volume(
        &self,
        req: Request<pb::NodeStageVolumeRequest>,
    ) -> Result<Response<pb::NodeStageVolumeResponse>, Status> {
        self.to_the_end(|n| async move { n.node_stage_volume(req).await }).await
    }

    async fn node_unstage_volume(
        &self,
        req: Request<pb::NodeUnstageVolumeRequest>,
    ) -> Result<Response<pb::NodeUnstageVolumeResponse>, Status> {
        self.to_the_end(|n| async move { n.node_unstage_volume(req).await })
            .await
    }

    async fn node_publish_volume(
        &self,
        req: Request<pb::NodePublishVolumeRequest>,
    ) -> Result<Response<pb::NodePublishVolumeResponse>, Status> {
        self.to_the_end(|n| async move { n.node_publish_volume(req).await })
            .await
    }

    async fn node_unpublish_volume(
        &self,
        req: Request<pb::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<pb::NodeUnpublishVolumeResponse>, Status> {
        self.to_the_end(|n| async move { n.node_unpublish_volume(req).await })
            .await
    }

    async fn node_expand_volume(
        &self,
        req: Request<pb::NodeExpandVolumeRequest>,
    ) -> Result<Response<pb::NodeExpandVolumeResponse>, Status> {
        self.to_the_end(|n| async move { n.node_expand_volume(req).await })
            .await
    }

    // The rest change nothing: dropped with their caller.
    async fn node_get_volume_stats(
        &self,
        req: Request<pb::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<pb::NodeGetVolumeStatsResponse>, Status> {
        self.node.node_get_volume_stats(req).await
    }

    async fn node_get_capabilities(
        &self,
        req: Request<pb::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<pb::NodeGetCapabilitiesResponse>, Status> {
        self.node.node_get_capabilities(req).await
    }

    async fn node_get_info(
        &self,
        req: Request<pb::NodeGetInfoRequest>,
    ) -> Result<Response<pb::NodeGetInfoResponse>, Status> {
        self.node.node_get_info(req).await
    }
}
