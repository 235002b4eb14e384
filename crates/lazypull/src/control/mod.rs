//! The daemon's control socket, as its clients and the daemon share it: the
//! protocol's types ([`protocol`]) and the blocking client ([`client`]). The
//! daemon's side (accept loop, request dispatch) is `daemon::control_server`.

pub(crate) mod client;
pub(crate) mod protocol;

pub(crate) use client::{call, wait_for_exit};
pub(crate) use protocol::{
    KubeletCredentialsRequest, MountPlan, PrefetchSpec, RegisterRequest, Registered, Reply,
    Request, DEFAULT_SOCKET,
};
