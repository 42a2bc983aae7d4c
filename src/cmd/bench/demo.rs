//! A generated build graph of a small C program — the workload the graph
//! tests and `casbuild bench graph` share, so both measure the same thing.
//! (The tests include this file by path; it needs only std and serde_json.)
//!
//! `units` generated headers (`gen-tK`), `units` compiles of real source files
//! that include them and a generated `config.h`, a compile of `main.c`, an
//! archive, a link, and a job that runs the program: `2 × units + 5` jobs.

use std::path::Path;

/// The PATH every job gets.
const PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Writes the sources and `graph.json` into `dir`; returns what the `run`
/// job writes to `result.txt`.
pub fn write_c_program(dir: &Path, units: usize) -> std::io::Result<String> {
    std::fs::create_dir_all(dir.join("src"))?;
    let mut jobs = Vec::new();
    let env = serde_json::json!({ "PATH": PATH });
    jobs.push(serde_json::json!({
        "id": "gen-config",
        "argv": ["sh", "-c", "mkdir -p gen && echo '#define SCALE 3' > gen/config.h"],
        "env": env, "outputs": ["gen/config.h"],
    }));
    let mut declarations = String::new();
    let mut calls = String::new();
    for k in 0..units {
        std::fs::write(
            dir.join(format!("src/f{k}.c")),
            format!("#include \"config.h\"\n#include \"t{k}.h\"\nint f{k}(void) {{ return T{k} * SCALE + {k}; }}\n"),
        )?;
        declarations.push_str(&format!("int f{k}(void);\n"));
        calls.push_str(&format!("    sum += f{k}();\n"));
        jobs.push(serde_json::json!({
            "id": format!("gen-t{k}"),
            "argv": ["sh", "-c", format!("mkdir -p gen && echo '#define T{k} {k}' > gen/t{k}.h")],
            "env": env, "outputs": [format!("gen/t{k}.h")],
        }));
        jobs.push(serde_json::json!({
            "id": format!("cc-f{k}"),
            "argv": ["cc", "-O1", "-Igen", "-c", format!("src/f{k}.c"), "-o", format!("obj/f{k}.o")],
            "env": env,
            "inputs": [format!("src/f{k}.c"), "gen-config:gen/config.h", format!("gen-t{k}:gen/t{k}.h")],
            "outputs": [format!("obj/f{k}.o")],
        }));
    }
    std::fs::write(dir.join("src/funcs.h"), declarations)?;
    std::fs::write(
        dir.join("src/main.c"),
        format!(
            "#include <stdio.h>\n#include \"funcs.h\"\nint main(void) {{\n    long sum = 0;\n{calls}    printf(\"sum=%ld\\n\", sum);\n    return 0;\n}}\n"
        ),
    )?;
    jobs.push(serde_json::json!({
        "id": "cc-main",
        "argv": ["cc", "-O1", "-c", "src/main.c", "-o", "obj/main.o"],
        "env": env, "inputs": ["src/main.c", "src/funcs.h"], "outputs": ["obj/main.o"],
    }));
    let objects: Vec<String> = (0..units).map(|k| format!("obj/f{k}.o")).collect();
    let mut ar = vec!["ar".to_owned(), "rcsD".to_owned(), "lib/libf.a".to_owned()];
    ar.extend(objects.iter().cloned());
    jobs.push(serde_json::json!({
        "id": "archive",
        "argv": ar,
        "env": env,
        "inputs": (0..units).map(|k| format!("cc-f{k}:obj/f{k}.o")).collect::<Vec<_>>(),
        "outputs": ["lib/libf.a"],
    }));
    jobs.push(serde_json::json!({
        "id": "link",
        "argv": ["cc", "obj/main.o", "lib/libf.a", "-o", "bin/app"],
        "env": env, "inputs": ["cc-main:obj/main.o", "archive:lib/libf.a"], "outputs": ["bin/app"],
    }));
    jobs.push(serde_json::json!({
        "id": "run",
        "argv": ["sh", "-c", "bin/app > result.txt"],
        "env": env, "inputs": ["link:bin/app"], "outputs": ["result.txt"],
    }));
    let graph = serde_json::json!({ "jobs": jobs });
    std::fs::write(dir.join("graph.json"), serde_json::to_string_pretty(&graph)?)?;
    let sum: usize = (0..units).map(|k| k * 3 + k).sum();
    Ok(format!("sum={sum}\n"))
}
