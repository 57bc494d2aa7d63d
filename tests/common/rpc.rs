//! Building ONC RPC calls by hand (XDR), for the fuzzing corpus and the per-operation
//! instruction counts: the bytes a client sends, without a client.

/// Stands for the volume id in file handles built here; `with_volume_id` puts the real one in.
pub const VOL_PLACEHOLDER: [u8; 8] = [0xAA; 8];

/// A tiny XDR writer for building calls.
#[derive(Default)]
pub struct X(Vec<u8>);

impl X {
    pub fn u32(mut self, v: u32) -> X {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn u64(mut self, v: u64) -> X {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn opaque(mut self, b: &[u8]) -> X {
        self = self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
        while !self.0.len().is_multiple_of(4) {
            self.0.push(0);
        }
        self
    }
    pub fn fh(self, ino: u64) -> X {
        let mut h = b"S3NF".to_vec();
        h.extend_from_slice(&VOL_PLACEHOLDER);
        h.extend_from_slice(&ino.to_be_bytes());
        self.opaque(&h)
    }
    /// sattr3 with a mode, nothing else.
    pub fn sattr(self, mode: u32) -> X {
        self.u32(1).u32(mode).u32(0).u32(0).u32(0).u32(0).u32(0)
    }
}

pub fn call(xid: u32, prog: u32, vers: u32, proc_: u32, args: X) -> Vec<u8> {
    let cred = X::default().u32(1).opaque(b"fuzz").u32(0).u32(0).u32(1).u32(0);
    let head = X::default()
        .u32(xid)
        .u32(0)
        .u32(2)
        .u32(prog)
        .u32(vers)
        .u32(proc_)
        .u32(1)
        .opaque(&cred.0)
        .u32(0)
        .u32(0);
    [head.0, args.0].concat()
}

/// Puts the volume's id in place of the placeholder, so handles reach real inodes.
pub fn with_volume_id(mut b: Vec<u8>, id: u64) -> Vec<u8> {
    let mut i = 0;
    while i + 12 <= b.len() {
        if &b[i..i + 4] == b"S3NF" && b[i + 4..i + 12] == VOL_PLACEHOLDER {
            b[i + 4..i + 12].copy_from_slice(&id.to_be_bytes());
        }
        i += 1;
    }
    b
}

/// AUTH_UNIX credentials of root for nfs3_client, as the kernel client sends them for root
/// (the gateway treats a call without AUTH_UNIX as the anonymous user).
pub fn root_cred() -> nfs3_client::nfs3_types::rpc::opaque_auth<'static> {
    nfs3_client::nfs3_types::rpc::opaque_auth::auth_unix(&nfs3_client::nfs3_types::rpc::auth_unix {
        stamp: 1,
        machinename: nfs3_client::nfs3_types::xdr_codec::Opaque::owned(b"s3nfs".to_vec()),
        uid: 0,
        gid: 0,
        gids: vec![0],
    })
}
