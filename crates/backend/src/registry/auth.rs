//! Registry credentials: where they come from (docker config files) and the
//! parsing of `WWW-Authenticate` challenges. The token exchange itself lives
//! with the client in `mod.rs`.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine as _;

use super::RegistryError;

/// A username and password (or token) for a registry.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl Credentials {
    pub(crate) fn basic_header(&self) -> String {
        let raw = format!("{}:{}", self.username, self.password);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }
}

/// Credentials for `registry` (`host[:port]`) from a docker config file, as
/// `docker login` writes them. `path` None means `$DOCKER_CONFIG/config.json`,
/// else `$HOME/.docker/config.json`. A missing file, or one with no entry for
/// the registry, gives `Ok(None)`. Entries kept by credential helpers
/// (`credsStore`, `credHelpers`) are not consulted (a warning says so).
pub fn docker_config_credentials(
    path: Option<&Path>,
    registry: &str,
) -> Result<Option<Credentials>, RegistryError> {
    let path = match path {
        Some(p) => p.to_path_buf(),
        None => {
            match default_config_path(std::env::var_os("DOCKER_CONFIG"), std::env::var_os("HOME")) {
                Some(p) => p,
                None => return Ok(None),
            }
        }
    };
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(RegistryError::Config {
                path: path.display().to_string(),
                why: e.to_string(),
            })
        }
    };
    credentials_from_config(&text, registry).map_err(|why| RegistryError::Config {
        path: path.display().to_string(),
        why,
    })
}

pub(crate) fn default_config_path(
    docker_config: Option<OsString>,
    home: Option<OsString>,
) -> Option<PathBuf> {
    match (docker_config, home) {
        (Some(d), _) if !d.is_empty() => Some(PathBuf::from(d).join("config.json")),
        (_, Some(h)) if !h.is_empty() => Some(PathBuf::from(h).join(".docker/config.json")),
        _ => None,
    }
}

#[derive(serde::Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: BTreeMap<String, String>,
}

#[derive(serde::Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

/// `host[:port]` of a docker config key (`host`, `http://host`,
/// `https://host/v2/`), lowercased, with Docker Hub's aliases unified.
pub(crate) fn normalise_registry_key(key: &str) -> String {
    let k = key.trim();
    let k = k
        .strip_prefix("https://")
        .or_else(|| k.strip_prefix("http://"))
        .unwrap_or(k);
    let host = k.split('/').next().unwrap_or("").to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" => "docker.io".to_string(),
        _ => host,
    }
}

fn credentials_from_config(text: &[u8], registry: &str) -> Result<Option<Credentials>, String> {
    let cfg: DockerConfig =
        serde_json::from_slice(text).map_err(|e| format!("not a valid docker config: {e}"))?;
    let want = normalise_registry_key(registry);
    for (key, entry) in &cfg.auths {
        if normalise_registry_key(key) != want {
            continue;
        }
        if let Some(auth) = entry.auth.as_deref().filter(|a| !a.is_empty()) {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(auth.trim())
                .map_err(|e| format!("auths[{key:?}].auth is not base64: {e}"))?;
            let raw =
                String::from_utf8(raw).map_err(|_| format!("auths[{key:?}].auth is not UTF-8"))?;
            let (user, pass) = raw
                .split_once(':')
                .ok_or_else(|| format!("auths[{key:?}].auth is not base64(\"user:password\")"))?;
            return Ok(Some(Credentials {
                username: user.to_string(),
                password: pass.to_string(),
            }));
        }
        if let Some(user) = entry.username.as_deref().filter(|u| !u.is_empty()) {
            return Ok(Some(Credentials {
                username: user.to_string(),
                password: entry.password.clone().unwrap_or_default(),
            }));
        }
    }
    let helper = cfg
        .cred_helpers
        .iter()
        .find(|(k, _)| normalise_registry_key(k) == want)
        .map(|(_, v)| v.clone())
        .or(cfg.creds_store);
    if let Some(helper) = helper {
        tracing::warn!(
            target: "lazypull::backend",
            "docker config keeps the credentials for {registry} in credential helper \
             {helper:?}, which lazypull does not run; give them another way"
        );
    }
    Ok(None)
}

/// One challenge of a `WWW-Authenticate` header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Challenge {
    /// Lowercased (`basic`, `bearer`).
    pub scheme: String,
    /// Parameter names lowercased, values unquoted.
    pub params: Vec<(String, String)>,
}

