//! Declared outputs, read back from the overlay's upper layer after a run:
//! files with their executable bit, directories as Tree protos, symlinks.
//! What a command did not produce is simply absent.

use std::collections::{BTreeMap, BTreeSet};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use casbuild_cas::digest::{Digest, DigestFunction};
use casbuild_cas::error::Invalid;
use casbuild_cas::local_tree::{hash_open_file, LocalTree};
use casbuild_proto::reapi::{ActionResult, Command, Directory, OutputDirectory, OutputFile, OutputSymlink, Tree};
use prost::Message;

use crate::beneath::{split_last, Beneath, Kind};
use crate::sandbox::relative_inside;

/// How the command declared an output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Declared {
    /// `output_paths` (REAPI ≥ 2.1): whatever kind it turns out to be.
    Path,
    /// Legacy `output_files`.
    File,
    /// Legacy `output_directories`.
    Directory,
}

/// The outputs a Command declares, each relative to its working directory.
// The legacy fields are deprecated in REAPI 2.1 but still what Bazel 4 sends.
#[allow(deprecated)]
fn declared(command: &Command) -> Vec<(String, Declared)> {
    if !command.output_paths.is_empty() {
        return command.output_paths.iter().map(|p| (p.clone(), Declared::Path)).collect();
    }
    let files = command.output_files.iter().map(|p| (p.clone(), Declared::File));
    files.chain(command.output_directories.iter().map(|p| (p.clone(), Declared::Directory))).collect()
}

/// The declared outputs as paths from the input root (the working
/// directory joined in front).
pub fn declared_from_root(command: &Command) -> Vec<String> {
    let cwd = command.working_directory.trim_end_matches('/');
    declared(command)
        .into_iter()
        .map(|(path, _)| if cwd.is_empty() || cwd == "." { path } else { format!("{cwd}/{path}") })
        .collect()
}

/// Checks the declared outputs: relative, inside the tree, no duplicates,
/// none inside another. Returns the directories (relative to the working
/// tree's root) to create before the command runs: the outputs' parents.
pub fn output_parents(command: &Command) -> Result<Vec<String>, Invalid> {
    let cwd = &command.working_directory;
    relative_inside(cwd).map_err(|e| e.context(format!("working directory {cwd:?}")))?;
    let outputs = declared(command);
    let mut seen = BTreeSet::new();
    for (path, _) in &outputs {
        if path.is_empty() {
            return Err(Invalid("an output path is empty".into()));
        }
        relative_inside(path).map_err(|e| e.context(format!("output path {path:?}")))?;
        let normal = normalize(path);
        if !seen.insert(normal.clone()) {
            return Err(Invalid(format!("output path {path:?} is declared twice")));
        }
    }
    for a in &seen {
        if let Some(b) = seen.iter().find(|b| b.starts_with(&format!("{a}/"))) {
            return Err(Invalid(format!("output paths collide: {b:?} is inside {a:?}")));
        }
    }
    let parents = seen
        .iter()
        .map(|p| {
            let parent = Path::new(p).parent().map(|q| q.to_string_lossy().into_owned()).unwrap_or_default();
            normalize(&Path::new(cwd).join(parent).to_string_lossy())
        })
        .collect::<BTreeSet<_>>();
    Ok(parents.into_iter().collect())
}

/// `a/./b/` → `a/b`.
fn normalize(path: &str) -> String {
    let parts: Vec<String> = Path::new(path)
        .components()
        .filter_map(|c| match c {
            std::path::Component::Normal(n) => Some(n.to_string_lossy().into_owned()),
            _ => None,
        })
        .collect();
    parts.join("/")
}

/// Outputs found, as ActionResult fields plus the blobs to upload.
#[derive(Debug, Default)]
pub struct Collected {
    /// output_files, output_directories, output_symlinks (and the legacy
    /// file/directory symlink lists) filled in.
    pub result: ActionResult,
    /// Tree protos, encoded.
    pub blobs: Vec<(Digest, Bytes)>,
    /// File contents to upload, by digest.
    pub files: BTreeMap<Digest, PathBuf>,
}

