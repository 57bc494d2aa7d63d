//! Serving the admin socket (see the module docs of [`super`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use super::source::Source;
use super::{FlushEvent, Request, StatusReply, MAX_REQUEST};
use crate::fs::FlushProgress;
use crate::tasks::Owned;

/// How often a flush reports what is left.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// Binds `path` and serves it for as long as the returned task is held. `Ok(None)` when another
/// live process serves the path already (a second `serve` on the machine): that one keeps it.
///
/// Who serves the path is decided by a lock on `<path>.lock` (flock, released by the kernel when
/// the holder dies), not by probing the socket: two processes starting at once cannot both
/// think the path free, and one that finds a socket left by a dead process replaces it.
pub async fn serve(path: &Path, source: Source) -> anyhow::Result<Option<Owned<()>>> {
    use std::os::unix::io::AsRawFd;
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::create_dir_all(dir)?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
    }
    let mut lock_path = path.as_os_str().to_owned();
    lock_path.push(".lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", PathBuf::from(&lock_path).display()))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        tracing::warn!(socket = %path.display(), "another process serves the admin socket; s3nfs status and flush will not see this one (give it --admin-socket)");
        return Ok(None);
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
        _ => {} // a socket left by a process that died, or none
    }
    // Created with no access for others from the start, not opened up and then closed.
    // SAFETY: umask only changes this process's file creation mask; restored at once.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    unsafe { libc::umask(old) };
    let listener = bound.map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", path.display()))?;
    let source = Arc::new(source);
    let path = path.to_path_buf();
    Ok(Some(crate::tasks::owned(accept(listener, source, path, lock))))
}

async fn accept(listener: UnixListener, source: Arc<Source>, path: PathBuf, lock: std::fs::File) {
    // The socket goes before the lock: the next holder finds no socket of ours.
    let _lock = lock;
    let _remove = RemoveOnDrop(path);
    // Connections end with the server.
    let mut conns = tokio::task::JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        match listener.accept().await {
            Ok((sock, _)) => {
                conns.spawn(answer(sock, source.clone()));
            }
            Err(e) => {
                tracing::warn!(error = %e, "admin socket: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

async fn answer(sock: UnixStream, source: Arc<Source>) {
    let (r, mut w) = sock.into_split();
    let mut line = String::new();
    let read = BufReader::new(r.take(MAX_REQUEST as u64)).read_line(&mut line).await;
    let request = match read {
        Ok(_) => serde_json::from_str::<Request>(line.trim())
            .map_err(|e| format!("not a request ({e}): expected {{\"op\":\"status\"}} or {{\"op\":\"flush\"}}")),
        Err(e) => Err(e.to_string()),
    };
    let _ = match request {
        Ok(Request::Status) => {
            let reply = StatusReply {
                volumes: source.volumes().await,
            };
            send(&mut w, &reply).await
        }
        Ok(Request::Flush { volume }) => flush(&mut w, &source, volume).await,
        Err(error) => send(&mut w, &FlushEvent::Refused { error }).await,
    };
    let _ = w.shutdown().await;
}

async fn send<T: serde::Serialize>(w: &mut (impl AsyncWriteExt + Unpin), v: &T) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(v).map_err(std::io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line).await
}

/// Flushes the volumes asked for, one after the other, reporting as it goes. A client that
/// goes away stops the flush it watched (what is left stays pending, as before).
async fn flush(w: &mut (impl AsyncWriteExt + Unpin), source: &Source, volume: Option<String>) -> std::io::Result<()> {
    let all = source.volumes().await;
    let targets: Vec<_> = match &volume {
        None => all,
        Some(name) => match all.into_iter().find(|v| &v.name == name) {
            Some(v) => vec![v],
            None => {
                let error = format!("no volume named {name:?} here (s3nfs status lists them)");
                send(w, &FlushEvent::Refused { error }).await?;
                return send(w, &FlushEvent::End { ok: false }).await;
            }
        },
    };
    let mut ok = true;
    for t in targets {
        let Some(vol) = (if t.local { source.volume(&t.name).await } else { None }) else {
            let reason = match &t.owner {
                Some(o) => format!("owned by {o}: its data is uploaded there"),
                None => "no owner known yet: nothing of it is held here".into(),
            };
            send(w, &FlushEvent::Skipped { volume: t.name, reason }).await?;
            continue;
        };
        let progress = FlushProgress::new(&vol);
        let flushing = vol.flush_all();
        tokio::pin!(flushing);
        let mut tick = tokio::time::interval(PROGRESS_EVERY);
        let result = loop {
            tokio::select! {
                r = &mut flushing => break r,
                _ = tick.tick() => {
                    let p = progress.sample();
                    send(w, &FlushEvent::Progress {
                        volume: t.name.clone(),
                        files: p.files,
                        bytes: p.bytes,
                        bytes_per_second: p.bytes_per_second,
                    })
                    .await?;
                }
            }
        };
        let p = progress.sample();
        match result {
            Ok(()) => {
                send(
                    w,
                    &FlushEvent::Done {
                        volume: t.name,
                        uploaded_bytes: p.uploaded,
                        seconds: p.elapsed.as_secs_f64(),
                    },
                )
                .await?
            }
            Err(e) => {
                ok = false;
                send(
                    w,
                    &FlushEvent::Failed {
                        volume: t.name,
                        error: e.to_string(),
                    },
                )
                .await?
            }
        }
    }
    send(w, &FlushEvent::End { ok }).await
}
