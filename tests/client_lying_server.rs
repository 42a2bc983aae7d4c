//! A server that lies to clients: its trees name `..`, paths with slashes,
//! and links out of the target next to entries of the same name. `casbuild
//! graph run --out` must refuse them, `casbuild cas download` must refuse or
//! take such a blob for a plain file, and both must leave everything outside
//! their target directory as it was.

mod common;

use std::path::{Path, PathBuf};

use bytes::Bytes;
use casbuild_cas::digest::{Digest, DigestFunction};
use casbuild_proto::graph::graph_event::Event;
use casbuild_proto::graph::graphs_server::{Graphs, GraphsServer};
use casbuild_proto::graph::{
    output, GraphAccepted, GraphDone, GraphEvent, JobFinished, Output, SubmitGraphRequest, WatchGraphRequest,
};
use casbuild_proto::reapi::{Directory, DirectoryNode, FileNode, SymlinkNode, Tree};
use common::casbuild;
use common::liar::Liar;
use futures::stream::BoxStream;
use futures::StreamExt;
use prost::Message;
use tonic::{Request, Response, Status};

const F: DigestFunction = DigestFunction::Blake3;

/// The file contents the hostile trees use.
const CONTENTS: [&[u8]; 3] = [b"x", b"escaped\n", b"written through a link\n"];

fn file(name: &str, data: &[u8]) -> FileNode {
    FileNode { name: name.into(), digest: Some(F.digest_of(data).to_proto()), ..Default::default() }
}

fn dir(name: &str, directory: &Directory) -> DirectoryNode {
    DirectoryNode { name: name.into(), digest: Some(F.digest_of(&directory.encode_to_vec()).to_proto()) }
}

fn link(name: &str, target: &Path) -> SymlinkNode {
    SymlinkNode { name: name.into(), target: target.to_str().unwrap().into(), ..Default::default() }
}

/// Root directories no honest server stores, each with the subdirectories
/// it names. `outside` is a directory the attacks aim at.
fn hostile_trees(outside: &Path) -> Vec<(&'static str, Directory, Vec<Directory>)> {
    let planted = Directory { files: vec![file("planted", b"written through a link\n")], ..Default::default() };
    let escaped = Directory { files: vec![file("escaped", b"escaped\n")], ..Default::default() };
    vec![
        ("a file named ..", Directory { files: vec![file("..", b"x")], ..Default::default() }, vec![]),
        (
            "a file name with a slash",
            Directory { files: vec![file("../escaped", b"escaped\n")], ..Default::default() },
            vec![],
        ),
        (
            "a directory named ..",
            Directory { directories: vec![dir("..", &escaped)], ..Default::default() },
            vec![escaped.clone()],
        ),
        (
            "a link out of the target and a directory of the same name",
            Directory {
                directories: vec![dir("dir", &planted)],
                symlinks: vec![link("dir", outside)],
                ..Default::default()
            },
            vec![planted.clone()],
        ),
        (
            "an absolute name",
            Directory { files: vec![file(&format!("{}/abs", outside.display()), b"x")], ..Default::default() },
            vec![],
        ),
    ]
}

/// Every path under `root` except those under `skip`, with file contents.
fn snapshot(root: &Path, skip: &Path) -> Vec<(PathBuf, Option<Vec<u8>>)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        if path.starts_with(skip) {
            continue;
        }
        let meta = std::fs::symlink_metadata(&path).unwrap();
        if meta.is_dir() {
            stack.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
            out.push((path, None));
        } else {
            out.push((path.clone(), std::fs::read(&path).ok()));
        }
    }
    out.sort();
    out
}

/// A Graphs service whose one job "finishes" with `tree` as its directory output `gen`.
#[derive(Clone)]
struct LyingGraphs {
    tree: Digest,
}

#[tonic::async_trait]
impl Graphs for LyingGraphs {
    type SubmitGraphStream = BoxStream<'static, Result<GraphEvent, Status>>;
    type WatchGraphStream = BoxStream<'static, Result<GraphEvent, Status>>;

