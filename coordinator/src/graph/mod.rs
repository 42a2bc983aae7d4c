//! Build graphs submitted whole (see `docs/GRAPH.md`): the JSON format, and
//! the checks that reject an invalid graph before anything runs — each
//! problem names the job and the field.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Component, Path};

use serde::Deserialize;

mod run;
mod service;

pub use run::{GraphRun, GraphSpec};
pub use service::GraphsService;

/// A whole build graph.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Graph {
    /// The jobs, in any order.
    pub jobs: Vec<Job>,
}

/// One command of the graph.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Job {
    /// Unique name: letters, digits, `_`, `-`, `.`.
    pub id: String,
    /// The command; `argv[0]` is looked up on `env["PATH"]` when it has no slash.
    pub argv: Vec<String>,
    /// The whole environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Source files by path (relative to the source root), and outputs of
    /// other jobs as `JOB-ID:PATH`.
    #[serde(default)]
    pub inputs: Vec<String>,
    /// Files and directories the job produces, relative to the output root.
    #[serde(default)]
    pub outputs: Vec<String>,
    /// Seconds the job may run.
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    /// Platform properties the worker must offer.
    #[serde(default)]
    pub platform: BTreeMap<String, String>,
}

impl From<casbuild_proto::graph::Job> for Job {
    fn from(job: casbuild_proto::graph::Job) -> Self {
        Job {
            id: job.id,
            argv: job.argv,
            env: job.env.into_iter().collect(),
            inputs: job.inputs,
            outputs: job.outputs,
            timeout_secs: (job.timeout_secs > 0).then_some(job.timeout_secs),
            platform: job.platform.into_iter().collect(),
        }
    }
}

impl From<&Job> for casbuild_proto::graph::Job {
    fn from(job: &Job) -> Self {
        casbuild_proto::graph::Job {
            id: job.id.clone(),
            argv: job.argv.clone(),
            env: job.env.clone().into_iter().collect(),
            inputs: job.inputs.clone(),
            outputs: job.outputs.clone(),
            timeout_secs: job.timeout_secs.unwrap_or(0),
            platform: job.platform.clone().into_iter().collect(),
        }
    }
}

/// What a job input names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input<'a> {
    /// A source file, relative to the source root.
    Source(&'a str),
    /// An output of another job.
    Output {
        /// The producing job.
        job: &'a str,
        /// One of its declared outputs.
        path: &'a str,
    },
}

/// Whether `id` is a valid job id.
fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// Reads one `inputs` entry: `JOB-ID:PATH` when the part before the first
/// colon is a valid job id, a source path otherwise.
pub fn parse_input(text: &str) -> Input<'_> {
    match text.split_once(':') {
        Some((job, path)) if valid_id(job) => Input::Output { job, path },
        _ => Input::Source(text),
    }
}

/// Why a path may not be used: absolute, or stepping out with `..`.
pub fn escapes(path: &str) -> Option<&'static str> {
    if path.is_empty() {
        return Some("is empty");
    }
    let mut depth = 0;
    for component in Path::new(path).components() {
        match component {
            Component::ParentDir => return Some("steps out of its root with '..'"),
            Component::RootDir | Component::Prefix(_) => return Some("is absolute"),
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
        }
    }
    if depth == 0 {
        return Some("names the root itself");
    }
    if depth > MAX_PATH_DEPTH {
        return Some("is nested too deeply");
    }
    None
}

/// Directories deep a path may go (bounds every walk over input roots).
pub const MAX_PATH_DEPTH: usize = 128;
/// Longest job timeout accepted: a week.
pub const MAX_TIMEOUT_SECS: u64 = 7 * 24 * 3600;

/// `a/./b` → `a/b`, for comparing paths.
pub fn normal(path: &str) -> String {
    Path::new(path)
        .components()
        .filter(|c| !matches!(c, Component::CurDir))
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join("/")
}

impl Graph {
    /// Parses a graph; a JSON error names the line and column.
    pub fn from_json(text: &str) -> Result<Graph, casbuild_cas::error::Invalid> {
        serde_json::from_str(text).map_err(|e| casbuild_cas::error::Invalid(format!("not a valid graph: {e}")))
    }

