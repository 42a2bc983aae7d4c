//! `casbuild cas`: upload, download and list blobs and trees in a remote CAS.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use casbuild_cas::digest::{Digest, DigestFunction};
use casbuild_cas::local_tree::{hash_file, LocalTree};
use casbuild_cas::store::{upload_missing, BlobStore, RemoteStore, RemoteStoreOptions, StoreError, CHUNK_SIZE};
use casbuild_cas::tree::{check_output_path, child_digest, looks_like_directory, validate_directory};
use casbuild_exec::beneath::{split_last, Beneath};
use casbuild_proto::reapi::{Directory, Tree};
use futures::StreamExt;
use prost::Message;
use tokio::io::AsyncWriteExt;

use crate::cmd::client_args::ClientAuth;

/// Options every `cas` subcommand takes.
#[derive(clap::Args, Clone)]
pub struct Remote {
    /// The server, as grpc://HOST:PORT (grpcs:// for TLS).
    #[arg(long, env = "CASBUILD_REMOTE", default_value = "grpc://127.0.0.1:8980")]
    pub remote: String,
    /// REAPI instance name.
    #[arg(long, default_value = "")]
    pub instance: String,
    /// Digest function of the digests given and printed.
    #[arg(long, default_value = "blake3")]
    pub digest_function: DigestFunction,
    #[command(flatten)]
    pub auth: ClientAuth,
}

impl Remote {
    pub async fn connect(&self) -> anyhow::Result<RemoteStore> {
        let options = RemoteStoreOptions {
            instance: self.instance.clone(),
            timeout: Duration::from_secs(60),
            connect: self.auth.options()?,
            ..Default::default()
        };
        Ok(RemoteStore::connect(&self.remote, options).await?)
    }
}

#[derive(clap::Subcommand)]
pub enum Command {
    /// Upload a file (prints its digest) or a directory tree (prints the root Directory digest).
    Upload {
        #[command(flatten)]
        remote: Remote,
        path: PathBuf,
    },
    /// Download a blob to a file, or a tree to a directory.
    Download {
        #[command(flatten)]
        remote: Remote,
        /// HASH/SIZE of a file blob or a root Directory.
        digest: String,
        dest: PathBuf,
        /// Treat the digest as a file blob even if it parses as a Directory.
        #[arg(long)]
        file: bool,
    },
    /// List the tree under a root Directory digest.
    Ls {
        #[command(flatten)]
        remote: Remote,
        /// HASH/SIZE of a root Directory.
        digest: String,
    },
}

pub async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Upload { remote, path } => {
            let store = remote.connect().await?;
            let digest = upload(&store, &path, remote.digest_function).await?;
            println!("{digest}");
        }
        Command::Download { remote, digest, dest, file } => {
            let digest = Digest::parse(remote.digest_function, &digest)?;
            let store = remote.connect().await?;
            download(&store, &digest, &dest, file).await?;
        }
        Command::Ls { remote, digest } => {
            let digest = Digest::parse(remote.digest_function, &digest)?;
            let store = remote.connect().await?;
            let tree = fetch_tree(&store, &digest).await?;
            let mut out = std::io::stdout().lock();
            list(&tree, &digest, "", &mut out)?;
        }
    }
    Ok(())
}

/// Uploads what the remote lacks of `path` and returns its digest.
pub async fn upload(store: &RemoteStore, path: &Path, function: DigestFunction) -> anyhow::Result<Digest> {
    let meta = std::fs::metadata(path).with_context(|| format!("{}", path.display()))?;
    if meta.is_file() {
        let p = path.to_path_buf();
        let digest = tokio::task::spawn_blocking(move || hash_file(&p, function))
            .await?
            .with_context(|| format!("hashing {}", path.display()))?;
        if !store.find_missing(&[digest]).await?.is_empty() {
            upload_file(store, &digest, path).await?;
        }
        return Ok(digest);
    }
    if !meta.is_dir() {
        bail!("{} is neither a file nor a directory", path.display());
    }
    let root = path.to_path_buf();
    let tree = tokio::task::spawn_blocking(move || LocalTree::scan(&root, function)).await??;
    let directories = tree.directories.iter().map(|(d, b)| (*d, b.clone())).collect();
    upload_missing(store, directories, &tree.files).await?;
    Ok(tree.root)
}

/// Streams one file into the CAS without holding it in memory.
async fn upload_file(store: &RemoteStore, digest: &Digest, path: &Path) -> anyhow::Result<()> {
    store.write_file(digest, path).await.map_err(|e| {
        // Only a digest mismatch means the bytes sent were not those hashed.
        let hint = if matches!(e, StoreError::DigestMismatch(_)) { " (did it change while being read?)" } else { "" };
        anyhow::Error::new(e).context(format!("uploading {}{hint}", path.display()))
    })
}