    async fn submit_graph(&self, _: Request<SubmitGraphRequest>) -> Result<Response<Self::SubmitGraphStream>, Status> {
        let output = Output {
            path: "gen".into(),
            kind: output::Kind::Directory as i32,
            digest: Some(self.tree.to_proto()),
            ..Default::default()
        };
        let event = |sequence, event| Ok(GraphEvent { graph_id: "g".into(), sequence, event: Some(event) });
        let events = vec![
            event(1, Event::Accepted(GraphAccepted { jobs: 1 })),
            event(
                2,
                Event::Finished(JobFinished { job_id: "gen".into(), outputs: vec![output], ..Default::default() }),
            ),
            event(3, Event::Done(GraphDone { executed: 1, ..Default::default() })),
        ];
        Ok(Response::new(futures::stream::iter(events).boxed()))
    }

    async fn watch_graph(&self, _: Request<WatchGraphRequest>) -> Result<Response<Self::WatchGraphStream>, Status> {
        Err(Status::not_found("no graph"))
    }
}

/// Serves `blobs` (and a lying Graphs service for `tree`) on loopback.
fn serve(runtime: &tokio::runtime::Runtime, blobs: Vec<Bytes>, tree: Digest) -> String {
    Liar::honest(&blobs).spawn(runtime, |router| router.add_service(GraphsServer::new(LyingGraphs { tree })))
}

#[test]
fn escaping_names_from_a_lying_server_write_nothing_outside_the_target() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let base = tempfile::tempdir().unwrap();
    let outside = base.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("keep"), "untouched\n").unwrap();
    let targets = base.path().join("targets");
    std::fs::create_dir_all(&targets).unwrap();
    let graph = base.path().join("graph.json");
    std::fs::write(&graph, r#"{"jobs": [{"id": "gen", "argv": ["true"], "outputs": ["gen"]}]}"#).unwrap();
    let before = snapshot(base.path(), &targets);

    for (n, (what, root, children)) in hostile_trees(&outside).into_iter().enumerate() {
        // Every file content any tree names, and this tree's directories.
        let mut blobs: Vec<Bytes> = CONTENTS.iter().map(|c| Bytes::from_static(c)).collect();
        blobs.push(Bytes::from(root.encode_to_vec()));
        blobs.extend(children.iter().map(|d| Bytes::from(d.encode_to_vec())));
        let tree = Tree { root: Some(root.clone()), children: children.clone() };
        let tree_bytes = Bytes::from(tree.encode_to_vec());
        let tree_digest = F.digest_of(&tree_bytes);
        blobs.push(tree_bytes);
        let root_digest = F.digest_of(&root.encode_to_vec());
        let url = serve(&runtime, blobs, tree_digest);

        let dest = targets.join(format!("download-{n}"));
        let out = casbuild()
            .args(["cas", "download", "--remote", &url])
            .arg(root_digest.to_string())
            .arg(&dest)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{what}: {stderr}");
        if out.status.success() {
            // Not a valid Directory, so the digest names a plain blob: its
            // bytes land in one new file, nothing else.
            let meta = std::fs::symlink_metadata(&dest).unwrap();
            assert!(meta.is_file(), "cas download of {what} made something other than one file");
            assert_eq!(std::fs::read(&dest).unwrap(), root.encode_to_vec());
        }

        let out = casbuild()
            .args(["graph", "run", "--plain", "--remote", &url, "--out"])
            .arg(targets.join(format!("graph-{n}")))
            .arg(&graph)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "graph run --out accepted {what}: {stderr}");
        assert!(stderr.contains("the server sent a malformed directory"), "{what}: {stderr}");
        assert!(!stderr.contains("panicked"), "{what}: {stderr}");
        assert_eq!(snapshot(base.path(), &targets), before, "{what} changed something outside the targets");
    }
}
