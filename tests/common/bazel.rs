//! Driving Debian's Bazel 4.2.3 from tests: availability, bounded batch-mode
//! runs with a private output root, and reading its process summary.

use std::path::Path;
use std::process::Command;

/// Whether `bazel` is installed; without it the test fails in CI and skips elsewhere.
pub fn available(test: &str) -> bool {
    super::privileged(test, || {
        let ok = Command::new("bazel").arg("--version").output().map(|o| o.status.success()).unwrap_or(false);
        if ok {
            Ok(())
        } else {
            Err("bazel is not installed (scripts/setup-debian.sh installs bazel-bootstrap)".into())
        }
    })
}

/// The startup flag that lets Debian's Bazel open TLS channels, or `None`
/// (the test skips, or fails under CASBUILD_REQUIRE_PRIVILEGED) when the
/// library it needs is missing. Debian builds Bazel's Netty without the
/// JDK's ALPN support, so gRPC over TLS needs netty-tcnative's native half
/// (package `libnetty-tcnative-jni`), which Debian installs under a name
/// Netty does not look for: the flag points `java.library.path` at a
/// directory holding a copy under the expected name.
/// The copy goes into `scratch` (the test's own directory: a fixed path
/// under /tmp could be planted by another user, and Bazel runs as root).
pub fn tls_jvm_args(test: &str, scratch: &Path) -> Option<String> {
    let installed = Path::new("/usr/lib/x86_64-linux-gnu/jni/libnetty-tcnative.so");
    let dir = scratch.join("tcnative");
    let ready = super::privileged(test, || {
        if !installed.exists() {
            return Err(format!("{} is missing (apt-get install libnetty-tcnative-jni)", installed.display()));
        }
        // A copy, not a link: the library checks the file name it was
        // loaded from.
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        std::fs::copy(installed, dir.join("libnetty_tcnative.so")).map_err(|e| e.to_string())?;
        Ok(())
    });
    ready.then(|| format!("--host_jvm_args=-Djava.library.path={}", dir.display()))
}

/// Runs one bazel command in `workspace` in batch mode (no server left
/// behind) with a private output root, bounded to 10 minutes. Returns whether
/// it succeeded and its combined output.
pub fn run<S: AsRef<std::ffi::OsStr>>(workspace: &Path, output_root: &Path, args: &[S]) -> (bool, String) {
    let output = Command::new("timeout")
        .args(["600", "bazel", "--batch", "--nohome_rc"])
        .arg(format!("--output_user_root={}", output_root.display()))
        .args(args)
        .current_dir(workspace)
        .output()
        .expect("running bazel");
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.success(), text)
}

/// The number of processes of `kind` (" remote", " remote cache hit", ...)
/// in Bazel's "N processes: ..." summary, 0 when absent.
pub fn processes(output: &str, kind: &str) -> u32 {
    let line = output.lines().find(|l| l.contains(" processes:")).unwrap_or_else(|| panic!("no summary in:\n{output}"));
    line.split([':', ','])
        .filter_map(|part| part.trim().trim_end_matches('.').strip_suffix(kind))
        .filter_map(|n| n.trim().parse::<u32>().ok())
        .sum()
}
