//! A real OCI registry for tests: Debian's `docker-registry` (CNCF
//! distribution) started on 127.0.0.1 with its storage in a directory, with
//! or without htpasswd authentication, optionally over TLS (with client
//! certificates required) or as a pull-through cache of another registry
//! ([`RegistryOptions`]), stopped when dropped.
//!
//! A missing binary is an error that says how to install it: tests using this
//! fail loudly rather than skip.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `docker-registry`.
pub struct RegistryServer {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
    tls: bool,
}

/// How a [`RegistryServer`] is set up beyond storage and address.
#[derive(Clone, Debug, Default)]
pub struct RegistryOptions<'a> {
    /// Every request needs this user and password (htpasswd, bcrypt).
    pub auth: Option<(&'a str, &'a str)>,
    /// Serve HTTPS with this certificate and key (PEM files).
    pub tls: Option<(&'a Path, &'a Path)>,
    /// With `tls`: require a client certificate signed by this CA (PEM).
    pub client_ca: Option<&'a Path>,
    /// Be a pull-through cache (`proxy: remoteurl:`) of this registry
    /// (`http://127.0.0.1:PORT`): read-only, blobs fetched from there on
    /// first request and kept.
    pub proxy_remote: Option<&'a str>,
}

fn find(binary: &str, package: &str) -> io::Result<PathBuf> {
    for dir in ["/usr/bin", "/usr/sbin", "/usr/local/bin"] {
        let p = Path::new(dir).join(binary);
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!("{binary} is not installed: run scripts/setup.sh (apt-get install {package})"),
    ))
}

impl RegistryServer {
    /// Starts a registry storing its data under `dir`, on a free port of
    /// 127.0.0.1; with `auth`, every request needs that user and password
    /// (htpasswd, bcrypt).
    pub fn start(dir: &Path, auth: Option<(&str, &str)>) -> io::Result<RegistryServer> {
        RegistryServer::start_with(
            dir,
            &RegistryOptions {
                auth,
                ..RegistryOptions::default()
            },
        )
    }

    /// Starts a registry as `opts` says, storing its data under `dir`, on
    /// a free port of 127.0.0.1.
    pub fn start_with(dir: &Path, opts: &RegistryOptions<'_>) -> io::Result<RegistryServer> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        Self::start_at(dir, opts, ([127, 0, 0, 1], port).into(), None)
    }

    /// Starts a registry without authentication inside network namespace
    /// `netns`, listening on its end of the veth pair, port `port`.
    pub fn start_in(
        dir: &Path,
        netns: &crate::netns::Netns,
        port: u16,
    ) -> io::Result<RegistryServer> {
        Self::start_at(
            dir,
            &RegistryOptions::default(),
            (netns.ns_addr(), port).into(),
            Some(netns),
        )
    }

    fn start_at(
        dir: &Path,
        opts: &RegistryOptions<'_>,
        addr: SocketAddr,
        netns: Option<&crate::netns::Netns>,
    ) -> io::Result<RegistryServer> {
        let auth = opts.auth;
        let binary = find("docker-registry", "docker-registry")?;
        std::fs::create_dir_all(dir.join("data"))?;
        let mut config = format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
            dir.join("data").display()
        );
        if let Some((user, password)) = auth {
            let htpasswd = dir.join("htpasswd");
            let status = Command::new(find("htpasswd", "apache2-utils")?)
                .arg("-Bbc")
                .arg(&htpasswd)
                .args([user, password])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()?;
            if !status.success() {
                return Err(io::Error::other(format!("htpasswd failed: {status}")));
            }
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: lazypull-test\n    path: {}\n",
                htpasswd.display()
            ));
        }
        if let Some((cert, key)) = opts.tls {
            config.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                cert.display(),
                key.display()
            ));
            if let Some(ca) = opts.client_ca {
                config.push_str(&format!("    clientcas:\n      - {}\n", ca.display()));
            }
        } else if opts.client_ca.is_some() {
            return Err(io::Error::other("client_ca needs tls"));
        }
        if let Some(remote) = opts.proxy_remote {
            config.push_str(&format!("proxy:\n  remoteurl: {remote}\n"));
        }
        let config_path = dir.join("config.yml");
        std::fs::write(&config_path, config)?;
        let log = dir.join("registry.log");
        let mut command = match netns {
            Some(ns) => ns.command(binary),
            None => Command::new(binary),
        };
        let child = command
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.join("registry.stdout"))?)
            .stderr(std::fs::File::create(&log)?)
            .spawn()?;
        // Servers kept in a test's static fixture are never dropped: a watchdog
        // ends the registry when this process ends, whichever way it ends.
        Command::new("sh")
            .args([
                "-c",
                "while kill -0 \"$0\" 2>/dev/null; do sleep 1; done; kill \"$1\" 2>/dev/null",
            ])
            .arg(std::process::id().to_string())
            .arg(child.id().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let mut server = RegistryServer {
            child,
            addr,
            log,
            tls: opts.tls.is_some(),
        };
        server.wait_ready(Duration::from_secs(20))?;
        Ok(server)
    }

    fn wait_ready(&mut self, limit: Duration) -> io::Result<()> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(status) = self.child.try_wait()? {
                return Err(io::Error::other(format!(
                    "docker-registry exited with {status} during start: {}",
                    tail(&self.log)
                )));
            }
            if self.tls {
                // No TLS client here: a listening socket and a live
                // process are ready enough (the server listens last).
                if TcpStream::connect_timeout(&self.addr, Duration::from_secs(1)).is_ok() {
                    return Ok(());
                }
            } else if let Ok(status) = get_status(self.addr, "/v2/") {
                if status == 200 || status == 401 {
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "docker-registry did not answer within {limit:?}: {}",
                tail(&self.log)
            ),
        ))
    }

    /// `127.0.0.1:<port>` (or the namespace's address, [`start_in`](Self::start_in)).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The registry's own log (stderr: request and access lines).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// `127.0.0.1:<port>`, as a registry name in references.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// The requests it answered so far: `(method, path with query,
    /// status)` of each "response completed" line of its log.
    pub fn access_log(&self) -> Vec<(String, String, u16)> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines()
            .filter(|l| l.contains("msg=\"response completed\""))
            .filter_map(|l| {
                let method = log_field(l, "http.request.method")?;
                let uri = log_field(l, "http.request.uri")?;
                let status = log_field(l, "http.response.status")?.parse().ok()?;
                Some((method, uri, status))
            })
            .collect()
    }

    /// Ends the registry now (as if it crashed); its log stays readable.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RegistryServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of `key=value` or `key="value"` in a logrus line.
fn log_field(line: &str, key: &str) -> Option<String> {
    let at = line.find(&format!(" {key}="))? + key.len() + 2;
    let rest = &line[at..];
    if let Some(q) = rest.strip_prefix('"') {
        Some(q[..q.find('"')?].to_string())
    } else {
        Some(rest.split_whitespace().next()?.to_string())
    }
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join("\n")
}

/// Status code of a plain `GET path` (HTTP/1.0, no keep-alive).
pub fn get_status(addr: SocketAddr, path: &str) -> io::Result<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head)?;
    let text = String::from_utf8_lossy(&head);
    text.get(9..12).and_then(|c| c.parse().ok()).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad status line {text:?}"),
        )
    })
}
