//! Our restatement of containerd's gRPC API (containerd 1.6) and the Rust
//! code generated from it.
//!
//! It owns:
//! * `proto/*.proto`: containerd's wire contract restated (same package,
//!   service, message and enum names, field numbers and types; none of the
//!   gogo options, which only shape containerd's Go code): the snapshots
//!   service and `Mount` (which containerd speaks to a proxy snapshotter),
//!   and the content, images and leases services with `Descriptor` (which a
//!   client such as `lazypull pull` speaks to containerd);
//! * the prost messages and the tonic clients and servers generated from
//!   them by `build.rs` (protox, so no `protoc` is needed).
//!
//! It must not hold logic: no retrying, no interpretation of labels. The
//! one exception is [`unix::UnixConnector`], the single transport helper it
//! holds (dialling a unix socket for tonic), shared by lazypull's containerd
//! client and the tests of the snapshotter and lazypull. The snapshotter
//! (crates/snapshotter) serves the snapshots server from here; containerd's
//! client lives in crates/lazypull.
//!
//! The module tree mirrors the proto packages, e.g.
//! [`containerd::services::content::v1::content_client::ContentClient`].
#![allow(missing_docs, clippy::all, clippy::pedantic)]

pub mod unix;

/// The `containerd.*` proto packages.
pub mod containerd {
    /// `containerd.types`: `Mount`, `Descriptor`.
    pub mod types {
        tonic::include_proto!("containerd.types");
    }
    /// `containerd.services.*`.
    pub mod services {
        /// `containerd.services.snapshots.v1`.
        pub mod snapshots {
            pub mod v1 {
                tonic::include_proto!("containerd.services.snapshots.v1");
            }
        }
        /// `containerd.services.content.v1`.
        pub mod content {
            pub mod v1 {
                tonic::include_proto!("containerd.services.content.v1");
            }
        }
        /// `containerd.services.images.v1`.
        pub mod images {
            pub mod v1 {
                tonic::include_proto!("containerd.services.images.v1");
            }
        }
        /// `containerd.services.leases.v1`.
        pub mod leases {
            pub mod v1 {
                tonic::include_proto!("containerd.services.leases.v1");
            }
        }
    }
}
