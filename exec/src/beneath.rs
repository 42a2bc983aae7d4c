//! Host directories walked so that nothing inside them can redirect the
//! walk: every path below a root is resolved by the kernel with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`, so a symlink (or `..`)
//! anywhere on the way fails the lookup instead of leading out of the tree.
//!
//! The worker touches trees an action controls in two places: the working
//! tree while the sandbox is set up (input-root symlinks), and the overlay's
//! upper layer while outputs are collected (links the command planted).
//! Both go through [`Beneath`].

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Component, Path};

use nix::errno::Errno;
use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{fchmod, fstatat, mkdirat, FileStat, Mode, SFlag};

/// What a name below a root is, without following it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    File,
    Directory,
    Symlink,
    Other,
}

/// An open directory that paths are resolved beneath.
#[derive(Debug)]
pub struct Beneath {
    fd: OwnedFd,
}

fn resolve() -> ResolveFlag {
    ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_NO_MAGICLINKS
}

/// A nix error as an io::Error that says which path was refused and why.
/// (The error keeps the errno's kind: callers tell "not there" apart.)
fn refused(path: &str, e: Errno) -> io::Error {
    let kind = io::Error::from(e).kind();
    let message = match e {
        // openat2 reports a symlink met under RESOLVE_NO_SYMLINKS as ELOOP
        // and `..` or an absolute path under RESOLVE_BENEATH as EXDEV.
        Errno::ELOOP => format!("{path:?} goes through a symbolic link"),
        Errno::EXDEV => format!("{path:?} leaves its tree"),
        Errno::ENOTDIR => format!("{path:?}: a component is not a directory"),
        other => format!("{path:?}: {}", io::Error::from(other)),
    };
    io::Error::new(kind, message)
}

/// `path`'s components, all normal names; `.` is skipped, anything else refused.
fn names(path: &str) -> io::Result<Vec<&OsStr>> {
    let mut out = Vec::new();
    for component in Path::new(path).components() {
        match component {
            Component::Normal(name) => out.push(name),
            Component::CurDir => {}
            _ => return Err(io::Error::other(format!("{path:?} is not a relative path inside its tree"))),
        }
    }
    Ok(out)
}

impl Beneath {
    /// Opens `root` itself. The root's own path is the caller's (a scratch
    /// directory, a mount point), so only its last component is not followed.
    pub fn open(root: &Path) -> io::Result<Self> {
        let flags = OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_RDONLY;
        let fd = nix::fcntl::open(root, flags, Mode::empty())
            .map_err(|e| io::Error::other(format!("opening {}: {}", root.display(), io::Error::from(e))))?;
        Ok(Beneath { fd })
    }

    fn open_how(&self, path: &str, flags: OFlag) -> io::Result<OwnedFd> {
        // RESOLVE_NO_SYMLINKS covers the last component too (ELOOP); O_NOFOLLOW
        // would turn a final link into ENOTDIR, hiding why the path failed.
        let how = OpenHow::new().flags(flags | OFlag::O_CLOEXEC).resolve(resolve());
        let target = if path.is_empty() { "." } else { path };
        openat2(self.fd.as_fd(), target, how).map_err(|e| refused(path, e))
    }

    /// The directory at `path` below this one.
    pub fn dir(&self, path: &str) -> io::Result<Beneath> {
        names(path)?;
        Ok(Beneath { fd: self.open_how(path, OFlag::O_DIRECTORY | OFlag::O_RDONLY)? })
    }

    /// The regular file at `path`, open for reading.
    pub fn file(&self, path: &str) -> io::Result<File> {
        names(path)?;
        Ok(File::from(self.open_how(path, OFlag::O_RDONLY)?))
    }

    /// Creates every missing directory of `path` (mode 0755) and returns the
    /// last. An existing symlink on the way is an error, never followed.
    pub fn create_dirs(&self, path: &str) -> io::Result<Beneath> {
        let mut dir = Beneath { fd: self.fd.try_clone()? };
        for name in names(path)? {
            match mkdirat(dir.fd.as_fd(), name, Mode::from_bits_truncate(0o755)) {
                Ok(()) | Err(Errno::EEXIST) => {}
                Err(e) => return Err(refused(path, e)),
            }
            let next = dir.open_how(&name.to_string_lossy(), OFlag::O_DIRECTORY | OFlag::O_RDONLY);
            dir = Beneath { fd: next.map_err(|e| io::Error::new(e.kind(), format!("{path:?}: {e}")))? };
        }
        Ok(dir)
    }

