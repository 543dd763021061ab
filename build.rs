//! Compiles `proto/crm/v1/*.proto` with protox (pure Rust, so no system `protoc` is needed) and
//! writes the descriptor set next to the generated code for gRPC reflection.

use std::{env, path::PathBuf};

const PROTOS: &[&str] = &[
    "proto/crm/v1/common.proto",
    "proto/crm/v1/application.proto",
    "proto/crm/v1/auth.proto",
    "proto/crm/v1/payment.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);

    let mut compiler = protox::Compiler::new(["proto"])?;
    compiler.include_source_info(true).include_imports(true);
    for proto in PROTOS {
        compiler.open_file(proto)?;
    }
    std::fs::write(
        out_dir.join("crm_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;

    tonic_prost_build::configure()
        // Ordered maps encode deterministically: a replayed idempotent answer is byte-identical.
        .btree_map(".")
        .build_client(true)
        .build_server(true)
        .compile_fds(compiler.file_descriptor_set())?;
    Ok(())
}
