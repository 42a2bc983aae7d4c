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

fn write(path: &Path, contents: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, contents).unwrap();
}

#[path = "../../src/cmd/bench/bazel_workspace.rs"]
#[allow(dead_code)]
mod workspace;

/// Local stand-ins for the rule repositories Bazel 4 would download (this
/// machine has no internet); the flags that point Bazel at them.
pub fn offline_repositories(dir: &Path) -> Vec<String> {
    workspace::offline_repositories(dir).expect("writing the offline repositories")
}

/// A workspace at `ws` with one package, `pkg`, whose BUILD file is `build`.
pub fn package(ws: &Path, build: &str) {
    write(&ws.join("WORKSPACE"), "");
    write(&ws.join("pkg/BUILD"), build);
}

/// A workspace of genrule chains, a cc_library + cc_binary with headers in
/// subdirectories, an sh_test, and a genrule (`sneaky`) that reads an
/// undeclared file.
pub fn sample_workspace(ws: &Path) {
    write(&ws.join("WORKSPACE"), "");
    write(
        &ws.join("pkg/BUILD"),
        r#"
genrule(name = "a", outs = ["a.txt"], cmd = "echo hello > $@")
genrule(name = "b", srcs = [":a"], outs = ["b.txt"], cmd = "cat $< $< > $@")
genrule(name = "c", srcs = [":b", "input.txt"], outs = ["c.txt"], cmd = "cat $(SRCS) | tr a-z A-Z > $@")
cc_library(
    name = "lib",
    srcs = ["lib/answer.c", "lib/internal/detail.h"],
    hdrs = ["include/answer/answer.h"],
    strip_include_prefix = "include",
)
cc_binary(name = "app", srcs = ["main.c"], deps = [":lib"])
sh_test(name = "t", srcs = ["t.sh"], data = [":c"])
genrule(name = "sneaky", srcs = ["input.txt"], outs = ["sneaky.txt"], cmd = "cat pkg/input.txt pkg/secret.txt > $@")
"#,
    );
    write(&ws.join("pkg/input.txt"), "some input\n");
    write(&ws.join("pkg/secret.txt"), "not declared anywhere\n");
    write(&ws.join("pkg/include/answer/answer.h"), "int answer(void);\n");
    write(&ws.join("pkg/lib/internal/detail.h"), "#define DETAIL 40\n");
    write(&ws.join("pkg/lib/answer.c"), "#include \"answer/answer.h\"\n#include \"pkg/lib/internal/detail.h\"\nint answer(void) { return DETAIL + 2; }\n");
    write(
        &ws.join("pkg/main.c"),
        "#include <stdio.h>\n#include \"answer/answer.h\"\nint main(void) { printf(\"%d\\n\", answer()); return 0; }\n",
    );
    write(&ws.join("pkg/t.sh"), "#!/bin/sh\ngrep -q 'HELLO' pkg/c.txt && echo ok\n");
    std::fs::set_permissions(ws.join("pkg/t.sh"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
}
