//! Compiles `worker.proto`, `graph.proto` and `cc.proto` with protox (a pure-Rust protobuf compiler), so the
//! build needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=worker.proto");
    println!("cargo:rerun-if-changed=graph.proto");
    println!("cargo:rerun-if-changed=cc.proto");
    println!("cargo:rerun-if-changed=reapi.proto");
    let descriptors = protox::compile(["worker.proto", "graph.proto", "cc.proto"], ["."])?;
    // Served by the coordinator's reflection service.
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("casbuild_descriptors.bin"), prost::Message::encode_to_vec(&descriptors))?;
    // REAPI's messages are the bazel-remote-apis crate's (reapi.proto only names them).
    tonic_prost_build::configure()
        .extern_path(".build.bazel.remote.execution.v2", "::bazel_remote_apis::build::bazel::remote::execution::v2")
        .compile_fds(descriptors)?;
    Ok(())
}
