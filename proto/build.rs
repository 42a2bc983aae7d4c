//! Compiles `worker.proto`, `graph.proto` and `cc.proto` with protox (a pure-Rust protobuf compiler), so the
//! build needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=worker.proto");
    println!("cargo:rerun-if-changed=graph.proto");
    println!("cargo:rerun-if-changed=cc.proto");
    let descriptors = protox::compile(["worker.proto", "graph.proto", "cc.proto"], ["."])?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}
