//! A small client of Kubernetes' Container Runtime Interface (CRI,
//! `runtime.v1`) for tests: kubelet's path into containerd, without kubelet
//! or crictl (neither is in Debian bookworm).
//!
//! [`proto`] is generated from `proto/cri.proto`, our restatement of the part
//! of cri-api's `api.proto` used here (same message names, field numbers
//! and types). [`Cri`] talks to containerd's CRI plugin, which serves on
//! containerd's main gRPC socket, and is blocking: it owns a single-threaded
//! tokio runtime, so call it from ordinary (non-async) tests only. Pods it
//! ran and did not remove are stopped and removed when it is dropped (drop
//! it before the [`crate::containerd::Containerd`] it talks to).
//!
//! Also here: [`host_network_pod`] and [`container_config`] (minimal
//! configurations, as kubelet would send for a host-network pod),
//! [`read_log`] (the CRI container log format), and [`sandbox_image`] (a
//! pod sandbox image built from Debian's static busybox, to set as the CRI
//! plugin's `sandbox_image`).

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use lazypull_containerd_api::unix::UnixConnector;
use serde_json::json;
use tonic::transport::{Channel, Endpoint};

use crate::oci_image::{Image, LayerBuilder};

/// The generated messages and clients (package `runtime.v1`).
#[allow(missing_docs, clippy::all)]
pub mod proto {
    tonic::include_proto!("runtime.v1");
}

use proto::image_service_client::ImageServiceClient;
use proto::runtime_service_client::RuntimeServiceClient;

/// The CRI API version this client speaks (`VersionRequest.version`).
pub const API_VERSION: &str = "v1";