/// Reads the declared outputs of `command` from `upper` (the overlay's upper
/// layer) at the command's working directory `cwd`.
///
/// The upper layer is the command's work, so every path is resolved beneath
/// it without following links ([`Beneath`]): an output behind a symlink the
/// command planted (`rmdir d && ln -s /etc d`, declared `d/passwd`) is
/// refused, and an output that is itself a symlink comes back as a symlink.
/// The paths recorded for upload and the directory scan of output
/// directories (which reads links as links) rely on the tree being frozen:
/// everything the command started is dead before collection, and the scratch
/// directory is the worker's alone.
// Legacy symlink lists answer legacy output declarations (REAPI < 2.1 clients).
#[allow(deprecated)]
pub fn collect(upper: &Path, cwd: &str, command: &Command, function: DigestFunction) -> Result<Collected, String> {
    let mut out = Collected::default();
    let root = Beneath::open(upper).map_err(|e| format!("the upper layer: {e}"))?;
    for (path, how) in declared(command) {
        let relative = normalize(&Path::new(cwd).join(&path).to_string_lossy());
        let Some((parent, name)) = split_last(&relative).map_err(|e| format!("output {path:?}: {e}"))? else {
            continue;
        };
        let dir = match root.dir(&parent) {
            Ok(dir) => dir,
            // Never made (or a whiteout / a file on the way): not produced.
            Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::NotADirectory) => continue,
            Err(e) => return Err(format!("output {path:?} is not collected: {e}")),
        };
        let Some((kind, stat)) = dir.kind_of(name).map_err(|e| format!("output {path:?}: {e}"))? else { continue };
        let full = upper.join(&relative);
        match kind {
            Kind::Symlink => {
                let target = dir.read_link(name).map_err(|e| format!("output {path:?}: {e}"))?;
                let link = OutputSymlink {
                    path: path.clone(),
                    target: target.to_string_lossy().into_owned(),
                    node_properties: None,
                };
                match how {
                    Declared::Path => out.result.output_symlinks.push(link),
                    Declared::File => out.result.output_file_symlinks.push(link),
                    Declared::Directory => out.result.output_directory_symlinks.push(link),
                }
            }
            Kind::File => {
                if how == Declared::Directory {
                    return Err(format!("output directory {path:?} is a file"));
                }
                let read = dir.file(&name.to_string_lossy()).and_then(|mut file| hash_open_file(&mut file, function));
                let digest = read.map_err(|e| format!("reading output {path:?}: {e}"))?;
                out.files.insert(digest, full);
                out.result.output_files.push(OutputFile {
                    path,
                    digest: Some(digest.to_proto()),
                    is_executable: stat.st_mode & 0o111 != 0,
                    contents: Vec::new(),
                    node_properties: None,
                });
            }
            Kind::Directory => {
                if how == Declared::File {
                    return Err(format!("output file {path:?} is a directory"));
                }
                let (tree_digest, tree_bytes, files) =
                    tree_of(&full, function).map_err(|e| format!("output {path:?}: {e}"))?;
                out.blobs.push((tree_digest, tree_bytes));
                out.files.extend(files);
                out.result.output_directories.push(OutputDirectory {
                    path,
                    tree_digest: Some(tree_digest.to_proto()),
                    is_topologically_sorted: false,
                    root_directory_digest: None,
                });
            }
            // A character device numbered 0/0 is an overlayfs whiteout: the
            // command deleted an input there.
            Kind::Other if stat.st_mode & libc::S_IFMT == libc::S_IFCHR && stat.st_rdev == 0 => continue,
            Kind::Other => return Err(format!("output {path:?} is not a file, directory or symlink")),
        }
    }
    Ok(out)
}