    /// What `name` (one component, directly in this directory) is, not
    /// following it; `None` when it does not exist.
    pub fn kind_of(&self, name: &OsStr) -> io::Result<Option<(Kind, FileStat)>> {
        let flags = nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW;
        let stat = match fstatat(self.fd.as_fd(), name, flags) {
            Ok(stat) => stat,
            Err(Errno::ENOENT) => return Ok(None),
            Err(e) => return Err(refused(&name.to_string_lossy(), e)),
        };
        let kind = match SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT {
            SFlag::S_IFREG => Kind::File,
            SFlag::S_IFDIR => Kind::Directory,
            SFlag::S_IFLNK => Kind::Symlink,
            _ => Kind::Other,
        };
        Ok(Some((kind, stat)))
    }

    /// The target of the symlink `name` in this directory.
    pub fn read_link(&self, name: &OsStr) -> io::Result<std::ffi::OsString> {
        nix::fcntl::readlinkat(self.fd.as_fd(), name).map_err(|e| refused(&name.to_string_lossy(), e))
    }

    /// Changes this directory's owner and mode.
    pub fn chown_chmod(&self, uid: u32, gid: u32, mode: u32) -> io::Result<()> {
        let (uid, gid) = (nix::unistd::Uid::from_raw(uid), nix::unistd::Gid::from_raw(gid));
        nix::unistd::fchown(self.fd.as_fd(), Some(uid), Some(gid)).map_err(io::Error::from)?;
        fchmod(self.fd.as_fd(), Mode::from_bits_truncate(mode)).map_err(io::Error::from)
    }
}

/// `path` split into the directory that holds its last component and that
/// component; `None` for an empty path.
pub fn split_last(path: &str) -> io::Result<Option<(String, &OsStr)>> {
    let parts = names(path)?;
    let Some((last, parents)) = parts.split_last() else { return Ok(None) };
    let parent: Vec<String> = parents.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    Ok(Some((parent.join("/"), *last)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symlinks_and_dotdot_are_refused_anywhere_on_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("real/sub")).unwrap();
        std::fs::write(root.join("real/sub/f"), "ok").unwrap();
        std::os::unix::fs::symlink("/etc", root.join("abs")).unwrap();
        std::os::unix::fs::symlink("real", root.join("rel")).unwrap();
        let beneath = Beneath::open(&root).unwrap();

        assert_eq!(std::io::read_to_string(beneath.file("real/sub/f").unwrap()).unwrap(), "ok");
        assert!(beneath.file("abs/passwd").unwrap_err().to_string().contains("symbolic link"));
        assert!(beneath.file("rel/sub/f").unwrap_err().to_string().contains("symbolic link"));
        assert!(beneath.dir("abs").is_err());
        assert!(beneath.dir("real/../..").is_err());
        assert!(beneath.create_dirs("abs/new").is_err());
        assert!(!Path::new("/etc/new").exists());
        assert!(beneath.create_dirs("rel/new").is_err());
        assert!(!root.join("real/new").exists(), "nothing is created through a relative link either");

        beneath.create_dirs("made/./deep").unwrap();
        assert!(root.join("made/deep").is_dir());
        let real = beneath.dir("real").unwrap();
        assert_eq!(real.kind_of(OsStr::new("sub")).unwrap().unwrap().0, Kind::Directory);
        assert_eq!(beneath.kind_of(OsStr::new("abs")).unwrap().unwrap().0, Kind::Symlink);
        assert_eq!(beneath.read_link(OsStr::new("abs")).unwrap(), "/etc");
        assert!(beneath.kind_of(OsStr::new("absent")).unwrap().is_none());
    }

    #[test]
    fn paths_split_into_parent_and_name() {
        assert_eq!(split_last("a/./b/c").unwrap(), Some(("a/b".into(), OsStr::new("c"))));
        assert_eq!(split_last("c").unwrap(), Some((String::new(), OsStr::new("c"))));
        assert_eq!(split_last("").unwrap(), None);
        assert!(split_last("../c").is_err());
    }
}