    /// Every problem that makes the graph unrunnable; sources are looked up
    /// under `source_root`. Empty when the graph is valid.
    pub fn problems(&self, source_root: &Path) -> Vec<String> {
        self.problems_with(|path| {
            (!source_root.join(path).is_file())
                .then(|| format!("source file {path:?} does not exist under {}", source_root.display()))
        })
    }

    /// Every problem that makes the graph unrunnable; `missing_source` says
    /// why a source path cannot be had, or None when it can.
    pub fn problems_with(&self, missing_source: impl Fn(&str) -> Option<String>) -> Vec<String> {
        let mut problems = Vec::new();
        let mut ids: HashMap<&str, usize> = HashMap::new();
        let mut producers: HashMap<String, (&str, usize)> = HashMap::new();
        if self.jobs.is_empty() {
            problems.push("the graph has no jobs".to_owned());
        }
        for (index, job) in self.jobs.iter().enumerate() {
            let name = format!("job {:?}", job.id);
            if !valid_id(&job.id) {
                problems.push(format!("jobs[{index}].id {:?}: use letters, digits, '_', '-' and '.'", job.id));
            }
            if let Some(first) = ids.insert(&job.id, index) {
                problems.push(format!("{name}: id is also used by jobs[{first}]"));
            }
            if job.argv.first().is_none_or(|a| a.is_empty()) {
                problems.push(format!("{name}: argv is empty"));
            }
            match job.timeout_secs {
                Some(0) => problems.push(format!("{name}: timeout_secs must be positive")),
                Some(t) if t > MAX_TIMEOUT_SECS => {
                    problems.push(format!("{name}: timeout_secs {t} is over the limit of {MAX_TIMEOUT_SECS}"))
                }
                _ => {}
            }
            for (k, output) in job.outputs.iter().enumerate() {
                if let Some(why) = escapes(output) {
                    problems.push(format!("{name}: outputs[{k}] {output:?} {why}"));
                } else if let Some((other, _)) = producers.insert(normal(output), (&job.id, k)) {
                    problems.push(format!("{name}: outputs[{k}] {output:?} is also an output of job {other:?}"));
                }
            }
        }
        // An output inside another output's directory would be produced twice.
        let mut paths: Vec<(&String, &(&str, usize))> = producers.iter().collect();
        paths.sort();
        for pair in paths.windows(2) {
            let ((outer, (outer_job, _)), (inner, (inner_job, k))) = (pair[0], pair[1]);
            if inner.starts_with(&format!("{outer}/")) {
                problems.push(format!(
                    "job {inner_job:?}: outputs[{k}] {inner:?} is inside output {outer:?} of job {outer_job:?}"
                ));
            }
        }
        for job in &self.jobs {
            let name = format!("job {:?}", job.id);
            for (k, input) in job.inputs.iter().enumerate() {
                match parse_input(input) {
                    Input::Source(path) => {
                        if let Some(why) = escapes(path) {
                            problems.push(format!("{name}: inputs[{k}] {path:?} {why}"));
                        } else if let Some(why) = missing_source(path) {
                            problems.push(format!("{name}: inputs[{k}] {why}"));
                        }
                    }
                    Input::Output { job: other, path } => {
                        if !ids.contains_key(other) {
                            problems.push(format!("{name}: inputs[{k}] {input:?} refers to unknown job {other:?}"));
                        } else if producers.get(&normal(path)).map(|(p, _)| *p) != Some(other) {
                            problems.push(format!("{name}: inputs[{k}] job {other:?} declares no output {path:?}"));
                        }
                    }
                }
            }
        }
        if let Some(cycle) = self.cycle() {
            problems.push(format!("the jobs form a cycle: {}", cycle.join(" -> ")));
        }
        problems
    }

