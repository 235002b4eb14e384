//! Compiles proto/cri.proto (our restatement of the part of Kubernetes' CRI
//! the tests use) into a tonic client with the pure-Rust `protox` compiler:
//! no `protoc` on the build machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/cri.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_build::configure()
        .build_client(true)
        .build_server(false)
        .compile_fds(fds)?;
    Ok(())
}
