//! containerd's registry host configuration: `<certs.d>/<host>/hosts.toml`.
//!
//! A node already says there how it reaches each registry: the mirrors to
//! try first (`[host."URL"]` tables, in file order), what each may be asked
//! (`capabilities`: `pull`, `resolve`, `push`), its TLS (`ca`, `client`,
//! `skip_verify`), extra request headers (`header`), a path of its own
//! (`override_path`), and the upstream itself (`server`, with the top-level
//! keys). lazypull reads the same files, with containerd's semantics
//! (`core/remotes/docker/config/hosts.go`), so the mirror configuration is
//! written once:
//!
//! * the directory of registry `host:port` is the first of
//!   `<certs.d>/host_port_`, `<certs.d>/host:port`, `<certs.d>/_default`
//!   that exists;
//! * a directory without `hosts.toml` is read the docker way: every `*.crt`
//!   is a CA, every `*.cert` a client certificate whose key is the `.key` of
//!   the same name;
//! * a `server` or host URL without a scheme is `https://`; its path gets
//!   `/v2` appended unless it ends in `/v2` or `override_path = true`;
//! * `capabilities` default to all; relative `ca` / `client` paths are
//!   relative to the `hosts.toml`'s directory; `ca` is a path or an array of
//!   paths, `client` a path (certificate and key in one file), an array of
//!   them, or an array of `[cert, key]` pairs; a `header` value is a string
//!   or an array of strings;
//! * the upstream comes last: `server`, or, when the file names none, the
//!   registry itself (Docker Hub: `registry-1.docker.io`), with the
//!   top-level TLS keys either way.
//!
//! One difference: containerd logs a `hosts.toml` it cannot parse and goes
//! on without it; lazypull refuses it with an error naming the file, since
//! going on would silently bypass the mirrors and TLS settings it declares.
//! Keys lazypull does not know are ignored, as containerd ignores them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::RegistryError;

/// What a host may be asked (containerd's `HostCapabilities`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Capabilities {
    /// Blobs, and manifests by digest.
    pub pull: bool,
    /// Manifests by tag.
    pub resolve: bool,
    /// Uploads.
    pub push: bool,
}

impl Capabilities {
    /// Everything (containerd's default when `capabilities` is absent).
    pub const ALL: Capabilities = Capabilities {
        pull: true,
        resolve: true,
        push: true,
    };
}

/// The TLS settings of one host, beyond the client's defaults.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct HostTls {
    /// PEM files of extra trusted roots (`ca`).
    pub ca_files: Vec<PathBuf>,
    /// Client certificates (`client`): the certificate file and its key's
    /// file (None: the key is in the certificate's file).
    pub client_pairs: Vec<(PathBuf, Option<PathBuf>)>,
    /// `skip_verify = true`: the server's certificate is not checked.
    pub skip_verify: bool,
}

impl HostTls {
    /// Whether nothing is set.
    pub fn is_default(&self) -> bool {
        self == &HostTls::default()
    }
}

/// One host of a registry's configuration: a mirror or the upstream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostEntry {
    /// `http` or `https`.
    pub scheme: String,
    /// `host[:port]` (an IPv6 address in brackets).
    pub host: String,
    /// The API's path on it: `/v2`, or with `override_path` whatever was
    /// given (possibly empty).
    pub path: String,
    pub capabilities: Capabilities,
    pub tls: HostTls,
    /// Extra headers for every request to it, in file order.
    pub header: Vec<(String, String)>,
    /// `dial_timeout`, if given.
    pub dial_timeout: Option<Duration>,
}

/// A registry's hosts as configured: where they were read from and the
/// hosts, mirrors first, the upstream last.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostsConfig {
    /// The directory they came from (`<certs.d>/<host>` or `_default`).
    pub dir: PathBuf,
    /// Mirrors in file order, then the upstream (whose `host` is empty when
    /// the file names no `server`: the caller fills in the registry).
    pub hosts: Vec<HostEntry>,
}