/// The Tree proto of a local directory, and its files.
fn tree_of(dir: &Path, function: DigestFunction) -> Result<(Digest, Bytes, BTreeMap<Digest, PathBuf>), String> {
    let scanned = LocalTree::scan(dir, function).map_err(|e| e.to_string())?;
    let decode = |bytes: &Bytes| Directory::decode(bytes.as_ref()).map_err(|e| e.to_string());
    let root = decode(&scanned.directories[&scanned.root])?;
    let children = scanned
        .directories
        .iter()
        .filter(|(digest, _)| **digest != scanned.root)
        .map(|(_, bytes)| decode(bytes))
        .collect::<Result<Vec<_>, _>>()?;
    let tree = Bytes::from(Tree { root: Some(root), children }.encode_to_vec());
    Ok((function.digest_of(&tree), tree, scanned.files))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn command(paths: &[&str]) -> Command {
        Command { output_paths: paths.iter().map(|s| s.to_string()).collect(), ..Default::default() }
    }

    #[test]
    fn output_parents_are_created_relative_to_the_working_directory() {
        let mut c = command(&["out/a.o", "b.txt", "gen/dir"]);
        c.working_directory = "pkg".into();
        assert_eq!(output_parents(&c).unwrap(), ["pkg", "pkg/gen", "pkg/out"]);
    }

    #[test]
    fn escaping_duplicate_and_colliding_outputs_are_refused() {
        assert!(output_parents(&command(&["../x"])).unwrap_err().0.contains("output path"));
        assert!(output_parents(&command(&["/abs"])).unwrap_err().0.contains("output path"));
        assert!(output_parents(&command(&["a", "./a"])).unwrap_err().0.contains("twice"));
        assert!(output_parents(&command(&["a", "a/b"])).unwrap_err().0.contains("collide"));
        assert!(output_parents(&command(&["ab", "a/b"])).is_ok());
    }

    #[test]
    fn planted_links_are_returned_as_links_and_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let up = dir.path();
        std::fs::create_dir_all(up.join("pkg")).unwrap();
        std::os::unix::fs::symlink("/etc", up.join("pkg/d")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", up.join("pkg/leak")).unwrap();
        let mut c = command(&["d/passwd"]);
        c.working_directory = "pkg".into();
        let err = collect(up, "pkg", &c, DigestFunction::Sha256).unwrap_err();
        assert!(err.contains("symbolic link"), "{err}");
        // The working directory itself replaced by a link to a host directory.
        std::os::unix::fs::symlink("/etc", up.join("cwd")).unwrap();
        let err = collect(up, "cwd", &command(&["passwd"]), DigestFunction::Sha256).unwrap_err();
        assert!(err.contains("symbolic link"), "{err}");
        let out = collect(up, "pkg", &command(&["d", "leak"]), DigestFunction::Sha256).unwrap();
        assert!(out.files.is_empty() && out.result.output_directories.is_empty());
        let targets: Vec<&str> = out.result.output_symlinks.iter().map(|l| l.target.as_str()).collect();
        assert_eq!(targets, ["/etc", "/etc/passwd"]);
    }

    #[test]
    fn collects_every_kind_and_skips_absent_outputs() {
        let dir = tempfile::tempdir().unwrap();
        let up = dir.path();
        std::fs::create_dir_all(up.join("d/sub")).unwrap();
        std::fs::write(up.join("d/sub/f"), "in dir").unwrap();
        std::fs::write(up.join("tool"), "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(up.join("tool"), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink("tool", up.join("link")).unwrap();
        let c = command(&["d", "tool", "link", "never-made"]);
        let out = collect(up, "", &c, DigestFunction::Sha256).unwrap();
        assert_eq!(out.result.output_files.len(), 1);
        assert!(out.result.output_files[0].is_executable);
        assert_eq!(out.result.output_symlinks[0].target, "tool");
        assert_eq!(out.result.output_directories.len(), 1);
        let tree = Tree::decode(out.blobs[0].1.as_ref()).unwrap();
        assert_eq!(tree.root.unwrap().directories[0].name, "sub");
        assert_eq!(tree.children.len(), 1);
        assert_eq!(out.files.len(), 2, "the tool and the file inside the directory");
    }
}
