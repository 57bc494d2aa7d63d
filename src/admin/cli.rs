//! `s3nfs status` and `s3nfs flush`: the command line's side of the admin socket.

use std::io::Write;
use std::path::Path;
use std::time::UNIX_EPOCH;

use anyhow::Context as _;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::{FlushEvent, Request, StatusReply, VolumeReport};

async fn ask(socket: &Path, req: &Request) -> anyhow::Result<tokio::io::Lines<BufReader<UnixStream>>> {
    let mut sock = UnixStream::connect(socket).await.with_context(|| {
        format!(
            "nothing answers on {}: is `s3nfs serve` or the CSI node plugin running here, as this user? (--admin-socket or S3NFS_ADMIN_SOCKET names another socket)",
            socket.display()
        )
    })?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    sock.write_all(&line).await?;
    Ok(BufReader::new(sock).lines())
}

/// `s3nfs status`: the volumes of the process behind `socket`, as text or JSON.
pub async fn status(socket: &Path, json: bool, out: &mut impl Write) -> anyhow::Result<()> {
    let mut lines = ask(socket, &Request::Status).await?;
    let line = lines
        .next_line()
        .await?
        .context("the admin socket closed without an answer")?;
    if json {
        writeln!(out, "{line}")?;
        return Ok(());
    }
    let reply: StatusReply = serde_json::from_str(&line).context("an answer that is not a status")?;
    if reply.volumes.is_empty() {
        writeln!(out, "no volumes")?;
    }
    let now = crate::clock::wall_now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    for v in &reply.volumes {
        write_volume(out, v, now)?;
    }
    Ok(())
}

fn write_volume(out: &mut impl Write, v: &VolumeReport, now: u64) -> std::io::Result<()> {
    writeln!(out, "{}  port {}  {}", v.name, v.port, v.role)?;
    if let Some(o) = &v.owner {
        writeln!(out, "  owner          {o}")?;
    }
    if !v.local {
        return writeln!(out, "  data           on the owner: ask there");
    }
    let ago = |t: Option<u64>| match t {
        Some(t) => format!("{} ago", seconds(now.saturating_sub(t) as f64)),
        None => "never".into(),
    };
    if v.pending_files == 0 && v.pending_bytes == 0 {
        writeln!(out, "  not in S3      nothing")?;
    } else {
        writeln!(
            out,
            "  not in S3      {}, {}, for {}",
            files(v.pending_files),
            bytes(v.pending_bytes),
            seconds(v.pending_seconds)
        )?;
    }
    writeln!(out, "  uploading      {}", v.uploads_in_flight)?;
    writeln!(out, "  last upload    {}", ago(v.last_upload_at))?;
    match &v.last_error {
        Some(e) => writeln!(out, "  last S3 error  {} ({})", ago(v.last_error_at), shorten(e, 160))?,
        None => writeln!(out, "  last S3 error  none")?,
    }
    match v.capacity_bytes {
        Some(c) if c > 0 => writeln!(
            out,
            "  use            {} of {} ({:.0} %), {} files",
            bytes(v.used_bytes),
            bytes(c),
            v.used_bytes as f64 * 100.0 / c as f64,
            v.files
        )?,
        _ => writeln!(out, "  use            {}, {} files", bytes(v.used_bytes), v.files)?,
    }
    if let Some(f) = &v.failure {
        writeln!(out, "  FAILED         {f}")?;
    }
    Ok(())
}

/// `s3nfs flush`: uploads everything pending now (of `volume`, or of all), showing what is
/// left as it goes. Fails with S3's reason when S3 refuses.
pub async fn flush(socket: &Path, volume: Option<String>, json: bool, out: &mut impl Write) -> anyhow::Result<()> {
    let mut lines = ask(socket, &Request::Flush { volume }).await?;
    let mut failures = Vec::new();
    while let Some(line) = lines.next_line().await? {
        if json {
            writeln!(out, "{line}")?;
        }
        let event: FlushEvent = serde_json::from_str(&line).context("an answer that is not a flush event")?;
        let text = match event {
            FlushEvent::Progress {
                volume,
                files,
                bytes: b,
                bytes_per_second,
            } => format!(
                "{volume}: {}, {} left, {}/s",
                self::files(files),
                bytes(b),
                bytes(bytes_per_second as u64)
            ),
            FlushEvent::Done {
                volume,
                uploaded_bytes,
                seconds: s,
            } => format!(
                "{volume}: all in S3 ({} uploaded in {})",
                bytes(uploaded_bytes),
                seconds(s)
            ),
            FlushEvent::Failed { volume, error } => {
                failures.push(format!("{volume}: {error}"));
                format!("{volume}: S3 refused: {error}")
            }
            FlushEvent::Skipped { volume, reason } => format!("{volume}: skipped, {reason}"),
            FlushEvent::Refused { error } => anyhow::bail!("{error}"),
            FlushEvent::End { ok } => {
                if ok {
                    return Ok(());
                }
                anyhow::ensure!(!failures.is_empty(), "the flush did not complete");
                anyhow::bail!(
                    "not everything is in S3 (it stays pending and is retried): {}",
                    failures.join("; ")
                );
            }
        };
        if !json {
            writeln!(out, "{text}")?;
            out.flush()?;
        }
    }
    anyhow::bail!("the process behind the admin socket went away before the flush ended")
}

fn files(n: u64) -> String {
    if n == 1 {
        "1 file".into()
    } else {
        format!("{n} files")
    }
}

/// At most `max` characters of `s` (S3 client errors can run to a screenful).
fn shorten(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

pub fn seconds(s: f64) -> String {
    if s < 60.0 {
        format!("{s:.1} s")
    } else if s < 3600.0 {
        format!("{:.0} min {:.0} s", (s / 60.0).floor(), s % 60.0)
    } else {
        format!("{:.0} h {:.0} min", (s / 3600.0).floor(), (s % 3600.0) / 60.0)
    }
}