/// The directory containerd would read for `registry` (`host[:port]`) under
/// `root`, if any exists.
pub fn host_dir(root: &Path, registry: &str) -> Option<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(idx) = registry.rfind(':') {
        if idx > 0 && !registry.ends_with(']') {
            candidates.push(root.join(format!("{}_{}_", &registry[..idx], &registry[idx + 1..])));
        }
    }
    candidates.push(root.join(registry));
    candidates.push(root.join("_default"));
    candidates.into_iter().find(|p| p.is_dir())
}

/// The configuration of `registry` under the certs.d directory `root`, or
/// None when no directory applies to it.
pub fn load(root: &Path, registry: &str) -> Result<Option<HostsConfig>, RegistryError> {
    let Some(dir) = host_dir(root, registry) else {
        return Ok(None);
    };
    let file = dir.join("hosts.toml");
    let text = match std::fs::read_to_string(&file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => {
            return Err(RegistryError::HostsConfig {
                path: file.display().to_string(),
                why: e.to_string(),
            })
        }
    };
    let hosts = if text.trim().is_empty() {
        cert_files(&dir).map_err(|e| RegistryError::HostsConfig {
            path: dir.display().to_string(),
            why: e.to_string(),
        })?
    } else {
        parse(&dir, &text).map_err(|why| RegistryError::HostsConfig {
            path: file.display().to_string(),
            why,
        })?
    };
    Ok(Some(HostsConfig { dir, hosts }))
}

/// Docker's `certs.d` layout: `*.crt` CAs, `*.cert` + `*.key` client pairs,
/// for the upstream alone.
fn cert_files(dir: &Path) -> std::io::Result<Vec<HostEntry>> {
    let mut tls = HostTls::default();
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| !t.is_dir()))
        .map(|e| e.path())
        .collect();
    names.sort();
    for p in names {
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.ends_with(".crt") {
            tls.ca_files.push(p.clone());
        }
        if let Some(stem) = name.strip_suffix(".cert") {
            let key = dir.join(format!("{stem}.key"));
            tls.client_pairs
                .push((p.clone(), key.exists().then_some(key)));
        }
    }
    Ok(vec![upstream_default(tls)])
}

fn upstream_default(tls: HostTls) -> HostEntry {
    HostEntry {
        scheme: String::new(),
        host: String::new(),
        path: "/v2".into(),
        capabilities: Capabilities::ALL,
        tls,
        header: Vec::new(),
        dial_timeout: None,
    }
}

/// Parses a `hosts.toml` whose directory is `dir`.
pub(crate) fn parse(dir: &Path, text: &str) -> Result<Vec<HostEntry>, String> {
    let doc: toml::Table = text.parse().map_err(|e: toml::de::Error| e.to_string())?;
    let mut hosts = Vec::new();
    if let Some(h) = doc.get("host") {
        // `toml` keeps tables in file order (its `preserve_order` feature):
        // the order mirrors are tried in.
        let table = h
            .as_table()
            .ok_or_else(|| "\"host\" must be a table of [host.\"URL\"] tables".to_string())?;
        for (url, v) in table {
            let t = v
                .as_table()
                .ok_or_else(|| format!("host {url:?} must be a table"))?;
            hosts.push(entry(Some(url), dir, t).map_err(|e| format!("host {url:?}: {e}"))?);
        }
    }
    let server = match doc.get("server") {
        None => None,
        Some(toml::Value::String(s)) if s.is_empty() => None,
        Some(toml::Value::String(s)) => Some(s.as_str()),
        Some(v) => return Err(format!("server must be a string, not {}", v.type_str())),
    };
    hosts.push(entry(server, dir, &doc).map_err(|e| match server {
        Some(s) => format!("server {s:?}: {e}"),
        None => e,
    })?);
    Ok(hosts)
}

