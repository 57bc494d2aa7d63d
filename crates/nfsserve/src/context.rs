use std::fmt;
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::transaction_tracker::TransactionTracker;
use crate::vfs::{CallContext, Caller, NFSFileSystem};

#[derive(Clone)]
pub struct RPCContext {
    pub local_port: u16,
    pub client_addr: String,
    pub auth: crate::rpc::auth_unix,
    /// Whether this call carried AUTH_UNIX credentials (s3nfs patch): without them the caller
    /// is nobody, not the uid 0 of an empty `auth`.
    pub auth_is_unix: bool,
    pub vfs: Arc<dyn NFSFileSystem + Send + Sync>,
    pub mount_signal: Option<mpsc::Sender<bool>>,
    pub export_name: Arc<String>,
    pub transaction_tracker: Arc<TransactionTracker>,
    /// When the call being served was received (s3nfs patch): read once per call, it serves the
    /// retransmission tracker and the filesystem (`CallContext::arrived`).
    pub arrived: std::time::Instant,
}

impl RPCContext {
    /// What the file system is told of the call being served (s3nfs patch): the caller's whole
    /// AUTH_UNIX identity, nobody for a call without AUTH_UNIX, and when the call arrived.
    pub(crate) fn call_context(&self) -> CallContext {
        let caller = if self.auth_is_unix {
            Caller {
                uid: self.auth.uid,
                gid: self.auth.gid,
                gids: self.auth.gids.clone(),
                unix: true,
            }
        } else {
            Caller::nobody()
        };
        CallContext::new(caller, self.arrived)
    }
}

impl fmt::Debug for RPCContext {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.debug_struct("RPCContext")
            .field("local_port", &self.local_port)
            .field("client_addr", &self.client_addr)
            .field("auth", &self.auth)
            .finish()
    }
}
