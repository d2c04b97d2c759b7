//! Compiles the wire contract without a system `protoc`: protox parses the
//! .proto files, tonic-prost-build generates code from the descriptor set,
//! and the same descriptor set is written out for server reflection.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/minitoolstream.proto"];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("minitoolstream_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        // Payloads stay zero-copy from the gRPC frame to the S3 body.
        .bytes(".minitoolstream")
        // A request that cannot be decoded is the client's mistake.
        .codec_path("crate::codec::ProtoCodec")
        .compile_fds(descriptors)?;
    Ok(())
}
