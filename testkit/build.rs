fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    config.bytes(["."]);
    tonic_prost_build::configure().compile_with_config(
        config,
        &["proto/echo.proto", "proto/nodes.proto"],
        &["proto"],
    )?;
    Ok(())
}
