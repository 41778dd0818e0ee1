//! Compiles `shunt/**/*.proto` with protox, a pure-Rust protobuf compiler, so building needs no
//! `protoc` on the machine.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["shunt/sapi/v1/sapi.proto", "shunt/control/v1/control.proto"];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["."])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .out_dir(&out_dir)
        .compile_fds(descriptors)?;
    Ok(())
}
