//! `casbuild cc` under make, against `casbuild up`: the zstd library sources
//! shipped in the zstd-sys crate (40 `.c` files in nested directories) built
//! by a Makefile written here with `make -j8 CC="casbuild cc gcc"`, linked
//! with a driver that round-trips a file. Objects and dependency files equal
//! those of a local build; with the cluster stopped the build still succeeds
//! through local fallback. Needs root (the worker's FUSE mount and sandbox).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{needs_root, Coordinator};

/// The zstd sources of the zstd-sys crate cargo fetched for this workspace.
fn zstd_sources() -> PathBuf {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cargo"));
    let registry = home.join("registry/src");
    for index in std::fs::read_dir(&registry).expect("cargo's registry sources") {
        for krate in std::fs::read_dir(index.unwrap().path()).unwrap() {
            let path = krate.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if name.starts_with("zstd-sys-") && path.join("zstd/lib/zstd.h").exists() {
                return path.join("zstd/lib");
            }
        }
    }
    panic!("no zstd-sys sources under {}", registry.display());
}

const MAKEFILE: &str = r#"SRCS := $(shell find lib -name '*.c' | sort)
OBJS := $(SRCS:.c=.o)
CFLAGS := -O2 -Wall -DZSTD_DISABLE_ASM -DXXH_NAMESPACE=ZSTD_ -Ilib -Ilib/common -MD

roundtrip: driver.o $(OBJS)
	$(CC) -o $@ $^

%.o: %.c
	$(CC) $(CFLAGS) -c $< -o $@

clean:
	rm -f roundtrip driver.o driver.d $(OBJS) $(OBJS:.o=.d)
"#;

const DRIVER: &str = r#"#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "zstd.h"

int main(int argc, char **argv) {
    FILE *f = fopen(argv[1], "rb");
    if (!f) return 2;
    static char in[1 << 20];
    size_t n = fread(in, 1, sizeof in, f);
    fclose(f);
    size_t bound = ZSTD_compressBound(n);
    char *packed = malloc(bound), *back = malloc(n + 1);
    size_t c = ZSTD_compress(packed, bound, in, n, 19);
    if (ZSTD_isError(c)) return 3;
    size_t d = ZSTD_decompress(back, n + 1, packed, c);
    if (ZSTD_isError(d) || d != n || memcmp(in, back, n) != 0) return 4;
    printf("ok %zu -> %zu\n", n, c);
    return 0;
}
"#;

/// A project directory: the zstd sources under lib/, the Makefile, the driver.
fn project(dir: &Path) -> PathBuf {
    let project = dir.to_path_buf();
    std::fs::create_dir_all(&project).unwrap();
    let status = Command::new("cp").arg("-r").arg(zstd_sources()).arg(project.join("lib")).status().unwrap();
    assert!(status.success());
    std::fs::write(project.join("Makefile"), MAKEFILE).unwrap();
    std::fs::write(project.join("driver.c"), DRIVER).unwrap();
    project
}

fn make(project: &Path, cc: &str, remote: &str, target: &str) -> Output {
    Command::new("make")
        .args(["-j8", target])
        .arg(format!("CC={cc}"))
        .current_dir(project)
        .env("CASBUILD_REMOTE", remote)
        .output()
        .expect("running make")
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Every file under `root` with `extension`, relative to root.
fn files(root: &Path, extension: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == extension) {
                found.push(path.strip_prefix(root).unwrap().to_path_buf());
            }
        }
    }
    found.sort();
    found
}

#[test]
fn zstd_builds_through_the_wrapper_with_local_objects_and_survives_a_dead_cluster() {
    if !needs_root("zstd_builds_through_the_wrapper", true) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = Coordinator::start_up(&dir.path().join("up"));
    let wrapped = project(&dir.path().join("wrapped"));
    let local = project(&dir.path().join("local"));
    let cc = format!("{} cc gcc", env!("CARGO_BIN_EXE_casbuild"));

    let out = make(&wrapped, &cc, &server.url(), "roundtrip");
    assert!(out.status.success(), "{}", text(&out));
    assert!(!text(&out).contains("locally"), "nothing fell back:\n{}", text(&out));
    let run = Command::new(wrapped.join("roundtrip")).arg(wrapped.join("lib/zstd.h")).output().unwrap();
    assert!(String::from_utf8_lossy(&run.stdout).starts_with("ok "), "{}", text(&run));

    // The same build with plain gcc: byte-identical objects and dependency files.
    let out = make(&local, "gcc", &server.url(), "roundtrip");
    assert!(out.status.success(), "{}", text(&out));
    let objects = files(&wrapped, "o");
    assert_eq!(objects.len(), files(&wrapped.join("lib"), "c").len() + 1, "one object per source and the driver");
    for relative in objects.iter().chain(&files(&wrapped, "d")) {
        let ours = std::fs::read(wrapped.join(relative)).unwrap();
        let theirs = std::fs::read(local.join(relative)).unwrap();
        assert!(ours == theirs, "{} differs from a local compile", relative.display());
    }

    // The cluster goes away: the build still succeeds, compiling locally
    // with one warning line per compile.
    drop(server);
    let out = make(&wrapped, &cc, "grpc://127.0.0.1:9", "clean");
    assert!(out.status.success(), "{}", text(&out));
    let out = make(&wrapped, &cc, "grpc://127.0.0.1:1", "roundtrip");
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("casbuild cc: compiling lib/common/zstd_common.c locally:"), "{log}");
    let run = Command::new(wrapped.join("roundtrip")).arg(wrapped.join("Makefile")).output().unwrap();
    assert!(String::from_utf8_lossy(&run.stdout).starts_with("ok "), "{}", text(&run));
}

#[test]
fn bad_invocations_get_the_compilers_own_answer() {
    let dir = tempfile::tempdir().unwrap();
    let casbuild = |args: &[&str]| {
        common::casbuild()
            .arg("cc")
            .args(args)
            .current_dir(dir.path())
            .env("CASBUILD_REMOTE", "grpc://127.0.0.1:1")
            .output()
            .unwrap()
    };
    let out = casbuild(&[]);
    assert!(!out.status.success());
    assert!(text(&out).contains("give the compiler and its arguments"), "{}", text(&out));
    let out = casbuild(&["no-such-compiler-here", "-c", "x.c"]);
    assert_eq!(out.status.code(), Some(127));
    assert!(text(&out).contains(r#"compiler "no-such-compiler-here" not found on PATH"#), "{}", text(&out));
    // A missing source: exactly what gcc itself says, no casbuild warning.
    let ours = casbuild(&["gcc", "-c", "missing.c", "-o", "missing.o"]);
    let theirs =
        Command::new("gcc").args(["-c", "missing.c", "-o", "missing.o"]).current_dir(dir.path()).output().unwrap();
    assert_eq!(ours.status.code(), theirs.status.code());
    assert_eq!(text(&ours), text(&theirs));
}
