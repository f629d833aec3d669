//! Compiles the .proto files with a vendored protoc, so building podgpu needs
//! no system protobuf compiler.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    tonic_build::configure().build_server(true).build_client(true).compile_protos(
        &["proto/externalscaler.proto", "proto/podgpu.proto", "proto/podresources.proto"],
        &["proto"],
    )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
