//! `casbuild cas upload | ls | download` as a user runs them.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Output;

use common::{casbuild, sample_tree, Coordinator};

fn run(args: &[&str]) -> Output {
    casbuild().args(args).output().expect("running casbuild")
}

fn ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(out.status.success(), "casbuild {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn fails(args: &[&str]) -> String {
    let out = run(args);
    assert!(!out.status.success(), "casbuild {args:?} should fail");
    String::from_utf8(out.stderr).unwrap()
}

/// Compares two trees: names, kinds, contents, executable bits, link targets.
fn assert_same_tree(a: &Path, b: &Path) {
    let mut names_a: Vec<_> = std::fs::read_dir(a).unwrap().map(|e| e.unwrap().file_name()).collect();
    let mut names_b: Vec<_> = std::fs::read_dir(b).unwrap().map(|e| e.unwrap().file_name()).collect();
    names_a.sort();
    names_b.sort();
    assert_eq!(names_a, names_b, "{} vs {}", a.display(), b.display());
    for name in names_a {
        let (pa, pb) = (a.join(&name), b.join(&name));
        let (ma, mb) = (std::fs::symlink_metadata(&pa).unwrap(), std::fs::symlink_metadata(&pb).unwrap());
        if ma.file_type().is_symlink() {
            assert_eq!(std::fs::read_link(&pa).unwrap(), std::fs::read_link(&pb).unwrap());
        } else if ma.is_dir() {
            assert!(mb.is_dir());
            assert_same_tree(&pa, &pb);
        } else {
            assert_eq!(std::fs::read(&pa).unwrap(), std::fs::read(&pb).unwrap(), "{}", pa.display());
            assert_eq!(ma.permissions().mode() & 0o100, mb.permissions().mode() & 0o100, "{}", pa.display());
        }
    }
}

#[test]
fn a_tree_uploads_lists_and_downloads_identically() {
    let dir = tempfile::tempdir().unwrap();
    let server = Coordinator::start(&dir.path().join("storage"), &[]);
    let remote = server.url();
    let src = dir.path().join("src-tree");
    sample_tree(&src);
    for function in ["blake3", "sha256"] {
        let flags = ["--remote", remote.as_str(), "--digest-function", function, "--instance", "cli/test"];
        let upload = |path: &Path| {
            let mut args = vec!["cas", "upload"];
            args.extend_from_slice(&flags);
            args.push(path.to_str().unwrap());
            ok(&args).trim().to_string()
        };
        let root = upload(&src);
        assert_eq!(upload(&src), root, "uploading again gives the same digest");

        let mut args = vec!["cas", "ls"];
        args.extend_from_slice(&flags);
        args.push(&root);
        let listing = ok(&args);
        for want in ["exec", "run.sh", "src/nested/deeper/data.bin", "link -> src/main.c", "empty-dir/", "3145728"] {
            assert!(listing.contains(want), "{want} missing from:\n{listing}");
        }

        let out = dir.path().join(format!("out-{function}"));
        let mut args = vec!["cas", "download"];
        args.extend_from_slice(&flags);
        args.extend_from_slice(&[root.as_str(), out.to_str().unwrap()]);
        ok(&args);
        assert_same_tree(&src, &out);
        let err = fails(&args);
        assert!(err.contains("already exists"), "{err}");

        // A single file.
        let file = src.join("src/nested/deeper/data.bin");
        let digest = upload(&file);
        let copy = dir.path().join(format!("copy-{function}.bin"));
        let mut args = vec!["cas", "download"];
        args.extend_from_slice(&flags);
        args.extend_from_slice(&[digest.as_str(), copy.to_str().unwrap()]);
        ok(&args);
        assert_eq!(std::fs::read(&copy).unwrap(), std::fs::read(&file).unwrap());
    }
}

#[test]
fn user_mistakes_get_clear_messages() {
    let dir = tempfile::tempdir().unwrap();
    let server = Coordinator::start(&dir.path().join("storage"), &[]);
    let remote = server.url();
    let absent = format!("{}/10", "ab".repeat(32));
    let dest = dir.path().join("x");
    let err = fails(&["cas", "download", "--remote", &remote, &absent, dest.to_str().unwrap()]);
    assert!(err.contains("not found"), "{err}");
    let err = fails(&["cas", "ls", "--remote", &remote, "nonsense"]);
    assert!(err.contains("HASH/SIZE"), "{err}");
    let err = fails(&["cas", "upload", "--remote", &remote, "/no/such/path"]);
    assert!(err.contains("/no/such/path"), "{err}");
    let err = fails(&["cas", "upload", "--remote", "grpc://127.0.0.1:1", "Cargo.toml"]);
    assert!(err.contains("cannot connect"), "{err}");
    let err = fails(&["cas", "upload", "--remote", "http//bad", "Cargo.toml"]);
    assert!(err.contains("grpc://HOST:PORT"), "{err}");
    let err = fails(&["cas", "upload", "--remote", &remote, "--digest-function", "md5", "Cargo.toml"]);
    assert!(err.contains("md5"), "{err}");
    let err = fails(&["coordinator", "--max-disk", "lots"]);
    assert!(err.contains("lots"), "{err}");
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "listen = \"127.0.0.1:0\"\nmax_dsk = \"1GiB\"\n").unwrap();
    let err = fails(&["coordinator", "--config", config.to_str().unwrap()]);
    assert!(err.contains("bad.toml") && err.contains("max_dsk"), "{err}");
}

#[test]
fn roles_refuse_directories_that_overlap_another_roles() {
    let dir = tempfile::tempdir().unwrap();
    let storage = dir.path().join("storage");
    let server = Coordinator::start(&storage, &[]);
    let pid = server.pid().to_string();

    // Inside a live coordinator's storage, or around it: refused, naming it.
    // (Bounded: a role that wrongly starts would serve forever.)
    let bounded = |args: &[&str]| {
        let out = std::process::Command::new("timeout")
            .arg("30")
            .arg(env!("CARGO_BIN_EXE_casbuild"))
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "casbuild {args:?} should fail");
        String::from_utf8(out.stderr).unwrap()
    };
    let inner = storage.join("blobs-of-another");
    let err = bounded(&["coordinator", "--listen", "127.0.0.1:0", "--storage", inner.to_str().unwrap()]);
    assert!(err.contains("overlaps") && err.contains("casbuild coordinator") && err.contains(&pid), "{err}");
    let err = bounded(&["coordinator", "--listen", "127.0.0.1:0", "--storage", dir.path().to_str().unwrap()]);
    assert!(err.contains("overlaps") && err.contains(&pid), "{err}");
    let err = bounded(&["up", "--listen", "127.0.0.1:0", "--dir", storage.to_str().unwrap()]);
    assert!(err.contains("overlaps") && err.contains(&pid), "{err}");
    assert!(!storage.join("scratch").exists(), "refused before touching anything");

    // One role's own directories must not nest either.
    let mount = dir.path().join("cas");
    let err = bounded(&[
        "worker",
        "--coordinator",
        &server.url(),
        "--mount",
        mount.to_str().unwrap(),
        "--scratch",
        mount.join("scratch").to_str().unwrap(),
        "--cache-dir",
        dir.path().join("cache").to_str().unwrap(),
    ]);
    assert!(err.contains("the mount directory") && err.contains("the scratch directory"), "{err}");

    // A dead process's claim does not count.
    server.kill();
    let again = Coordinator::start(&inner, &[]);
    drop(again);
}