fn entry(server: Option<&str>, dir: &Path, t: &toml::Table) -> Result<HostEntry, String> {
    let override_path = match t.get("override_path") {
        None => false,
        Some(toml::Value::Boolean(b)) => *b,
        Some(v) => {
            return Err(format!(
                "override_path must be a boolean, not {}",
                v.type_str()
            ))
        }
    };
    let mut e = upstream_default(HostTls::default());
    if let Some(server) = server {
        let s = if server.starts_with("http") {
            server.to_string()
        } else {
            format!("https://{server}")
        };
        let url = reqwest::Url::parse(&s).map_err(|err| format!("not a URL: {err}"))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!("scheme {:?} is not http or https", url.scheme()));
        }
        let host = url.host_str().ok_or("no host")?;
        e.scheme = url.scheme().to_string();
        e.host = match url.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.to_string(),
        };
        let path = clean_path(url.path());
        e.path = if path.is_empty() {
            if override_path {
                String::new()
            } else {
                "/v2".into()
            }
        } else if path.ends_with("/v2") || override_path {
            path
        } else {
            format!("{path}/v2")
        };
    }
    if let Some(caps) = t.get("capabilities") {
        let list = strings(caps).map_err(|w| format!("capabilities: {w}"))?;
        if !list.is_empty() {
            e.capabilities = Capabilities {
                pull: false,
                resolve: false,
                push: false,
            };
            for c in list {
                match c.to_ascii_lowercase().as_str() {
                    "pull" => e.capabilities.pull = true,
                    "resolve" => e.capabilities.resolve = true,
                    "push" => e.capabilities.push = true,
                    // Known to containerd; nothing lazypull asks for.
                    "referrers" => {}
                    other => return Err(format!("unknown capability {other:?}")),
                }
            }
        }
    }
    let abs = |p: &str| {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            dir.join(p)
        }
    };
    if let Some(ca) = t.get("ca") {
        e.tls.ca_files = strings(ca)
            .map_err(|w| format!("ca: {w}"))?
            .iter()
            .map(|p| abs(p))
            .collect();
    }
    if let Some(client) = t.get("client") {
        let items: Vec<&toml::Value> = match client {
            toml::Value::String(_) => vec![client],
            toml::Value::Array(a) => a.iter().collect(),
            v => return Err(format!("invalid type {} for \"client\"", v.type_str())),
        };
        for item in items {
            match item {
                toml::Value::String(p) => e.tls.client_pairs.push((abs(p), None)),
                toml::Value::Array(_) => {
                    let pair = strings(item).map_err(|w| format!("client: {w}"))?;
                    if pair.len() != 2 {
                        return Err(format!(
                            "client: a pair must be [certificate, key], not {} paths",
                            pair.len()
                        ));
                    }
                    e.tls
                        .client_pairs
                        .push((abs(&pair[0]), Some(abs(&pair[1]))));
                }
                v => return Err(format!("invalid type {} in \"client\"", v.type_str())),
            }
        }
    }
    match t.get("skip_verify") {
        None => {}
        Some(toml::Value::Boolean(b)) => e.tls.skip_verify = *b,
        Some(v) => {
            return Err(format!(
                "skip_verify must be a boolean, not {}",
                v.type_str()
            ))
        }
    }
    if let Some(h) = t.get("header") {
        let h = h
            .as_table()
            .ok_or_else(|| "header must be a table".to_string())?;
        for (k, v) in h {
            for value in strings(v).map_err(|w| format!("header {k:?}: {w}"))? {
                e.header.push((k.clone(), value));
            }
        }
    }
    match t.get("dial_timeout") {
        None => {}
        Some(toml::Value::String(s)) if s.is_empty() => {}
        Some(toml::Value::String(s)) => {
            e.dial_timeout = Some(go_duration(s).ok_or_else(|| {
                format!("dial_timeout {s:?} is not a duration such as \"500ms\" or \"5s\"")
            })?)
        }
        Some(v) => {
            return Err(format!(
                "dial_timeout must be a string, not {}",
                v.type_str()
            ))
        }
    }
    Ok(e)
}

