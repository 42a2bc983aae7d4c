//! The wrapper ↔ daemon socket: where it lives, how messages are framed, and
//! starting the daemon when it is not running.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use casbuild_cas::digest::DigestFunction;
use casbuild_proto::cc::{daemon_request, DaemonReply, DaemonRequest};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Largest message either side accepts.
const MAX_MESSAGE: usize = 512 << 20;

/// The directory of this user's daemon sockets: `$CASBUILD_DAEMON_DIR`, else
/// `$XDG_RUNTIME_DIR/casbuild`, else `/tmp/casbuild-UID`.
pub fn daemon_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CASBUILD_DAEMON_DIR") {
        return PathBuf::from(dir);
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) => PathBuf::from(dir).join("casbuild"),
        None => PathBuf::from(format!("/tmp/casbuild-{}", nix::unistd::getuid())),
    }
}

/// Creates the daemon directory (0700) if needed and checks that it is this
/// user's and writable by nobody else: a socket there that another user
/// planted could answer compiles with anything.
pub fn secure_daemon_dir() -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let dir = daemon_dir();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    // Not followed if it is a symlink: another user could retarget one.
    let meta = std::fs::symlink_metadata(&dir).with_context(|| format!("{}", dir.display()))?;
    if !meta.is_dir() || meta.uid() != nix::unistd::getuid().as_raw() || meta.mode() & 0o022 != 0 {
        bail!(
            "{} is not yours alone (owner {}, mode {:o}); not using it",
            dir.display(),
            meta.uid(),
            meta.mode() & 0o777
        );
    }
    Ok(dir)
}

/// The socket of the daemon serving `remote` and `instance`: one per host,
/// user and cluster.
pub fn socket_path(remote: &str, instance: &str) -> PathBuf {
    let key = DigestFunction::Blake3.digest_of(format!("{remote}\0{instance}").as_bytes()).hash_hex();
    daemon_dir().join(format!("cc-{}.sock", &key[..16]))
}

/// Writes one message: a 4-byte big-endian length, then the bytes.
pub async fn send<M: Message>(stream: &mut UnixStream, message: &M) -> std::io::Result<()> {
    let bytes = message.encode_to_vec();
    let mut frame = Vec::with_capacity(bytes.len() + 4);
    frame.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    frame.extend_from_slice(&bytes);
    stream.write_all(&frame).await
}

/// Reads one message; None when the other side closed the connection.
pub async fn receive<M: Message + Default>(stream: &mut UnixStream) -> std::io::Result<Option<M>> {
    let mut length = [0u8; 4];
    match stream.read_exact(&mut length).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let length = u32::from_be_bytes(length) as usize;
    if length > MAX_MESSAGE {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("a {length}-byte message")));
    }
    let mut bytes = vec![0u8; length];
    stream.read_exact(&mut bytes).await?;
    M::decode(bytes.as_slice()).map(Some).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// A connection to the daemon.
pub struct DaemonConnection {
    stream: UnixStream,
}

impl DaemonConnection {
    /// Connects to a running daemon, if there is one.
    pub async fn existing(remote: &str, instance: &str) -> Option<DaemonConnection> {
        secure_daemon_dir().ok()?;
        UnixStream::connect(socket_path(remote, instance)).await.ok().map(|stream| DaemonConnection { stream })
    }

    /// Connects to the daemon, starting it first when it is not running.
    pub async fn connect_or_start(remote: &str, instance: &str) -> anyhow::Result<DaemonConnection> {
        if let Some(connection) = Self::existing(remote, instance).await {
            return Ok(connection);
        }
        let socket = socket_path(remote, instance);
        let dir = secure_daemon_dir()?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(socket.with_extension("log"))
            .with_context(|| format!("opening the daemon's log in {}", dir.display()))?;
        let exe = std::env::current_exe().context("finding casbuild itself")?;
        // Its own process group: a Ctrl-C at the build's terminal does not stop it.
        std::os::unix::process::CommandExt::process_group(
            std::process::Command::new(exe)
                .args(["daemon", "--remote", remote, "--instance", instance, "--socket"])
                .arg(&socket)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log),
            0,
        )
        .spawn()
        .context("starting casbuild daemon")?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Some(connection) = Self::existing(remote, instance).await {
                return Ok(connection);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        bail!("casbuild daemon did not start within 5 s (see {})", socket.with_extension("log").display())
    }

    /// Sends a request and waits for its reply.
    pub async fn ask(&mut self, request: daemon_request::Request) -> anyhow::Result<DaemonReply> {
        send(&mut self.stream, &DaemonRequest { request: Some(request) }).await.context("talking to the daemon")?;
        receive(&mut self.stream).await.context("talking to the daemon")?.context("the daemon closed the connection")
    }
}