impl Challenge {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses `WWW-Authenticate` values (RFC 7235: comma-separated challenges,
/// each a scheme followed by `name=value` or `name="quoted"` parameters).
/// Malformed tails are dropped rather than failing the whole header.
pub(crate) fn parse_www_authenticate(value: &str) -> Vec<Challenge> {
    let s: Vec<char> = value.chars().collect();
    let mut i = 0;
    let mut out = Vec::new();
    let is_tchar = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    let skip_ws = |i: &mut usize| {
        while *i < s.len() && (s[*i] == ' ' || s[*i] == '\t') {
            *i += 1;
        }
    };
    let token = |i: &mut usize| {
        let start = *i;
        while *i < s.len() && is_tchar(s[*i]) {
            *i += 1;
        }
        s[start..*i].iter().collect::<String>()
    };
    loop {
        // Skip separators between challenges.
        while i < s.len() && (s[i] == ',' || s[i] == ' ' || s[i] == '\t') {
            i += 1;
        }
        if i >= s.len() {
            break;
        }
        let scheme = token(&mut i);
        if scheme.is_empty() {
            i += 1; // a stray character: skip it
            continue;
        }
        let mut ch = Challenge {
            scheme: scheme.to_ascii_lowercase(),
            params: Vec::new(),
        };
        loop {
            while i < s.len() && (s[i] == ',' || s[i] == ' ' || s[i] == '\t') {
                i += 1;
            }
            if i >= s.len() {
                break;
            }
            let save = i;
            let name = token(&mut i);
            skip_ws(&mut i);
            if name.is_empty() {
                i = save + 1; // a stray character: skip it
                continue;
            }
            if i >= s.len() || s[i] != '=' {
                // Not a parameter: the next challenge's scheme.
                i = save;
                break;
            }
            i += 1; // '='
            skip_ws(&mut i);
            let value = if i < s.len() && s[i] == '"' {
                i += 1;
                let mut v = String::new();
                while i < s.len() && s[i] != '"' {
                    if s[i] == '\\' && i + 1 < s.len() {
                        i += 1;
                    }
                    v.push(s[i]);
                    i += 1;
                }
                i = (i + 1).min(s.len()); // the closing quote
                v
            } else {
                token(&mut i)
            };
            ch.params.push((name.to_ascii_lowercase(), value));
        }
        out.push(ch);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ch(scheme: &str, params: &[(&str, &str)]) -> Challenge {
        Challenge {
            scheme: scheme.into(),
            params: params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn parses_registry_challenges() {
        assert_eq!(
            parse_www_authenticate(
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#
            ),
            [ch(
                "bearer",
                &[
                    ("realm", "https://auth.docker.io/token"),
                    ("service", "registry.docker.io"),
                    ("scope", "repository:library/alpine:pull"),
                ]
            )]
        );
        assert_eq!(
            parse_www_authenticate(r#"Basic realm="test""#),
            [ch("basic", &[("realm", "test")])]
        );
        // Spaces around '=', token values, odd case, escapes, commas inside quotes.
        assert_eq!(
            parse_www_authenticate(
                r#"BEARER Realm = "http://x/t?a=1,b=2" , Service=svc, scope="repository:a/b:pull,push" , error="in\"sufficient""#
            ),
            [ch(
                "bearer",
                &[
                    ("realm", "http://x/t?a=1,b=2"),
                    ("service", "svc"),
                    ("scope", "repository:a/b:pull,push"),
                    ("error", "in\"sufficient"),
                ]
            )]
        );
    }

    #[test]
    fn parses_several_challenges_and_survives_garbage() {
        assert_eq!(
            parse_www_authenticate(r#"Basic realm="a", Bearer realm="b",service="s""#),
            [
                ch("basic", &[("realm", "a")]),
                ch("bearer", &[("realm", "b"), ("service", "s")])
            ]
        );
        assert_eq!(parse_www_authenticate("Negotiate"), [ch("negotiate", &[])]);
        assert_eq!(
            parse_www_authenticate("Basic, Bearer realm=x"),
            [ch("basic", &[]), ch("bearer", &[("realm", "x")])]
        );
        assert_eq!(parse_www_authenticate(""), []);
        // Unterminated quote: value runs to the end, no panic.
        assert_eq!(
            parse_www_authenticate(r#"Bearer realm="abc"#),
            [ch("bearer", &[("realm", "abc")])]
        );
        // Junk characters do not loop forever.
        let _ = parse_www_authenticate("Bearer realm=\"x\" ;;; @@ = ,,, ==");
        let _ = parse_www_authenticate("= = =");
        let c = &parse_www_authenticate(r#"Bearer realm="r""#)[0];
        assert_eq!(c.param("realm"), Some("r"));
        assert_eq!(c.param("service"), None);
    }

    #[test]
    fn credentials_debug_hides_the_password() {
        let c = Credentials {
            username: "alice".into(),
            password: "s3cret-pw".into(),
        };
        let s = format!("{c:?}");
        assert!(s.contains("alice") && !s.contains("s3cret"), "{s}");
        assert_eq!(c.basic_header(), "Basic YWxpY2U6czNjcmV0LXB3");
    }

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    #[test]
    fn reads_docker_config_entries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let cfg = serde_json::json!({
            "auths": {
                "https://reg.example.com/v2/": {"auth": b64("alice:pw:with:colons")},
                "http://127.0.0.1:5000": {"auth": b64("bob:pw2")},
                "plain.example.com": {"username": "carol", "password": "pw3"},
                "https://index.docker.io/v1/": {"auth": b64("dave:hub")},
                "empty.example.com": {},
            },
            "credHelpers": {"helped.example.com": "secretservice"}
        });
        std::fs::write(&path, cfg.to_string()).unwrap();
        let get = |reg: &str| docker_config_credentials(Some(&path), reg).unwrap();
        let c = |u: &str, p: &str| {
            Some(Credentials {
                username: u.into(),
                password: p.into(),
            })
        };
        assert_eq!(get("reg.example.com"), c("alice", "pw:with:colons"));
        assert_eq!(get("REG.example.com"), c("alice", "pw:with:colons"));
        assert_eq!(get("127.0.0.1:5000"), c("bob", "pw2"));
        assert_eq!(get("127.0.0.1:5001"), None);
        assert_eq!(get("plain.example.com"), c("carol", "pw3"));
        assert_eq!(get("docker.io"), c("dave", "hub"));
        assert_eq!(get("registry-1.docker.io"), c("dave", "hub"));
        assert_eq!(get("empty.example.com"), None);
        assert_eq!(get("helped.example.com"), None);
        assert_eq!(get("unknown.example.com"), None);

        // Missing file: no credentials, no error.
        assert_eq!(
            docker_config_credentials(Some(&dir.path().join("nope.json")), "x.io").unwrap(),
            None
        );
    }

    #[test]
    fn broken_docker_configs_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        for (text, why) in [
            ("{not json", "not a valid docker config"),
            (r#"{"auths": {"r.io": {"auth": "!!!"}}}"#, "not base64"),
            (
                &*format!(
                    r#"{{"auths": {{"r.io": {{"auth": "{}"}}}}}}"#,
                    b64("nocolon")
                ),
                "user:password",
            ),
        ] {
            std::fs::write(&path, text).unwrap();
            let err = docker_config_credentials(Some(&path), "r.io").unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, RegistryError::Config { .. }), "{msg}");
            assert!(msg.contains(why) && msg.contains("config.json"), "{msg}");
        }
    }

    #[test]
    fn default_config_location() {
        assert_eq!(
            default_config_path(Some("/etc/dc".into()), Some("/root".into())),
            Some(PathBuf::from("/etc/dc/config.json"))
        );
        assert_eq!(
            default_config_path(None, Some("/home/u".into())),
            Some(PathBuf::from("/home/u/.docker/config.json"))
        );
        assert_eq!(
            default_config_path(Some("".into()), Some("/home/u".into())),
            Some(PathBuf::from("/home/u/.docker/config.json"))
        );
        assert_eq!(default_config_path(None, None), None);
    }

    #[test]
    fn registry_keys_normalise() {
        for (k, want) in [
            ("host.io", "host.io"),
            ("http://host.io:5000", "host.io:5000"),
            ("https://Host.io/v2/", "host.io"),
            ("https://index.docker.io/v1/", "docker.io"),
        ] {
            assert_eq!(normalise_registry_key(k), want, "{k}");
        }
    }
}
