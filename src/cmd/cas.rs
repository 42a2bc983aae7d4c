//! `casbuild cas`: upload, download and list blobs and trees in a remote CAS.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use casbuild_fs::digest::{Digest, DigestFunction};
use casbuild_fs::local_tree::{hash_file, LocalTree};
use casbuild_fs::store::{BlobStore, RemoteStore, RemoteStoreOptions, CHUNK_SIZE};
use casbuild_fs::tree::{child_digest, looks_like_directory};
use casbuild_proto::reapi::{Directory, Tree};
use futures::StreamExt;
use prost::Message;
use tokio::io::AsyncWriteExt;

/// Options every `cas` subcommand takes.
#[derive(clap::Args, Clone)]
pub struct Remote {
    /// The server, as grpc://HOST:PORT.
    #[arg(long, env = "CASBUILD_REMOTE", default_value = "grpc://127.0.0.1:8980")]
    pub remote: String,
    /// REAPI instance name.
    #[arg(long, default_value = "")]
    pub instance: String,
    /// Digest function of the digests given and printed.
    #[arg(long, default_value = "blake3")]
    pub digest_function: DigestFunction,
}

impl Remote {
    pub async fn connect(&self) -> anyhow::Result<RemoteStore> {
        let options = RemoteStoreOptions {
            instance: self.instance.clone(),
            timeout: Duration::from_secs(60),
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
    store.upload_missing(directories, &tree.files).await?;
    Ok(tree.root)
}

/// Streams one file into the CAS without holding it in memory.
async fn upload_file(store: &RemoteStore, digest: &Digest, path: &Path) -> anyhow::Result<()> {
    store
        .upload_file(digest, path)
        .await
        .with_context(|| format!("uploading {} (did it change while being read?)", path.display()))
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

async fn write_new_file(dest: &Path, bytes: &[u8], executable: bool) -> anyhow::Result<()> {
    tokio::fs::write(dest, bytes).await.with_context(|| format!("writing {}", dest.display()))?;
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
    let mut file = tokio::fs::File::create(dest).await.with_context(|| format!("creating {}", dest.display()))?;
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

/// Writes the tree rooted at `digest` into the new directory `dest`.
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
    while let Some((digest, path)) = stack.pop() {
        let dir = tree.get(&digest).with_context(|| format!("directory {digest} is missing from the CAS"))?;
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        for sub in &dir.directories {
            let child = child_digest(digest.function, &sub.name, sub.digest.as_ref()).map_err(anyhow::Error::msg)?;
            stack.push((child, path.join(&sub.name)));
        }
        for file in &dir.files {
            let child = child_digest(digest.function, &file.name, file.digest.as_ref()).map_err(anyhow::Error::msg)?;
            files.push((child, path.join(&file.name), file.is_executable));
        }
        for link in &dir.symlinks {
            let at = path.join(&link.name);
            std::os::unix::fs::symlink(&link.target, &at).with_context(|| format!("symlink {}", at.display()))?;
        }
    }
    let small: Vec<Digest> = files.iter().filter(|(d, _, _)| d.size_bytes <= CHUNK_SIZE as u64).map(|f| f.0).collect();
    let mut fetched: HashMap<Digest, Bytes> = HashMap::new();
    for (digest, data) in store.read_batch(&small).await? {
        fetched.insert(digest, data.with_context(|| format!("fetching {digest}"))?);
    }
    for (digest, path, executable) in files {
        match fetched.get(&digest) {
            Some(data) => write_new_file(&path, data, executable).await?,
            None if digest.is_empty_blob() => write_new_file(&path, &[], executable).await?,
            None => download_file(store, &digest, &path, executable).await?,
        }
    }
    Ok(())
}
