//! Compiles `worker.proto` and `graph.proto` with protox (a pure-Rust protobuf compiler), so the
//! build needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=worker.proto");
    println!("cargo:rerun-if-changed=graph.proto");
    let descriptors = protox::compile(["worker.proto", "graph.proto"], ["."])?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}