    /// The ids of jobs each job depends on.
    fn dependencies(&self) -> HashMap<&str, Vec<&str>> {
        let known: HashSet<&str> = self.jobs.iter().map(|j| j.id.as_str()).collect();
        self.jobs
            .iter()
            .map(|job| {
                let deps = job
                    .inputs
                    .iter()
                    .filter_map(|i| match parse_input(i) {
                        Input::Output { job, .. } if known.contains(job) => Some(job),
                        _ => None,
                    })
                    .collect();
                (job.id.as_str(), deps)
            })
            .collect()
    }

    /// A dependency cycle, as the ids along it (first repeated at the end).
    /// Iterative: a chain of a million jobs must not overflow the stack.
    fn cycle(&self) -> Option<Vec<String>> {
        let deps = self.dependencies();
        // 0: unvisited, 1: on the current path, 2: done.
        let mut state: HashMap<&str, u8> = HashMap::new();
        let mut ids: Vec<&str> = deps.keys().copied().collect();
        ids.sort_unstable();
        for start in ids {
            if state.contains_key(start) {
                continue;
            }
            // The path from `start`, each entry with the next dependency to try.
            let mut path: Vec<(&str, usize)> = vec![(start, 0)];
            state.insert(start, 1);
            while let Some((id, next)) = path.last_mut() {
                let children = deps.get(*id).map(Vec::as_slice).unwrap_or(&[]);
                let Some(&child) = children.get(*next) else {
                    state.insert(*id, 2);
                    path.pop();
                    continue;
                };
                *next += 1;
                match state.get(child) {
                    Some(2) => {}
                    Some(_) => {
                        let at = path.iter().position(|(p, _)| *p == child).unwrap_or(0);
                        let mut cycle: Vec<String> = path[at..].iter().map(|(p, _)| p.to_string()).collect();
                        cycle.push(child.to_owned());
                        return Some(cycle);
                    }
                    None => {
                        state.insert(child, 1);
                        path.push((child, 0));
                    }
                }
            }
        }
        None
    }