/// How long a single CRI call may take (PullImage included).
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// A gRPC failure of CRI method `what` as an I/O error naming the method,
/// the gRPC code and containerd's message.
fn status_error(what: &str, s: tonic::Status) -> io::Error {
    let kind = match s.code() {
        tonic::Code::NotFound => io::ErrorKind::NotFound,
        tonic::Code::AlreadyExists => io::ErrorKind::AlreadyExists,
        tonic::Code::InvalidArgument => io::ErrorKind::InvalidInput,
        tonic::Code::DeadlineExceeded => io::ErrorKind::TimedOut,
        tonic::Code::PermissionDenied => io::ErrorKind::PermissionDenied,
        tonic::Code::Unavailable => io::ErrorKind::ConnectionRefused,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(
        kind,
        format!("CRI {what} failed: {:?}: {}", s.code(), s.message()),
    )
}

/// A connection to a CRI runtime (containerd's CRI plugin).
pub struct Cri {
    rt: tokio::runtime::Runtime,
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
    socket: PathBuf,
    /// Pods run through this client and not yet removed.
    pods: Vec<String>,
}

impl Cri {
    /// Connects to `socket` (containerd's gRPC socket) and waits, up to
    /// 30 s, until the CRI plugin answers `Version` (it refuses calls while
    /// it initializes). A containerd without the CRI plugin is an error
    /// saying so.
    pub fn connect(socket: &Path) -> io::Result<Cri> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let channel = rt.block_on(
            Endpoint::from_static("http://localhost")
                .timeout(CALL_TIMEOUT)
                .connect_with_connector(UnixConnector::new(socket.to_path_buf())),
        );
        let channel = channel.map_err(|e| {
            io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!("cannot connect to CRI at {}: {e}", socket.display()),
            )
        })?;
        let cri = Cri {
            rt,
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
            socket: socket.to_path_buf(),
            pods: Vec::new(),
        };
        let start = Instant::now();
        loop {
            let mut client = cri.runtime.clone();
            let answer = cri.rt.block_on(client.version(proto::VersionRequest {
                version: API_VERSION.into(),
            }));
            match answer {
                Ok(_) => return Ok(cri),
                Err(s) if s.code() == tonic::Code::Unimplemented => {
                    return Err(io::Error::new(
                        io::ErrorKind::Unsupported,
                        format!(
                            "{} serves no CRI runtime.v1 API (is containerd's CRI plugin \
                             io.containerd.grpc.v1.cri disabled?): {}",
                            socket.display(),
                            s.message()
                        ),
                    ));
                }
                Err(s) if start.elapsed() > Duration::from_secs(30) => {
                    return Err(status_error("Version (for 30 s)", s));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// The socket this client talks to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `Version`: the runtime's name and versions.
    pub fn version(&mut self) -> io::Result<proto::VersionResponse> {
        let mut c = self.runtime.clone();
        let r = self.rt.block_on(c.version(proto::VersionRequest {
            version: API_VERSION.into(),
        }));
        Ok(r.map_err(|s| status_error("Version", s))?.into_inner())
    }

    /// `PullImage` of `image` (no credentials, no pod): the image id
    /// (`image_ref`) the runtime answers.
    pub fn pull_image(&mut self, image: &str) -> io::Result<String> {
        self.pull(image, None)
    }

    /// `PullImage` of `image` with the credentials kubelet would send for
    /// it (`AuthConfig.username` / `.password`).
    pub fn pull_image_with_auth(
        &mut self,
        image: &str,
        username: &str,
        password: &str,
    ) -> io::Result<String> {
        self.pull(
            image,
            Some(proto::AuthConfig {
                username: username.into(),
                password: password.into(),
                ..Default::default()
            }),
        )
    }

    fn pull(&mut self, image: &str, auth: Option<proto::AuthConfig>) -> io::Result<String> {
        let mut c = self.images.clone();
        let r = self.rt.block_on(c.pull_image(proto::PullImageRequest {
            image: Some(image_spec(image)),
            auth,
            sandbox_config: None,
        }));
        let id = r
            .map_err(|s| status_error(&format!("PullImage {image}"), s))?
            .into_inner()
            .image_ref;
        if id.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("CRI PullImage {image} answered an empty image_ref"),
            ));
        }
        Ok(id)
    }

    /// `ImageStatus` of `image`: `None` if the runtime does not have it.
    pub fn image_status(&mut self, image: &str) -> io::Result<Option<proto::Image>> {
        let mut c = self.images.clone();
        let r = self.rt.block_on(c.image_status(proto::ImageStatusRequest {
            image: Some(image_spec(image)),
            verbose: false,
        }));
        Ok(
            r.map_err(|s| status_error(&format!("ImageStatus {image}"), s))?
                .into_inner()
                .image,
        )
    }

    /// `RemoveImage` of `image` (by reference or id).
    pub fn remove_image(&mut self, image: &str) -> io::Result<()> {
        let mut c = self.images.clone();
        let r = self.rt.block_on(c.remove_image(proto::RemoveImageRequest {
            image: Some(image_spec(image)),
        }));
        r.map_err(|s| status_error(&format!("RemoveImage {image}"), s))?;
        Ok(())
    }

    /// `ImageFsInfo`: the image file systems and their usage.
    pub fn image_fs_info(&mut self) -> io::Result<Vec<proto::FilesystemUsage>> {
        let mut c = self.images.clone();
        let r = self
            .rt
            .block_on(c.image_fs_info(proto::ImageFsInfoRequest {}));
        Ok(r.map_err(|s| status_error("ImageFsInfo", s))?
            .into_inner()
            .image_filesystems)
    }

    /// `RunPodSandbox` with `config` (default runtime handler): the pod id.
    pub fn run_pod(&mut self, config: &proto::PodSandboxConfig) -> io::Result<String> {
        let name = config
            .metadata
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_default();
        let mut c = self.runtime.clone();
        let r = self
            .rt
            .block_on(c.run_pod_sandbox(proto::RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: String::new(),
            }));
        let id = r
            .map_err(|s| status_error(&format!("RunPodSandbox {name}"), s))?
            .into_inner()
            .pod_sandbox_id;
        self.pods.push(id.clone());
        Ok(id)
    }

    /// `PodSandboxStatus` of pod `id`.
    pub fn pod_status(&mut self, id: &str) -> io::Result<proto::PodSandboxStatus> {
        let mut c = self.runtime.clone();
        let r = self
            .rt
            .block_on(c.pod_sandbox_status(proto::PodSandboxStatusRequest {
                pod_sandbox_id: id.into(),
                verbose: false,
            }));
        r.map_err(|s| status_error(&format!("PodSandboxStatus {id}"), s))?
            .into_inner()
            .status
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("CRI PodSandboxStatus {id} answered no status"),
                )
            })
    }

    /// `StopPodSandbox` of pod `id` (its containers too).
    pub fn stop_pod(&mut self, id: &str) -> io::Result<()> {
        let mut c = self.runtime.clone();
        let r = self
            .rt
            .block_on(c.stop_pod_sandbox(proto::StopPodSandboxRequest {
                pod_sandbox_id: id.into(),
            }));
        r.map_err(|s| status_error(&format!("StopPodSandbox {id}"), s))?;
        Ok(())
    }

    /// `RemovePodSandbox` of pod `id` (its containers too).
    pub fn remove_pod(&mut self, id: &str) -> io::Result<()> {
        let mut c = self.runtime.clone();
        let r = self
            .rt
            .block_on(c.remove_pod_sandbox(proto::RemovePodSandboxRequest {
                pod_sandbox_id: id.into(),
            }));
        r.map_err(|s| status_error(&format!("RemovePodSandbox {id}"), s))?;
        self.pods.retain(|p| p != id);
        Ok(())
    }

    /// `CreateContainer` in pod `pod` (run with `pod_config`): the
    /// container id.
    pub fn create_container(
        &mut self,
        pod: &str,
        config: &proto::ContainerConfig,
        pod_config: &proto::PodSandboxConfig,
    ) -> io::Result<String> {
        let name = config
            .metadata
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_default();
        let mut c = self.runtime.clone();
        let r = self
            .rt
            .block_on(c.create_container(proto::CreateContainerRequest {
                pod_sandbox_id: pod.into(),
                config: Some(config.clone()),
                sandbox_config: Some(pod_config.clone()),
            }));
        Ok(
            r.map_err(|s| status_error(&format!("CreateContainer {name} in pod {pod}"), s))?
                .into_inner()
                .container_id,
        )
    }

    /// `StartContainer` of container `id`.
    pub fn start_container(&mut self, id: &str) -> io::Result<()> {
        let mut c = self.runtime.clone();
        let r = self
            .rt
            .block_on(c.start_container(proto::StartContainerRequest {
                container_id: id.into(),
            }));
        r.map_err(|s| status_error(&format!("StartContainer {id}"), s))?;
        Ok(())
    }

    /// [`create_container`](Self::create_container) then
    /// [`start_container`](Self::start_container): the container id.
    pub fn create_and_start(
        &mut self,
        pod: &str,
        config: &proto::ContainerConfig,
        pod_config: &proto::PodSandboxConfig,
    ) -> io::Result<String> {
        let id = self.create_container(pod, config, pod_config)?;
        self.start_container(&id)?;
        Ok(id)
    }

    /// `ContainerStatus` of container `id`.
    pub fn container_status(&mut self, id: &str) -> io::Result<proto::ContainerStatus> {
        let mut c = self.runtime.clone();
        let r = self
            .rt
            .block_on(c.container_status(proto::ContainerStatusRequest {
                container_id: id.into(),
                verbose: false,
            }));
        r.map_err(|s| status_error(&format!("ContainerStatus {id}"), s))?
            .into_inner()
            .status
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("CRI ContainerStatus {id} answered no status"),
                )
            })
    }

    /// `ExecSync`: runs `cmd` in running container `id` (a process of its
    /// own in the container, as `kubectl exec` does), at most `timeout_s`
    /// seconds: (exit code, stdout, stderr).
    pub fn exec_sync(
        &mut self,
        id: &str,
        cmd: &[&str],
        timeout_s: i64,
    ) -> io::Result<(i32, Vec<u8>, Vec<u8>)> {
        let mut c = self.runtime.clone();
        let r = self.rt.block_on(c.exec_sync(proto::ExecSyncRequest {
            container_id: id.into(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: timeout_s,
        }));
        let r = r
            .map_err(|s| status_error(&format!("ExecSync {id} {cmd:?}"), s))?
            .into_inner();
        Ok((r.exit_code, r.stdout, r.stderr))
    }

    /// Polls [`container_status`](Self::container_status) until container
    /// `id` has exited: its exit code. Not exited within `limit`: a
    /// `TimedOut` error with its last state.
    pub fn wait_exit(&mut self, id: &str, limit: Duration) -> io::Result<i32> {
        let start = Instant::now();
        loop {
            let status = self.container_status(id)?;
            if status.state == proto::ContainerState::ContainerExited as i32 {
                return Ok(status.exit_code);
            }
            if start.elapsed() > limit {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "container {id} did not exit within {limit:?}: state {:?}, reason {:?}, \
                         message {:?}",
                        proto::ContainerState::try_from(status.state),
                        status.reason,
                        status.message
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `StopContainer` of container `id`, SIGKILL after `timeout_s` seconds.
    pub fn stop_container(&mut self, id: &str, timeout_s: i64) -> io::Result<()> {
        let mut c = self.runtime.clone();
        let r = self
            .rt
            .block_on(c.stop_container(proto::StopContainerRequest {
                container_id: id.into(),
                timeout: timeout_s,
            }));
        r.map_err(|s| status_error(&format!("StopContainer {id}"), s))?;
        Ok(())
    }

    /// `RemoveContainer` of container `id`.
    pub fn remove_container(&mut self, id: &str) -> io::Result<()> {
        let mut c = self.runtime.clone();
        let r = self
            .rt
            .block_on(c.remove_container(proto::RemoveContainerRequest {
                container_id: id.into(),
            }));
        r.map_err(|s| status_error(&format!("RemoveContainer {id}"), s))?;
        Ok(())
    }

    /// `ListContainers`, of pod `pod` if given.
    pub fn list_containers(&mut self, pod: Option<&str>) -> io::Result<Vec<proto::Container>> {
        let mut c = self.runtime.clone();
        let filter = pod.map(|p| proto::ContainerFilter {
            pod_sandbox_id: p.into(),
            ..Default::default()
        });
        let r = self
            .rt
            .block_on(c.list_containers(proto::ListContainersRequest { filter }));
        Ok(r.map_err(|s| status_error("ListContainers", s))?
            .into_inner()
            .containers)
    }
}

impl Drop for Cri {
    fn drop(&mut self) {
        for pod in std::mem::take(&mut self.pods) {
            let _ = self.stop_pod(&pod);
            let _ = self.remove_pod(&pod);
        }
    }
}

fn image_spec(image: &str) -> proto::ImageSpec {
    proto::ImageSpec {
        image: image.into(),
        annotations: Default::default(),
    }
}

/// A minimal pod as kubelet would ask for a `hostNetwork: true` pod: named
/// `name` in Kubernetes namespace `default`, the host's network (so no CNI
/// is needed), its own PID namespace per container, a pod IPC namespace,
/// container logs under `log_directory` (an absolute host path), and cgroups
/// under `cgroup_parent` (cgroupfs syntax, e.g. `/lazypull-test`).
pub fn host_network_pod(
    name: &str,
    log_directory: &Path,
    cgroup_parent: &str,
) -> proto::PodSandboxConfig {
    proto::PodSandboxConfig {
        metadata: Some(proto::PodSandboxMetadata {
            name: name.into(),
            uid: format!("{name}-uid"),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: String::new(),
        log_directory: log_directory.to_string_lossy().into_owned(),
        labels: Default::default(),
        annotations: Default::default(),
        linux: Some(proto::LinuxPodSandboxConfig {
            cgroup_parent: cgroup_parent.into(),
            security_context: Some(proto::LinuxSandboxSecurityContext {
                namespace_options: Some(host_network_namespaces()),
                run_as_user: None,
                readonly_rootfs: false,
                privileged: false,
            }),
            sysctls: Default::default(),
        }),
    }
}

fn host_network_namespaces() -> proto::NamespaceOption {
    proto::NamespaceOption {
        network: proto::NamespaceMode::Node as i32,
        pid: proto::NamespaceMode::Container as i32,
        ipc: proto::NamespaceMode::Pod as i32,
        target_id: String::new(),
    }
}

/// A container `name` of `image` (reference or id) for a pod made by
/// [`host_network_pod`]: `command` replaces the image's entrypoint and
/// command unless empty; its log goes to `log_path`, relative to the pod's
/// log directory.
pub fn container_config(
    name: &str,
    image: &str,
    command: &[&str],
    log_path: &str,
) -> proto::ContainerConfig {
    proto::ContainerConfig {
        metadata: Some(proto::ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(image_spec(image)),
        command: command.iter().map(|s| s.to_string()).collect(),
        log_path: log_path.into(),
        linux: Some(proto::LinuxContainerConfig {
            security_context: Some(proto::LinuxContainerSecurityContext {
                namespace_options: Some(host_network_namespaces()),
                ..Default::default()
            }),
        }),
        ..Default::default()
    }
}

/// One line of a CRI container log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// The runtime's RFC 3339 timestamp of the line (of its first part).
    pub time: String,
    /// `stdout` or `stderr`.
    pub stream: String,
    /// The line, without its newline; partial (`P`) records joined.
    pub text: String,
}

/// Parses a CRI container log: one record per line,
/// `<RFC 3339 time> <stdout|stderr> <F|P> <content>`, where `P` marks a
/// partial line continued by the next record of that stream and `F` ends
/// it. A malformed record is an `InvalidData` error naming it; a partial
/// line never finished is returned as it is.
pub fn parse_log(text: &str) -> io::Result<Vec<LogLine>> {
    let mut out = Vec::new();
    let mut pending: Vec<LogLine> = Vec::new();
    for (n, record) in text.lines().enumerate() {
        let bad = || {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("CRI log record {} is malformed: {record:?}", n + 1),
            )
        };
        let mut parts = record.splitn(4, ' ');
        let (Some(time), Some(stream), Some(tag)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let content = parts.next().unwrap_or("");
        if time.is_empty() || !matches!(stream, "stdout" | "stderr") {
            return Err(bad());
        }
        let partial = match tag.split(':').next() {
            Some("F") => false,
            Some("P") => true,
            _ => return Err(bad()),
        };
        let mut line = match pending.iter().position(|l| l.stream == stream) {
            Some(i) => pending.remove(i),
            None => LogLine {
                time: time.into(),
                stream: stream.into(),
                text: String::new(),
            },
        };
        line.text.push_str(content);
        if partial {
            pending.push(line);
        } else {
            out.push(line);
        }
    }
    out.extend(pending);
    Ok(out)
}

/// Reads and parses ([`parse_log`]) the CRI container log at `path`.
pub fn read_log(path: &Path) -> io::Result<Vec<LogLine>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot read container log {}: {e}", path.display()),
        )
    })?;
    parse_log(&text)
}

/// The shell loop [`sandbox_image`] runs: sleeps until SIGTERM, then exits 0.
pub const SANDBOX_SCRIPT: &str = "trap 'exit 0' TERM; while :; do sleep 1; done";

/// A pod sandbox ("pause") image: Debian's static busybox (`/bin/busybox`,
/// from `busybox-static`) running [`SANDBOX_SCRIPT`] as its entrypoint.
pub fn sandbox_image() -> io::Result<Image> {
    let busybox = std::fs::read("/bin/busybox").map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot read /bin/busybox (apt-get install busybox-static): {e}"),
        )
    })?;
    let layer = LayerBuilder::new()
        .dir("bin", 0o755)?
        .file("bin/busybox", &busybox, 0o755)?
        .symlink("bin/sh", "busybox")?
        .symlink("bin/sleep", "busybox")?
        .dir("dev", 0o755)?
        .dir("proc", 0o555)?
        .dir("sys", 0o555)?
        .finish()?;
    Image::new(
        vec![layer],
        json!({
            "Env": ["PATH=/bin"],
            "Entrypoint": ["/bin/sh", "-c", SANDBOX_SCRIPT],
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn log_records_are_joined_and_checked() {
        let text = "2026-01-01T00:00:00.1Z stdout F hello world\n\
                    2026-01-01T00:00:00.2Z stderr P par\n\
                    2026-01-01T00:00:00.3Z stdout F \n\
                    2026-01-01T00:00:00.4Z stderr F tial\n";
        let lines = parse_log(text).unwrap();
        let texts: Vec<(&str, &str)> = lines
            .iter()
            .map(|l| (l.stream.as_str(), l.text.as_str()))
            .collect();
        assert_eq!(
            texts,
            [
                ("stdout", "hello world"),
                ("stdout", ""),
                ("stderr", "partial")
            ]
        );
        assert_eq!(lines[2].time, "2026-01-01T00:00:00.2Z");
        for bad in ["garbage", "t stdout X x", "t stdin F x", " stdout F x"] {
            let e = parse_log(bad).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{bad}");
            assert!(e.to_string().contains("record 1"), "{e}");
        }
    }

    /// Field numbers as in cri-api's api.proto: the bytes of a few fields
    /// (tag = field number << 3 | wire type).
    #[test]
    fn wire_encoding_matches_cri_api_field_numbers() {
        let c = proto::ContainerConfig {
            log_path: "l".into(),
            tty: true,
            ..Default::default()
        };
        // log_path = 11 (length-delimited: 0x5a), tty = 14 (varint: 0x70).
        assert_eq!(c.encode_to_vec(), [0x5a, 1, b'l', 0x70, 1]);
        let s = proto::ContainerStatus {
            exit_code: 3,
            log_path: "p".into(),
            ..Default::default()
        };
        // exit_code = 7 (0x38), log_path = 15 (0x7a).
        assert_eq!(s.encode_to_vec(), [0x38, 3, 0x7a, 1, b'p']);
        let p = proto::PodSandboxConfig {
            log_directory: "d".into(),
            linux: Some(proto::LinuxPodSandboxConfig {
                cgroup_parent: "c".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        // log_directory = 3 (0x1a), linux = 8 (0x42) { cgroup_parent = 1 }.
        assert_eq!(p.encode_to_vec(), [0x1a, 1, b'd', 0x42, 3, 0x0a, 1, b'c']);
    }

    #[test]
    fn host_network_pod_uses_the_node_network() {
        let pod = host_network_pod("p", Path::new("/tmp/logs"), "/lp");
        let ns = pod
            .linux
            .as_ref()
            .and_then(|l| l.security_context.as_ref())
            .and_then(|s| s.namespace_options.as_ref())
            .unwrap();
        assert_eq!(ns.network, proto::NamespaceMode::Node as i32);
        assert_eq!(pod.log_directory, "/tmp/logs");
        let c = container_config("c", "img", &[], "c.log");
        assert!(c.command.is_empty());
        assert_eq!(c.image.unwrap().image, "img");
    }
}
