//! Rust types and the tonic service of proto/*.proto (containerd's wire contract).
#![allow(missing_docs, clippy::all, clippy::pedantic)]

pub mod containerd {
    pub mod types {
        tonic::include_proto!("containerd.types");
    }
    pub mod services {
        pub mod snapshots {
            pub mod v1 {
                tonic::include_proto!("containerd.services.snapshots.v1");
            }
        }
    }
}