    /// The jobs in an order where every job comes after those it depends on
    /// (for a valid graph). Iterative, like [`Graph::cycle`].
    pub fn topological_order(&self) -> Vec<&Job> {
        let deps = self.dependencies();
        let by_id: HashMap<&str, &Job> = self.jobs.iter().map(|j| (j.id.as_str(), j)).collect();
        let mut done: HashSet<&str> = HashSet::new();
        let mut order = Vec::new();
        for job in &self.jobs {
            if !done.insert(&job.id) {
                continue;
            }
            let mut stack: Vec<(&str, usize)> = vec![(&job.id, 0)];
            while let Some((id, next)) = stack.last_mut() {
                let children = deps.get(*id).map(Vec::as_slice).unwrap_or(&[]);
                match children.get(*next) {
                    Some(&child) => {
                        *next += 1;
                        if done.insert(child) {
                            stack.push((child, 0));
                        }
                    }
                    None => {
                        if let Some(job) = by_id.get(*id) {
                            order.push(*job);
                        }
                        stack.pop();
                    }
                }
            }
        }
        order
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph(json: &str) -> Graph {
        Graph::from_json(json).unwrap()
    }

    #[test]
    fn inputs_name_sources_or_other_jobs_outputs() {
        assert_eq!(parse_input("src/main.c"), Input::Source("src/main.c"));
        assert_eq!(parse_input("gen:out/version.h"), Input::Output { job: "gen", path: "out/version.h" });
        assert_eq!(parse_input("a b:c"), Input::Source("a b:c"), "not a job id before the colon");
    }

    #[test]
    fn a_valid_graph_has_no_problems_and_orders_dependencies_first() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("main.c"), "").unwrap();
        let g = graph(
            r#"{"jobs": [
                {"id": "link", "argv": ["cc", "main.o", "-o", "app"], "inputs": ["compile:main.o"], "outputs": ["app"]},
                {"id": "compile", "argv": ["cc", "-c", "main.c"], "inputs": ["main.c"], "outputs": ["main.o"]}
            ]}"#,
        );
        assert_eq!(g.problems(dir.path()), Vec::<String>::new());
        let order: Vec<&str> = g.topological_order().iter().map(|j| j.id.as_str()).collect();
        assert_eq!(order, ["compile", "link"]);
    }

    #[test]
    fn a_very_long_chain_is_checked_and_ordered_without_recursion() {
        // Ids sort so that the walk starts at the far end of the chain.
        let n = 200_000;
        let jobs: Vec<Job> = (0..n)
            .map(|i| Job {
                id: format!("x{i:07}"),
                argv: vec!["true".into()],
                env: Default::default(),
                inputs: if i + 1 < n { vec![format!("x{:07}:o{}", i + 1, i + 1)] } else { vec![] },
                outputs: vec![format!("o{i}")],
                timeout_secs: None,
                platform: Default::default(),
            })
            .collect();
        let mut g = Graph { jobs };
        assert!(g.problems_with(|_| None).is_empty());
        assert_eq!(g.topological_order().first().unwrap().id, format!("x{:07}", n - 1));
        g.jobs[n - 1].inputs = vec!["x0000000:o0".into()];
        assert!(g.problems_with(|_| None).iter().any(|p| p.contains("cycle")));
    }

    #[test]
    fn every_kind_of_invalid_graph_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let problems = |json: &str| graph(json).problems(dir.path()).join("\n");
        let p = problems(
            r#"{"jobs": [{"id": "a", "argv": ["x"], "inputs": ["b:o"], "outputs": ["p"]}, {"id": "b", "argv": ["x"], "inputs": ["a:p"], "outputs": ["o"]}]}"#,
        );
        assert!(p.contains("cycle: a -> b -> a"), "{p}");
        let p = problems(r#"{"jobs": [{"id": "a", "argv": ["x"], "inputs": ["nope:o"]}]}"#);
        assert!(p.contains(r#"job "a": inputs[0] "nope:o" refers to unknown job "nope""#), "{p}");
        let p = problems(r#"{"jobs": [{"id": "a", "argv": ["x"]}, {"id": "a", "argv": ["y"]}]}"#);
        assert!(p.contains(r#"job "a": id is also used by jobs[0]"#), "{p}");
        let p = problems(
            r#"{"jobs": [{"id": "a", "argv": ["x"], "outputs": ["o"]}, {"id": "b", "argv": ["y"], "outputs": ["./o"]}]}"#,
        );
        assert!(p.contains(r#"job "b": outputs[0] "./o" is also an output of job "a""#), "{p}");
        let p = problems(r#"{"jobs": [{"id": "a", "argv": ["x"], "inputs": ["missing.c"]}]}"#);
        assert!(p.contains(r#"job "a": inputs[0] source file "missing.c" does not exist"#), "{p}");
        let p = problems(r#"{"jobs": [{"id": "a", "argv": ["x"], "outputs": ["../up", "/abs"]}]}"#);
        assert!(p.contains(r#"outputs[0] "../up" steps out"#) && p.contains(r#"outputs[1] "/abs" is absolute"#), "{p}");
        let p = problems(r#"{"jobs": [{"id": "a", "argv": []}, {"id": "b", "argv": ["x"], "inputs": ["a:o"]}]}"#);
        assert!(p.contains(r#"job "a": argv is empty"#) && p.contains(r#"job "a" declares no output "o""#), "{p}");
        let p = problems(
            r#"{"jobs": [{"id": "a", "argv": ["x"], "outputs": ["gen", "."], "timeout_secs": 99999999999}, {"id": "b", "argv": ["y"], "outputs": ["gen/a.h"]}]}"#,
        );
        assert!(p.contains(r#"job "b": outputs[0] "gen/a.h" is inside output "gen" of job "a""#), "{p}");
        assert!(p.contains(r#"outputs[1] "." names the root itself"#), "{p}");
        assert!(p.contains("timeout_secs 99999999999 is over the limit"), "{p}");
        assert!(Graph::from_json(r#"{"jobs": [{"id": "a", "argv": ["x"], "outptus": []}]}"#)
            .unwrap_err()
            .0
            .contains("outptus"));
    }
}
