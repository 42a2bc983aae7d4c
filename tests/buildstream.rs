//! BuildStream 2 (with its own buildbox-casd) as a client of casbuild's
//! Remote Asset API and CAS: a project written here builds an import element
//! from a tarball and pushes its source (source cache) and artifact (artifact
//! cache) to `casbuild coordinator`; then, with BuildStream's local cache
//! deleted and the tarball removed, the artifact and the source both come
//! back from casbuild.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{privileged, Coordinator};

/// Where scripts/setup-debian.sh puts BuildStream, unless `CASBUILD_BST` says.
fn bst_path() -> PathBuf {
    std::env::var_os("CASBUILD_BST").map(PathBuf::from).unwrap_or_else(|| "/opt/casbuild/buildstream/bin/bst".into())
}

/// How long one `bst` command may take; each takes a few seconds here.
const BST_TIMEOUT_SECS: &str = "120";

/// Runs `bst ARGS` in `project` with a private home and the user config;
/// returns success and output. A run that hangs is ended after
/// [`BST_TIMEOUT_SECS`] and its output carries BuildStream's main and task
/// logs (its CAS daemon's included), which say where it waited.
fn bst(home: &Path, project: &Path, args: &[&str]) -> (bool, String) {
    let (status, output) = bst_once(home, project, args);
    if status == Some(124) {
        return (false, format!("bst {args:?} did not finish in {BST_TIMEOUT_SECS} s:\n{output}\n{}", bst_logs(home)));
    }
    (status == Some(0), output)
}

fn bst_once(home: &Path, project: &Path, args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new("timeout")
        .args(["-k", "10", BST_TIMEOUT_SECS])
        .arg(bst_path())
        .args(["--no-interactive", "--config"])
        .arg(home.join("buildstream.conf"))
        .arg("--log-file")
        .arg(home.join("main.log"))
        .args(args)
        .current_dir(project)
        .env("HOME", home)
        .env("XDG_CACHE_HOME", home.join("cache"))
        .env("XDG_CONFIG_HOME", home.join("config"))
        .env("XDG_DATA_HOME", home.join("data"))
        .output()
        .expect("running bst");
    (out.status.code(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// The last lines of BuildStream's main log and of every task log under the
/// log directory (a sibling of `home`).
fn bst_logs(home: &Path) -> String {
    let mut files = vec![home.join("main.log")];
    let mut dirs = vec![home.with_file_name("bst-logs")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                files.push(path);
            }
        }
    }
    let mut text = String::new();
    for file in files {
        let body = std::fs::read_to_string(&file).unwrap_or_default();
        let lines: Vec<&str> = body.lines().collect();
        let tail = lines[lines.len().saturating_sub(40)..].join("\n");
        text.push_str(&format!("==> {} <==\n{tail}\n", file.display()));
    }
    text
}

#[test]
fn buildstream_shares_sources_and_artifacts_through_casbuild() {
    let available = privileged("buildstream_shares_sources_and_artifacts_through_casbuild", || {
        match Command::new(bst_path()).arg("--version").output() {
            Ok(out) if out.status.success() => Ok(()),
            _ => Err(format!("{} is missing (scripts/setup-debian.sh installs it)", bst_path().display())),
        }
    });
    if !available {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = Coordinator::start(&dir.path().join("store"), &[]);
    let home = dir.path().join("home");
    let project = dir.path().join("project");
    std::fs::create_dir_all(project.join("elements")).unwrap();
    std::fs::create_dir_all(dir.path().join("files/greeting")).unwrap();
    let text = "hello from a BuildStream source\n";
    std::fs::write(dir.path().join("files/greeting/hello.txt"), text).unwrap();
    let tarball = dir.path().join("greeting.tar");
    let status =
        Command::new("tar").arg("-C").arg(dir.path().join("files")).arg("-cf").arg(&tarball).arg("greeting").status();
    assert!(status.unwrap().success());
    let sha256 = common::sha256(&std::fs::read(&tarball).unwrap()).hash_hex();

    std::fs::write(project.join("project.conf"), "name: casbuild-test\nmin-version: 2.0\nelement-path: elements\n")
        .unwrap();
    std::fs::write(
        project.join("elements/greeting.bst"),
        format!("kind: import\nsources:\n- kind: tar\n  url: file://{}\n  ref: {sha256}\n", tarball.display()),
    )
    .unwrap();
    std::fs::create_dir_all(&home).unwrap();
    let url = format!("http://{}", server.addr);
    // BuildStream's local CAS daemon keeps 5% of the disk free by default and,
    // on a fuller disk (a CI machine after a build), waits for a cleanup that
    // can never free enough: a fixed quota and a small reserve keep it going.
    std::fs::write(
        home.join("buildstream.conf"),
        format!(
            "cachedir: {cache}\nlogdir: {logs}\ncache:\n  quota: 1G\n  reserved-disk-space: 10M\nartifacts:\n  servers:\n  - url: {url}\n    push: true\n\
             source-caches:\n  servers:\n  - url: {url}\n    push: true\n",
            cache = dir.path().join("bst-cache").display(),
            logs = dir.path().join("bst-logs").display(),
        ),
    )
    .unwrap();

    // Build: the artifact and the source are pushed to casbuild.
    let (ok, log) = bst(&home, &project, &["build", "greeting.bst"]);
    assert!(ok, "{log}");
    assert!(log.contains("Pushed artifact"), "{log}");
    assert!(log.contains("Pushed source"), "{log}");

    // Everything local is gone: BuildStream's cache and the tarball.
    std::fs::remove_dir_all(dir.path().join("bst-cache")).unwrap();
    std::fs::remove_file(&tarball).unwrap();

    let out = dir.path().join("artifact");
    let (ok, log) =
        bst(&home, &project, &["artifact", "checkout", "greeting.bst", "--directory", out.to_str().unwrap()]);
    assert!(ok, "{log}");
    assert!(log.contains("Pulled artifact"), "{log}");
    assert_eq!(std::fs::read_to_string(out.join("hello.txt")).unwrap(), text);

    let sources = dir.path().join("sources");
    let (ok, log) =
        bst(&home, &project, &["source", "checkout", "greeting.bst", "--directory", sources.to_str().unwrap()]);
    assert!(ok, "{log}");
    assert!(log.contains("Pulled source"), "{log}");
    assert_eq!(std::fs::read_to_string(sources.join("greeting/hello.txt")).unwrap(), text);
}
