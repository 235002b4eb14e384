//! containerd's wire contract (types and the tonic service of the snapshots
//! API), which lives in crates/containerd-api; re-exported here under the
//! paths this crate's code uses.

pub use lazypull_containerd_api::containerd;
