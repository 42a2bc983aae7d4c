//! Bazel 4.2.3 workspaces on a machine without internet: local stand-ins
//! for the rule repositories Bazel would download, and the generated
//! workspace `casbuild bench bazel` builds. (The tests include this file by
//! path; it needs only std.)

use std::io;
use std::path::Path;

fn write(path: &Path, contents: &str) -> io::Result<()> {
    std::fs::create_dir_all(path.parent().expect("a file in a directory"))?;
    std::fs::write(path, contents)
}

fn executable(path: &Path, contents: &str) -> io::Result<()> {
    write(path, contents)?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
}

/// Writes local stand-ins for `rules_cc`, `rules_java` and the coverage
/// tools (thin wrappers over the native rules) under `dir`; the
/// `--override_repository` flags that point Bazel at them.
pub fn offline_repositories(dir: &Path) -> io::Result<Vec<String>> {
    let wrappers = |names: &[&str]| -> String {
        names.iter().map(|n| format!("def {n}(**kwargs):\n    native.{n}(**kwargs)\n\n")).collect()
    };
    write(&dir.join("rules_cc/WORKSPACE"), "")?;
    write(&dir.join("rules_cc/cc/BUILD"), "")?;
    write(
        &dir.join("rules_cc/cc/defs.bzl"),
        &wrappers(&["cc_library", "cc_binary", "cc_test", "cc_toolchain", "cc_toolchain_suite"]),
    )?;
    write(&dir.join("rules_java/WORKSPACE"), "")?;
    write(&dir.join("rules_java/java/BUILD"), "")?;
    write(
        &dir.join("rules_java/java/defs.bzl"),
        &wrappers(&["java_import", "java_runtime", "java_toolchain", "java_binary"]),
    )?;
    write(&dir.join("coverage/WORKSPACE"), "")?;
    executable(&dir.join("coverage/noop.sh"), "#!/bin/sh\nexit 0\n")?;
    write(
        &dir.join("coverage/BUILD"),
        "sh_binary(name = \"coverage_report_generator\", srcs = [\"noop.sh\"], visibility = [\"//visibility:public\"])\n\
         sh_binary(name = \"lcov_merger\", srcs = [\"noop.sh\"], visibility = [\"//visibility:public\"])\n",
    )?;
    Ok([("rules_cc", "rules_cc"), ("rules_java", "rules_java"), ("remote_coverage_tools", "coverage")]
        .iter()
        .map(|(repo, sub)| format!("--override_repository={repo}={}", dir.join(sub).display()))
        .collect())
}

/// The shape of a generated workspace.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    /// Genrule chains.
    pub chains: usize,
    /// Steps of each chain.
    pub length: usize,
    /// C libraries.
    pub libraries: usize,
    /// Sources of each library.
    pub files: usize,
    /// Headers of a `common` library that every source includes (none: no such library).
    pub headers: usize,
    /// Written into the common headers: a new revision changes every compile's inputs, not its command.
    pub revision: usize,
}

/// Writes a workspace of `shape.chains` genrule chains of `shape.length`
/// steps each and `shape.libraries` C libraries of `shape.files` sources
/// each (every source including `shape.headers` common headers), linked into
/// one binary (`//:app`).
pub fn write_build(ws: &Path, shape: &Shape) -> io::Result<()> {
    let Shape { chains, length, libraries, files, headers, revision } = *shape;
    write(&ws.join("WORKSPACE"), "")?;
    let mut build = String::new();
    for c in 0..chains {
        for s in 0..length {
            let (srcs, cmd) = match s {
                0 => (String::new(), format!("seq 1 {} > $@", 100 + c)),
                _ => {
                    (format!("srcs = [\":c{c}s{}\"], ", s - 1), format!("sort -rn $< | awk '{{print $$1 + {s}}}' > $@"))
                }
            };
            build
                .push_str(&format!("genrule(name = \"c{c}s{s}\", {srcs}outs = [\"c{c}s{s}.txt\"], cmd = \"{cmd}\")\n"));
        }
    }
    let mut deps = Vec::new();
    let mut common = String::new();
    if headers > 0 {
        // Each header a few KiB of declarations, as a real project's are.
        let mut names = Vec::new();
        for h in 0..headers {
            let declarations: String = (0..64)
                .map(|d| format!("int common_h{h}_d{d}(int x, const char *name, long rev{revision});\n"))
                .collect();
            write(&ws.join(format!("common/h{h}.h")), &format!("/* revision {revision} */\n{declarations}"))?;
            names.push(format!("\"common/h{h}.h\""));
            common.push_str(&format!("#include \"common/h{h}.h\"\n"));
        }
        build.push_str(&format!("cc_library(name = \"common\", hdrs = [{}])\n", names.join(", ")));
    }
    let common_dep = if headers > 0 { ", deps = [\":common\"]" } else { "" };
    let mut main_calls = String::new();
    for l in 0..libraries {
        let mut srcs = Vec::new();
        for f in 0..files {
            let name = format!("lib{l}/f{f}.c");
            write(
                &ws.join(&name),
                &format!(
                    "#include <stdio.h>\n#include <string.h>\n#include \"lib{l}/api.h\"\n{common}\
                     int lib{l}_f{f}(int x) {{\n  char buf[64];\n  snprintf(buf, sizeof buf, \"%d-{l}-{f}\", x);\n  \
                     return (int)strlen(buf) + x * {f};\n}}\n"
                ),
            )?;
            srcs.push(format!("\"{name}\""));
        }
        let declarations: String = (0..files).map(|f| format!("int lib{l}_f{f}(int x);\n")).collect();
        write(&ws.join(format!("lib{l}/api.h")), &declarations)?;
        build.push_str(&format!(
            "cc_library(name = \"lib{l}\", srcs = [{}], hdrs = [\"lib{l}/api.h\"]{common_dep})\n",
            srcs.join(", ")
        ));
        deps.push(format!("\":lib{l}\""));
        main_calls.push_str(&format!("  total += lib{l}_f0({l});\n"));
    }
    let includes: String = (0..libraries).map(|l| format!("#include \"lib{l}/api.h\"\n")).collect();
    write(
        &ws.join("main.c"),
        &format!("#include <stdio.h>\n{includes}int main(void) {{\n  int total = 0;\n{main_calls}  printf(\"%d\\n\", total);\n  return 0;\n}}\n"),
    )?;
    build.push_str(&format!("cc_binary(name = \"app\", srcs = [\"main.c\"], deps = [{}])\n", deps.join(", ")));
    write(&ws.join("BUILD"), &build)
}
