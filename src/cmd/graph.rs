//! `casbuild graph`: whole build graphs (see docs/GRAPH.md).

use std::path::PathBuf;

use anyhow::{bail, Context};
use casbuild_coordinator::graph::{parse_input, Graph, Input};

#[derive(clap::Subcommand)]
pub enum Command {
    /// Check a graph without running it: every problem is listed with its job and field.
    Check {
        /// The graph, as JSON.
        graph: PathBuf,
        /// Where source inputs are looked up [default: the graph file's directory].
        #[arg(long)]
        sources: Option<PathBuf>,
    },
}

pub async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Check { graph, sources } => {
            let text = std::fs::read_to_string(&graph).with_context(|| format!("reading {}", graph.display()))?;
            let parsed = Graph::from_json(&text).map_err(|e| anyhow::anyhow!("{}: {e}", graph.display()))?;
            let root = match sources {
                Some(dir) => dir,
                None => graph.parent().map(|p| p.to_path_buf()).unwrap_or_default(),
            };
            let problems = parsed.problems(&root);
            if !problems.is_empty() {
                for problem in &problems {
                    eprintln!("{}: {problem}", graph.display());
                }
                bail!("{} problem(s); nothing was run", problems.len());
            }
            let sources = parsed
                .jobs
                .iter()
                .flat_map(|j| j.inputs.iter())
                .filter(|i| matches!(parse_input(i), Input::Source(_)))
                .collect::<std::collections::BTreeSet<_>>()
                .len();
            println!("{}: ok, {} jobs, {sources} source files", graph.display(), parsed.jobs.len());
            Ok(())
        }
    }
}