/// The paths of every file and symlink in the tree rooted at `root`.
pub async fn file_paths(store: &RemoteStore, root: &Digest) -> anyhow::Result<Vec<String>> {
    fn walk(
        tree: &HashMap<Digest, Directory>,
        digest: &Digest,
        prefix: &str,
        out: &mut Vec<String>,
    ) -> anyhow::Result<()> {
        let dir = tree.get(digest).with_context(|| format!("directory {digest} is missing from the CAS"))?;
        out.extend(dir.files.iter().map(|f| format!("{prefix}{}", f.name)));
        out.extend(dir.symlinks.iter().map(|l| format!("{prefix}{}", l.name)));
        for sub in &dir.directories {
            let child = child_digest(digest.function, &sub.name, sub.digest.as_ref()).map_err(anyhow::Error::msg)?;
            walk(tree, &child, &format!("{prefix}{}/", sub.name), out)?;
        }
        Ok(())
    }
    if root.is_empty_blob() {
        return Ok(Vec::new());
    }
    let tree = fetch_tree(store, root).await?;
    let mut out = Vec::new();
    walk(&tree, root, "", &mut out)?;
    out.sort();
    Ok(out)
}

/// Every Directory of a tree, by digest.
async fn fetch_tree(store: &RemoteStore, root: &Digest) -> anyhow::Result<HashMap<Digest, Directory>> {
    let directories = store.get_tree(root).await?;
    Ok(directories
        .into_iter()
        .map(|d| {
            let bytes = d.encode_to_vec();
            (root.function.digest_of(&bytes), d)
        })
        .collect())
}

fn list(
    tree: &HashMap<Digest, Directory>,
    digest: &Digest,
    prefix: &str,
    out: &mut impl std::io::Write,
) -> anyhow::Result<()> {
    let dir =
        tree.get(digest).with_context(|| format!("directory {digest} under {prefix:?} is missing from the CAS"))?;
    for sub in &dir.directories {
        let child = child_digest(digest.function, &sub.name, sub.digest.as_ref()).map_err(anyhow::Error::msg)?;
        writeln!(out, "dir   {:>12}  {child}  {prefix}{}/", "-", sub.name)?;
        list(tree, &child, &format!("{prefix}{}/", sub.name), out)?;
    }
    for file in &dir.files {
        let child = child_digest(digest.function, &file.name, file.digest.as_ref()).map_err(anyhow::Error::msg)?;
        let kind = if file.is_executable { "exec" } else { "file" };
        writeln!(out, "{kind}  {:>12}  {child}  {prefix}{}", child.size_bytes, file.name)?;
    }
    for link in &dir.symlinks {
        writeln!(out, "link  {:>12}  {prefix}{} -> {}", "-", link.name, link.target)?;
    }
    Ok(())
}

/// Downloads a blob to a file, or a tree to a directory.
pub async fn download(store: &RemoteStore, digest: &Digest, dest: &Path, force_file: bool) -> anyhow::Result<()> {
    if !force_file && digest.size_bytes > 0 && digest.size_bytes <= 16 << 20 {
        let bytes = store.read_all(digest).await?;
        if looks_like_directory(digest, &bytes) {
            let tree = fetch_tree(store, digest).await?;
            return materialize(store, &tree, digest, dest).await;
        }
        return write_new_file(dest, &bytes, false).await;
    }
    download_file(store, digest, dest, false).await
}

/// Creates `dest`, which must not exist yet (not even as a symlink: a link
/// is never written through).
async fn create_new(dest: &Path) -> anyhow::Result<tokio::fs::File> {
    tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dest)
        .await
        .with_context(|| format!("creating {}", dest.display()))
}

async fn write_new_file(dest: &Path, bytes: &[u8], executable: bool) -> anyhow::Result<()> {
    let mut file = create_new(dest).await?;
    // A tokio file hands writes to a blocking thread: without the flush the
    // bytes could still be on their way when the caller (or the process)
    // moves on, leaving an empty file behind.
    file.write_all(bytes).await.with_context(|| format!("writing {}", dest.display()))?;
    file.flush().await.with_context(|| format!("writing {}", dest.display()))?;
    if executable {
        set_executable(dest)?;
    }
    Ok(())
}

fn set_executable(path: &Path) -> anyhow::Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("chmod {}", path.display()))
}

/// Streams a blob into `dest`; the blob is verified as it arrives.
pub async fn download_file(store: &RemoteStore, digest: &Digest, dest: &Path, executable: bool) -> anyhow::Result<()> {
    let mut stream = store.read(digest, 0, None).await?;
    let mut file = create_new(dest).await?;
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(chunk) => chunk,
            Err(e) => {
                drop(file);
                let _ = tokio::fs::remove_file(dest).await;
                return Err(e).with_context(|| format!("downloading {digest} to {}", dest.display()));
            }
        };
        file.write_all(&chunk).await.with_context(|| format!("writing {}", dest.display()))?;
    }
    file.flush().await?;
    if executable {
        set_executable(dest)?;
    }
    Ok(())
}

