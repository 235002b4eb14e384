//! Compiles proto/*.proto into Rust with the pure-Rust `protox` compiler (no
//! `protoc` on the build machine) and tonic's code generator, clients and
//! servers both.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/mount.proto",
        "proto/descriptor.proto",
        "proto/snapshots.proto",
        "proto/content.proto",
        "proto/images.proto",
        "proto/leases.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
