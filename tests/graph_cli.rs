//! `casbuild graph check` as a user runs it: a valid graph passes, and each
//! kind of invalid graph is refused with its job and field named.

mod common;

use common::casbuild;

fn check(dir: &std::path::Path, json: &str) -> (bool, String) {
    let path = dir.join("graph.json");
    std::fs::write(&path, json).unwrap();
    let out = casbuild().args(["graph", "check"]).arg(&path).output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn graphs_are_checked_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("src")).unwrap();
    std::fs::write(dir.path().join("src/main.c"), "int main(void) { return 0; }\n").unwrap();
    let (ok, text) = check(
        dir.path(),
        r#"{"jobs": [
            {"id": "compile", "argv": ["cc", "-c", "src/main.c", "-o", "main.o"], "inputs": ["src/main.c"], "outputs": ["main.o"]},
            {"id": "link", "argv": ["cc", "main.o", "-o", "app"], "inputs": ["compile:main.o"], "outputs": ["app"]}
        ]}"#,
    );
    assert!(ok && text.contains("ok, 2 jobs, 1 source files"), "{text}");

    let cases = [
        (
            r#"{"jobs": [{"id": "a", "argv": ["x"], "inputs": ["b:o"], "outputs": ["p"]}, {"id": "b", "argv": ["x"], "inputs": ["a:p"], "outputs": ["o"]}]}"#,
            "cycle: a -> b -> a",
        ),
        (
            r#"{"jobs": [{"id": "a", "argv": ["x"], "inputs": ["ghost:o"]}]}"#,
            r#"job "a": inputs[0] "ghost:o" refers to unknown job "ghost""#,
        ),
        (
            r#"{"jobs": [{"id": "a", "argv": ["x"]}, {"id": "a", "argv": ["y"]}]}"#,
            r#"job "a": id is also used by jobs[0]"#,
        ),
        (
            r#"{"jobs": [{"id": "a", "argv": ["x"], "outputs": ["o"]}, {"id": "b", "argv": ["y"], "outputs": ["o"]}]}"#,
            r#"job "b": outputs[0] "o" is also an output of job "a""#,
        ),
        (
            r#"{"jobs": [{"id": "a", "argv": ["x"], "inputs": ["src/missing.c"]}]}"#,
            r#"job "a": inputs[0] source file "src/missing.c" does not exist"#,
        ),
        (
            r#"{"jobs": [{"id": "a", "argv": ["x"], "outputs": ["../escape"]}]}"#,
            r#"job "a": outputs[0] "../escape" steps out of its root"#,
        ),
        (
            r#"{"jobs": [{"id": "a", "argv": ["x"], "inputs": ["../../etc/passwd"]}]}"#,
            r#"job "a": inputs[0] "../../etc/passwd" steps out"#,
        ),
        (r#"{"jobs": [{"id": "a", "argv": ["x"], "outptus": ["o"]}]}"#, "unknown field `outptus`"),
        (r#"{"jobs": [{"id": "a", "argv": ["x"]"#, "not a valid graph"),
    ];
    for (json, expected) in cases {
        let (ok, text) = check(dir.path(), json);
        assert!(!ok, "{json} should be refused");
        assert!(text.contains(expected), "{json}: expected {expected:?} in:\n{text}");
    }
}
