//! The guest-side setup shared by the kernel-client tests (`kernel_mount.rs`, `posix.rs`):
//! Garage S3 and the s3nfs gateway inside a test-bed guest, the export mounted on $M.
//! See `tests/common/bed/mod.rs` for the harness itself.

use std::collections::HashMap;

use s3nfs::store::s3::{S3Config, S3Store, Secret};
use s3nfs::store::ObjectStore;

use super::bed::{guest_path, s3nfs_bin, sh_quote};
use super::garage::garage_bin;

pub const PORT: u16 = 2049;

/// Shell for the guest: starts Garage with a key and the bucket `vol`, and defines
/// `start_server` (the gateway on that bucket, same port and state every time it is called),
/// `s3ls` and `s3cat` (the bucket as S3 holds it).
pub fn prelude() -> String {
    let garage = sh_quote(&guest_path(garage_bin()));
    let s3nfs = sh_quote(&guest_path(s3nfs_bin()));
    format!(
        r#"
GARAGE={garage}
S3NFS={s3nfs}
BIGDIR=10000
GD=/tmp/garage
mkdir -p $GD /tmp/s3nfs/state
cat >$GD/config.toml <<EOF
metadata_dir = "$GD/meta"
data_dir = "$GD/data"
db_engine = "${{GARAGE_DB:-sqlite}}"
lmdb_map_size = "1G"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:3901"
rpc_public_addr = "127.0.0.1:3901"
rpc_secret = "$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"
[s3_api]
s3_region = "garage"
api_bind_addr = "${{GARAGE_API:-127.0.0.1:3900}}"
root_domain = ".s3.garage.localhost"
[admin]
api_bind_addr = "127.0.0.1:3903"
metrics_token = "$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n' | tee $GD/metrics_token)"
EOF
gcli() {{ $GARAGE -c $GD/config.toml "$@"; }}
bg garage $GARAGE -c $GD/config.toml server
step garage_up wait_port 3900 60 || {{ show_log garage; exit 1; }}
for i in $(seq 1 100); do gcli status >/dev/null 2>&1 && break; sleep 0.2; done
node=$(gcli node id -q | cut -d@ -f1)
step garage_layout sh -c "$GARAGE -c $GD/config.toml layout assign -z dc1 -c 1G $node >/dev/null && $GARAGE -c $GD/config.toml layout apply --version 1 >/dev/null"
key=$(gcli key create vol-key)
gcli key allow --create-bucket vol-key >/dev/null
export AWS_ACCESS_KEY_ID=$(printf '%s\n' "$key" | sed -n 's/.*Key ID: *//p')
export AWS_SECRET_ACCESS_KEY=$(printf '%s\n' "$key" | sed -n 's/.*Secret key: *//p')
step garage_bucket sh -c "$GARAGE -c $GD/config.toml bucket create vol >/dev/null && $GARAGE -c $GD/config.toml bucket allow --read --write --owner vol --key vol-key >/dev/null"
S3="--endpoint http://127.0.0.1:3900 --bucket vol --region garage"
start_server() {{ bg server $S3NFS serve --listen 127.0.0.1:$PORT $S3 --state-dir /tmp/s3nfs/state --flush-delay 500ms; }}
s3ls() {{ $S3NFS ls $S3 "$@" 2>/dev/null; }}
s3cat() {{ $S3NFS cat $S3 "$1" 2>/dev/null; }}
"#
    )
}

/// Start the server, wait for its port, mount it on $M; exits the script on failure.
pub const SERVE_AND_MOUNT: &str = r#"
M=/mnt/m
t0=$(now_ms)
start_server
step server_up wait_port $PORT 60 || { show_log server; exit 1; }
step mount nfs_mount $PORT $M || { show_log server; dmesg | tail -20; exit 1; }
kv mount_ms $(( $(now_ms) - t0 ))
"#;

/// The whole guest script: prelude, gateway started and mounted on $M, then `body`.
pub fn script(body: &str) -> String {
    format!(
        "PORT={PORT}\n{}{SERVE_AND_MOUNT}{body}\nshow_log server 30\n",
        prelude()
    )
}

// ------------------------------------------------------------ for test code inside the guest

/// A variable the host side set for the guest (the prelude's Garage key, the run's token).
pub fn guest_env(k: &str) -> String {
    std::env::var(k).unwrap_or_else(|_| panic!("{k} is not set: this runs inside the guest"))
}

/// The CSI Secret (csi-s3's keys) for the prelude's Garage key, with Garage at `endpoint`.
pub fn guest_secret(endpoint: &str) -> HashMap<String, String> {
    [
        ("accessKeyID", guest_env("AWS_ACCESS_KEY_ID")),
        ("secretAccessKey", guest_env("AWS_SECRET_ACCESS_KEY")),
        ("endpoint", endpoint.to_string()),
        ("region", "garage".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// The prelude's Garage, seen directly: what S3 holds, whatever the gateways say.
pub async fn guest_s3(bucket: &str) -> S3Store {
    S3Store::connect(S3Config {
        endpoint: Some("http://127.0.0.1:3900".into()),
        bucket: bucket.into(),
        region: "garage".into(),
        path_style: true,
        access_key: Some(guest_env("AWS_ACCESS_KEY_ID")),
        secret_key: Some(Secret(guest_env("AWS_SECRET_ACCESS_KEY"))),
        session_token: None,
    })
    .await
    .unwrap()
}

/// An object's bytes, or `None` if it does not exist.
pub async fn s3_get(store: &S3Store, key: &str) -> Option<Vec<u8>> {
    let head = store.head(key).await.unwrap()?;
    if head.size == 0 {
        return Some(Vec::new());
    }
    Some(store.get_range(key, 0..head.size).await.unwrap().to_vec())
}

/// The size of the file system at `p`, as df shows it.
#[allow(dead_code)]
pub fn statvfs_total(p: &std::path::Path) -> u64 {
    let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(
        unsafe { libc::statvfs(c.as_ptr(), &mut st) },
        0,
        "statvfs {}",
        p.display()
    );
    st.f_blocks as u64 * st.f_frsize as u64
}