/// Writes the directory a REAPI Tree blob describes (an output directory)
/// into the new directory `dest`.
pub async fn download_tree(store: &RemoteStore, tree_digest: &Digest, dest: &Path) -> anyhow::Result<()> {
    let function = tree_digest.function;
    let tree = Tree::decode(store.read_all(tree_digest).await?.as_ref())
        .with_context(|| format!("{tree_digest} is not a Tree"))?;
    let root = tree.root.with_context(|| format!("Tree {tree_digest} has no root"))?;
    let mut directories: HashMap<Digest, Directory> = HashMap::new();
    for child in tree.children {
        directories.insert(function.digest_of(&child.encode_to_vec()), child);
    }
    let root_digest = function.digest_of(&root.encode_to_vec());
    directories.insert(root_digest, root);
    materialize(store, &directories, &root_digest, dest).await
}

/// Most entries one download writes. A Directory named twice is written
/// twice, so without a bound a small hostile tree could ask for 2^depth.
const MAX_ENTRIES: usize = 1 << 22;

/// Writes the tree rooted at `digest` into the new directory `dest`.
///
/// Whatever the server sent is checked before it touches the disk: every
/// Directory must be valid (names without `/`, not `.` or `..`, each used
/// once), files are created only where nothing exists yet, and symlinks are
/// created last, as symlinks, so nothing is ever written through one.
pub async fn materialize(
    store: &RemoteStore,
    tree: &HashMap<Digest, Directory>,
    root: &Digest,
    dest: &Path,
) -> anyhow::Result<()> {
    if std::fs::read_dir(dest).map(|mut entries| entries.next().is_some()).unwrap_or(false) {
        bail!("{} already exists and is not empty; give a new directory", dest.display());
    }
    // Plan every entry first, then fetch small files in batches.
    let mut stack = vec![(*root, dest.to_path_buf())];
    let mut files: Vec<(Digest, PathBuf, bool)> = Vec::new();
    let mut links: Vec<(PathBuf, &str)> = Vec::new();
    let mut entries = 0usize;
    while let Some((digest, path)) = stack.pop() {
        let dir = tree.get(&digest).with_context(|| format!("directory {digest} is missing from the CAS"))?;
        validate_directory(dir, digest.function)
            .map_err(|e| anyhow::anyhow!("the server sent a malformed directory {digest}: {e}"))?;
        entries += dir.directories.len() + dir.files.len() + dir.symlinks.len();
        if entries > MAX_ENTRIES {
            bail!("the tree {root} has more than {MAX_ENTRIES} entries; not downloading it");
        }
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        for sub in &dir.directories {
            let child = child_digest(digest.function, &sub.name, sub.digest.as_ref()).map_err(anyhow::Error::msg)?;
            stack.push((child, path.join(&sub.name)));
        }
        for file in &dir.files {
            let child = child_digest(digest.function, &file.name, file.digest.as_ref()).map_err(anyhow::Error::msg)?;
            files.push((child, path.join(&file.name), file.is_executable));
        }
        links.extend(dir.symlinks.iter().map(|link| (path.join(&link.name), link.target.as_str())));
    }
    // Empty files need no fetch.
    let small: Vec<Digest> =
        files.iter().filter(|(d, _, _)| !d.is_empty_blob() && d.size_bytes <= CHUNK_SIZE as u64).map(|f| f.0).collect();
    let mut fetched: HashMap<Digest, Bytes> = HashMap::new();
    if !small.is_empty() {
        for (digest, data) in store.read_batch(&small).await? {
            fetched.insert(digest, data.with_context(|| format!("fetching {digest}"))?);
        }
    }
    for (digest, path, executable) in files {
        match fetched.get(&digest) {
            Some(data) => write_new_file(&path, data, executable).await?,
            None if digest.is_empty_blob() => write_new_file(&path, &[], executable).await?,
            None => download_file(store, &digest, &path, executable).await?,
        }
    }
    for (at, target) in links {
        std::os::unix::fs::symlink(target, &at).with_context(|| format!("symlink {}", at.display()))?;
    }
    Ok(())
}

/// The directory a client writes a result's outputs into, opened once.
pub struct OutputRoot {
    dir: PathBuf,
    root: Beneath,
}

impl OutputRoot {
    /// Opens `out`, creating it if needed.
    pub fn open(out: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        Ok(OutputRoot { dir: out.to_path_buf(), root: Beneath::open(out)? })
    }

