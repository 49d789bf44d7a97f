//! Generates the API's messages and stubs from `proto/`. The protos are parsed by `protox`
//! (pure Rust), so the build needs no `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/malla/registry/v1/registry.proto",
        "proto/malla/policy/v1/policy.proto",
        "proto/malla/identity/v1/identity.proto",
        "proto/malla/authz/v1/authz.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // The stubs stay generic over the transport: the control plane brings tonic's
        // server, the sidecar its channel, and this crate needs neither.
        .build_transport(false)
        .compile_fds(fds)?;
    Ok(())
}
