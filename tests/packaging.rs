//! Packaging stays true to the binary: the systemd units pass
//! `systemd-analyze verify`, and the command lines of the units and of the
//! Dockerfile's images are ones `casbuild` accepts (every flag known, the
//! config file where docs/DEPLOY.md puts it).

mod common;

use std::path::Path;

use common::{casbuild, privileged};

fn repo(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Runs a packaged command line with /etc/casbuild moved to a directory
/// that does not exist: casbuild must get as far as reading the config file,
/// which only happens once every flag parsed.
fn assert_accepted(args: &[String], absent: &Path) {
    let args: Vec<String> = args.iter().map(|a| a.replace("/etc/casbuild", absent.to_str().unwrap())).collect();
    let output = casbuild().args(&args).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains(&format!("reading config {}", absent.display())), "casbuild {args:?}: {stderr}");
}

#[test]
fn systemd_units_verify_and_their_commands_parse() {
    let test = "systemd_units_verify_and_their_commands_parse";
    let found = || which("systemd-analyze").map(drop).ok_or_else(|| "systemd-analyze is not installed".to_owned());
    if !privileged(test, found) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for unit in ["casbuild-coordinator.service", "casbuild-worker.service"] {
        let text = std::fs::read_to_string(repo("packaging/systemd").join(unit)).unwrap();
        // The unit names the installed binary; verify checks it exists.
        let text = text.replace("/usr/local/bin/casbuild", env!("CARGO_BIN_EXE_casbuild"));
        let path = dir.path().join(unit);
        std::fs::write(&path, &text).unwrap();
        let output = std::process::Command::new("systemd-analyze").arg("verify").arg(&path).output().unwrap();
        let complaints = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success() && complaints.trim().is_empty(), "{unit}: {complaints}");

        let exec = text.lines().find_map(|l| l.strip_prefix("ExecStart=")).expect("an ExecStart line");
        let args: Vec<String> = exec.split_whitespace().skip(1).map(str::to_owned).collect();
        assert_accepted(&args, &dir.path().join("absent"));
    }
}

#[test]
fn the_dockerfile_copies_what_exists_and_its_images_commands_parse() {
    let text = std::fs::read_to_string(repo("packaging/Dockerfile")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for line in text.lines().filter(|l| l.starts_with("COPY ") && !l.contains("--from")) {
        let source = line.split_whitespace().nth(1).unwrap();
        assert!(source == "." || repo(source).exists(), "{line}: {source} is not in the repository");
    }
    // Each image's ENTRYPOINT and CMD (JSON form) make one command line.
    let json = |prefix: &str, stage: &str| -> Vec<String> {
        let body = text.split(&format!(" AS {stage}\n")).nth(1).expect("the stage");
        let line = body.lines().find_map(|l| l.strip_prefix(prefix)).expect("the instruction");
        serde_json::from_str(line).expect("JSON form")
    };
    for stage in ["coordinator", "worker"] {
        let mut args = json("ENTRYPOINT ", stage);
        assert_eq!(args.remove(0), "/usr/local/bin/casbuild");
        assert_eq!(args[0], stage);
        args.extend(json("CMD ", stage));
        assert_accepted(&args, &dir.path().join("absent"));
    }
}

fn which(program: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|dir| Path::new(dir).join(program)).find(|p| p.exists())
}