    /// Where an output the server named `path` goes: the path must be
    /// relative and normalized, the directories on the way are created
    /// (never through a symlink, whatever an earlier download left there),
    /// and what is at the path already is removed (a link itself, not what
    /// it points to).
    pub fn place(&self, path: &str) -> anyhow::Result<PathBuf> {
        check_output_path(path).map_err(|e| anyhow::anyhow!("the server returned a bad output: {e}"))?;
        if let Some((parent, _)) = split_last(path)? {
            let placing = || format!("placing output {path:?} under {}", self.dir.display());
            self.root.create_dirs(&parent).with_context(placing)?;
        }
        let dest = self.dir.join(path);
        match std::fs::symlink_metadata(&dest) {
            Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(&dest)?,
            Ok(_) => std::fs::remove_file(&dest)?,
            Err(_) => {}
        }
        Ok(dest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use casbuild_proto::reapi::{DirectoryNode, FileNode, SymlinkNode};

    /// A store that is never reached: the checks come before any fetch.
    fn unreachable_store() -> RemoteStore {
        let channel = tonic::transport::Channel::from_static("http://127.0.0.1:9").connect_lazy();
        RemoteStore::from_channel(casbuild_cas::store::RemoteChannel::plain(channel), RemoteStoreOptions::default())
    }

    fn tree_of(directories: Vec<Directory>) -> (HashMap<Digest, Directory>, Digest) {
        let f = DigestFunction::Sha256;
        let root = f.digest_of(&directories[0].encode_to_vec());
        (directories.into_iter().map(|d| (f.digest_of(&d.encode_to_vec()), d)).collect(), root)
    }

    #[tokio::test]
    async fn a_hostile_tree_writes_nothing_outside_its_destination() {
        let dir = tempfile::tempdir().unwrap();
        let empty = DigestFunction::Sha256.empty().to_proto();
        let file = |name: &str| FileNode { name: name.into(), digest: Some(empty.clone()), ..Default::default() };
        let link =
            |name: &str, target: &str| SymlinkNode { name: name.into(), target: target.into(), ..Default::default() };
        let hostile = [
            Directory { files: vec![file("..")], ..Default::default() },
            Directory { files: vec![file("/etc/x")], ..Default::default() },
            Directory { files: vec![file("a/../../x")], ..Default::default() },
            // A link and a file of the same name: the file would go through the link.
            Directory { files: vec![file("l")], symlinks: vec![link("l", "/tmp")], ..Default::default() },
        ];
        for (i, directory) in hostile.into_iter().enumerate() {
            let (tree, root) = tree_of(vec![directory]);
            let dest = dir.path().join(format!("out-{i}"));
            let err = materialize(&unreachable_store(), &tree, &root, &dest).await.unwrap_err();
            assert!(err.to_string().contains("malformed directory"), "{err}");
        }
        assert!(!dir.path().join("x").exists() && !Path::new("/etc/x").exists());

        // A valid tree: links come back as links, after the files.
        let sub = Directory { files: vec![file("f")], ..Default::default() };
        let sub_digest = DigestFunction::Sha256.digest_of(&sub.encode_to_vec());
        let top = Directory {
            directories: vec![DirectoryNode { name: "d".into(), digest: Some(sub_digest.to_proto()) }],
            symlinks: vec![link("up", "/etc")],
            ..Default::default()
        };
        let (tree, root) = tree_of(vec![top, sub]);
        let dest = dir.path().join("good");
        materialize(&unreachable_store(), &tree, &root, &dest).await.unwrap();
        assert!(dest.join("d/f").is_file());
        assert_eq!(std::fs::read_link(dest.join("up")).unwrap(), Path::new("/etc"));
    }

    #[test]
    fn outputs_are_placed_beneath_their_directory_and_never_through_a_link() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let victim = dir.path().join("victim");
        std::fs::create_dir_all(&victim).unwrap();
        std::fs::write(victim.join("keep"), "mine").unwrap();
        let root = OutputRoot::open(&out).unwrap();
        for bad in ["../escape", "/etc/passwd", "a/../../b", ""] {
            assert!(root.place(bad).is_err(), "{bad:?}");
        }
        // An earlier download left a link; a later output goes "through" it.
        std::os::unix::fs::symlink(&victim, out.join("lib")).unwrap();
        let err = root.place("lib/keep").unwrap_err();
        assert!(format!("{err:#}").contains("symbolic link"), "{err:#}");
        assert_eq!(std::fs::read_to_string(victim.join("keep")).unwrap(), "mine");
        // Replacing the link itself removes the link, not its target.
        let dest = root.place("lib").unwrap();
        assert!(!dest.exists() && victim.join("keep").exists());
        assert_eq!(root.place("gen/deep/x.o").unwrap(), out.join("gen/deep/x.o"));
        assert!(out.join("gen/deep").is_dir());
    }
}