/// A string or an array of strings.
fn strings(v: &toml::Value) -> Result<Vec<String>, String> {
    match v {
        toml::Value::String(s) => Ok(vec![s.clone()]),
        toml::Value::Array(a) => a
            .iter()
            .map(|x| {
                x.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| format!("{} is not a string", x))
            })
            .collect(),
        v => Err(format!(
            "expected a string or an array of strings, not {}",
            v.type_str()
        )),
    }
}

/// Go's `path.Clean` for an URL path, "" staying "".
fn clean_path(p: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for seg in p.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            s => parts.push(s),
        }
    }
    if parts.is_empty() {
        if p.is_empty() || p == "/" {
            String::new()
        } else {
            "/".into()
        }
    } else {
        format!("/{}", parts.join("/"))
    }
}

/// A Go duration of one or more `<number><unit>` terms (`ns`, `us`, `ms`,
/// `s`, `m`, `h`).
fn go_duration(s: &str) -> Option<Duration> {
    let mut rest = s.trim();
    let mut total = Duration::ZERO;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let num_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        let n: f64 = rest[..num_end].parse().ok()?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let secs = match &rest[..unit_end] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_end..];
        total += Duration::try_from_secs_f64(n * secs).ok()?;
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_ok(text: &str) -> Vec<HostEntry> {
        parse(Path::new("/etc/containerd/certs.d/reg.example"), text).unwrap()
    }

    #[test]
    fn mirrors_come_in_file_order_then_the_server() {
        let hosts = parse_ok(
            r#"
server = "https://registry.example:5000"
ca = "upstream-ca.pem"

[host."http://zz-mirror.lan:5001"]
  capabilities = ["pull"]

[host."https://aa-mirror.lan/some/path/"]
  capabilities = ["pull", "resolve"]
  ca = ["/abs/ca.pem", "rel/ca2.pem"]
  client = [["c.pem", "k.pem"], "both.pem"]
  skip_verify = true
  [host."https://aa-mirror.lan/some/path/".header]
    x-one = "1"
    x-many = ["a", "b"]

[host."mid.lan:7000"]
  override_path = true
"#,
        );
        let dir = Path::new("/etc/containerd/certs.d/reg.example");
        let names: Vec<_> = hosts
            .iter()
            .map(|h| format!("{}://{}{}", h.scheme, h.host, h.path))
            .collect();
        assert_eq!(
            names,
            [
                "http://zz-mirror.lan:5001/v2",
                "https://aa-mirror.lan/some/path/v2",
                "https://mid.lan:7000",
                "https://registry.example:5000/v2",
            ]
        );
        assert_eq!(
            hosts[0].capabilities,
            Capabilities {
                pull: true,
                resolve: false,
                push: false
            }
        );
        assert!(hosts[0].tls.is_default());
        let aa = &hosts[1];
        assert!(aa.capabilities.pull && aa.capabilities.resolve && !aa.capabilities.push);
        assert_eq!(
            aa.tls.ca_files,
            [PathBuf::from("/abs/ca.pem"), dir.join("rel/ca2.pem")]
        );
        assert_eq!(
            aa.tls.client_pairs,
            [
                (dir.join("c.pem"), Some(dir.join("k.pem"))),
                (dir.join("both.pem"), None)
            ]
        );
        assert!(aa.tls.skip_verify);
        assert_eq!(
            aa.header,
            [
                ("x-one".to_string(), "1".to_string()),
                ("x-many".into(), "a".into()),
                ("x-many".into(), "b".into())
            ]
        );
        assert_eq!(hosts[2].capabilities, Capabilities::ALL);
        let up = &hosts[3];
        assert_eq!(up.tls.ca_files, [dir.join("upstream-ca.pem")]);
        assert_eq!(up.capabilities, Capabilities::ALL);
    }

    #[test]
    fn without_a_server_the_upstream_is_left_to_the_caller_with_the_top_level_tls() {
        let hosts = parse_ok("ca = \"/x/ca.pem\"\nclient = \"/x/me.pem\"\n");
        assert_eq!(hosts.len(), 1);
        assert_eq!(hosts[0].host, "");
        assert_eq!(hosts[0].path, "/v2");
        assert_eq!(hosts[0].tls.ca_files, [PathBuf::from("/x/ca.pem")]);
        assert_eq!(
            hosts[0].tls.client_pairs,
            [(PathBuf::from("/x/me.pem"), None)]
        );
        // A path already ending in /v2 keeps it once; no scheme means https.
        let hosts = parse_ok("server = \"reg.lan/v2/\"\n");
        assert_eq!(
            (
                hosts[0].scheme.as_str(),
                hosts[0].host.as_str(),
                hosts[0].path.as_str()
            ),
            ("https", "reg.lan", "/v2")
        );
    }

    #[test]
    fn bad_files_are_errors_saying_what_is_wrong() {
        for (text, why) in [
            ("server = 5", "server must be a string"),
            (
                "[host.\"http://m\"]\ncapabilities = [\"fly\"]",
                "unknown capability \"fly\"",
            ),
            (
                "[host.\"http://m\"]\nclient = [[\"a\"]]",
                "[certificate, key]",
            ),
            ("[host.\"http://m\"]\nca = 3", "ca: expected a string"),
            ("[host.\"httpx://m\"]\n", "not http or https"),
            (
                "[host.\"http://m\"]\nskip_verify = \"yes\"",
                "skip_verify must be a boolean",
            ),
            (
                "[host.\"http://m\"]\ndial_timeout = \"soon\"",
                "dial_timeout",
            ),
            ("server = \"", "string"),
        ] {
            let err = parse(Path::new("/d"), text).unwrap_err();
            assert!(err.contains(why), "{text:?}: {err}");
        }
    }

    #[test]
    fn host_directories_are_found_as_containerd_finds_them() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        assert_eq!(host_dir(r, "reg.lan:5000"), None);
        std::fs::create_dir(r.join("_default")).unwrap();
        assert_eq!(host_dir(r, "reg.lan:5000"), Some(r.join("_default")));
        std::fs::create_dir(r.join("reg.lan:5000")).unwrap();
        assert_eq!(host_dir(r, "reg.lan:5000"), Some(r.join("reg.lan:5000")));
        std::fs::create_dir(r.join("reg.lan_5000_")).unwrap();
        assert_eq!(host_dir(r, "reg.lan:5000"), Some(r.join("reg.lan_5000_")));
        assert_eq!(host_dir(r, "other.lan"), Some(r.join("_default")));
    }

    #[test]
    fn a_directory_without_hosts_toml_is_read_the_docker_way() {
        let root = tempfile::tempdir().unwrap();
        let d = root.path().join("reg.lan");
        std::fs::create_dir(&d).unwrap();
        for f in ["ca.crt", "me.cert", "me.key", "lone.cert", "notes.txt"] {
            std::fs::write(d.join(f), "x").unwrap();
        }
        let cfg = load(root.path(), "reg.lan").unwrap().unwrap();
        assert_eq!(cfg.dir, d);
        assert_eq!(cfg.hosts.len(), 1);
        let tls = &cfg.hosts[0].tls;
        assert_eq!(tls.ca_files, [d.join("ca.crt")]);
        assert_eq!(
            tls.client_pairs,
            [
                (d.join("lone.cert"), None),
                (d.join("me.cert"), Some(d.join("me.key")))
            ]
        );
        // A broken hosts.toml is an error naming it.
        std::fs::write(d.join("hosts.toml"), "server = [").unwrap();
        let err = load(root.path(), "reg.lan").unwrap_err().to_string();
        assert!(
            err.contains(&*d.join("hosts.toml").to_string_lossy()),
            "{err}"
        );
        assert_eq!(load(root.path(), "elsewhere.lan").unwrap(), None);
    }

    #[test]
    fn go_durations() {
        assert_eq!(go_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(go_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(go_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(go_duration("5"), None);
        assert_eq!(go_duration("x"), None);
    }
}
