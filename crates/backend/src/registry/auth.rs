//! Registry credentials: where they come from (docker config files and the
//! credential helpers they name) and the parsing of `WWW-Authenticate`
//! challenges. The token exchange itself lives with the client in `mod.rs`.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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

/// The username docker uses for an identity token (an OAuth2 refresh
/// token) in place of a password.
pub(crate) const IDENTITY_TOKEN_USER: &str = "<token>";

impl Credentials {
    /// Whether these are an identity token ([`IDENTITY_TOKEN_USER`] and
    /// the token as password), to be exchanged at the registry's token
    /// realm for access tokens rather than sent as a password.
    pub fn is_identity_token(&self) -> bool {
        self.username == IDENTITY_TOKEN_USER
    }

    pub(crate) fn basic_header(&self) -> String {
        let raw = format!("{}:{}", self.username, self.password);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }
}

/// Where credential helpers (`docker-credential-<name>`) are found, and how
/// long one may take.
#[derive(Clone, Debug)]
pub struct Helpers {
    /// Directories searched, in order. None: `$PATH`.
    pub search_path: Option<Vec<PathBuf>>,
    /// A helper still running after this is killed, and its registry's
    /// credentials are an error. Default 30 s.
    pub timeout: Duration,
}

impl Default for Helpers {
    fn default() -> Self {
        Helpers {
            search_path: None,
            timeout: Duration::from_secs(30),
        }
    }
}

/// Credentials for `registry` (`host[:port]`) from a docker config file, as
/// `docker login` writes them. `path` None means `$DOCKER_CONFIG/config.json`,
/// else `$HOME/.docker/config.json`. A missing file, or one with no entry for
/// the registry, gives `Ok(None)`.
///
/// As docker does: a credential helper named for the registry
/// (`credHelpers`), else the default one (`credsStore`), is asked first —
/// `docker-credential-<name> get`, the registry on stdin (Docker Hub as
/// `https://index.docker.io/v1/`), `{"Username","Secret"}` on stdout; a
/// Username of `<token>` makes the Secret an identity token — and its
/// answer is the registry's alone. A helper that knows no credentials for
/// the registry leaves the `auths` entry, if any. Helpers are found in
/// `$PATH`; see [`docker_config_credentials_with`] to look elsewhere.
pub fn docker_config_credentials(
    path: Option<&Path>,
    registry: &str,
) -> Result<Option<Credentials>, RegistryError> {
    docker_config_credentials_with(path, registry, &Helpers::default())
}

/// [`docker_config_credentials`] with credential helpers found as
/// `helpers` says.
pub fn docker_config_credentials_with(
    path: Option<&Path>,
    registry: &str,
    helpers: &Helpers,
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
    let found = credentials_from_config(&text, registry).map_err(|why| RegistryError::Config {
        path: path.display().to_string(),
        why,
    })?;
    let Some(helper) = found.helper else {
        return Ok(found.file);
    };
    match run_helper(&helper, registry, helpers) {
        Ok(Some(c)) => Ok(Some(c)),
        Ok(None) => Ok(found.file),
        Err(why) => Err(RegistryError::CredentialHelper {
            helper: format!("docker-credential-{helper}"),
            registry: registry.to_string(),
            why: format!("{why} (named in {})", path.display()),
        }),
    }
}

/// What a credential helper is told the registry is: Docker Hub by its
/// old index URL (the key `docker login` stores it under), others as
/// `host[:port]`.
fn helper_server(registry: &str) -> String {
    match normalise_registry_key(registry).as_str() {
        "docker.io" => "https://index.docker.io/v1/".to_string(),
        h => h.to_string(),
    }
}

/// Runs `docker-credential-<name> get` for `registry`. Ok(None): the
/// helper has no credentials for it.
fn run_helper(
    name: &str,
    registry: &str,
    helpers: &Helpers,
) -> Result<Option<Credentials>, String> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
    {
        return Err(format!(
            "{name:?} is not a credential helper name (letters, digits, '.', '_', '-')"
        ));
    }
    let program = format!("docker-credential-{name}");
    let dirs: Vec<PathBuf> = match &helpers.search_path {
        Some(d) => d.clone(),
        None => std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).collect())
            .unwrap_or_default(),
    };
    let Some(bin) = dirs.iter().map(|d| d.join(&program)).find(|p| p.is_file()) else {
        return Err(format!(
            "{program} is not installed (not found in {}): install it, or remove the helper \
             from the docker config",
            if helpers.search_path.is_some() {
                "the helper directories"
            } else {
                "$PATH"
            }
        ));
    };
    let mut child = Command::new(&bin)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
    let server = helper_server(registry);
    if let Some(mut stdin) = child.stdin.take() {
        // A helper that exits without reading is judged by its exit status.
        let _ = stdin.write_all(server.as_bytes());
    }
    let mut out_pipe = child.stdout.take().expect("piped");
    let mut err_pipe = child.stderr.take().expect("piped");
    let out_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = (&mut out_pipe).take(1 << 20).read_to_end(&mut v);
        v
    });
    let err_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = (&mut err_pipe).take(64 << 10).read_to_end(&mut v);
        v
    });
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if started.elapsed() < helpers.timeout => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{} did not answer within {:?}; killed",
                    bin.display(),
                    helpers.timeout
                ));
            }
            Err(e) => return Err(format!("waiting for {}: {e}", bin.display())),
        }
    };
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    if !status.success() {
        let said = String::from_utf8_lossy(if stdout.is_empty() { &stderr } else { &stdout })
            .trim()
            .to_string();
        // docker-credential-helpers' own words for "no such entry".
        if said.contains("credentials not found") {
            return Ok(None);
        }
        let said: String = said.chars().take(300).collect();
        return Err(format!(
            "{} get exited with {status}: {said}",
            bin.display()
        ));
    }
    #[derive(serde::Deserialize)]
    struct Answer {
        #[serde(rename = "Username", default)]
        username: String,
        #[serde(rename = "Secret", default)]
        secret: String,
    }
    // Never quote the output: it holds the secret.
    let a: Answer = serde_json::from_slice(&stdout).map_err(|e| {
        format!(
            "{} get did not print {{\"Username\", \"Secret\"}} JSON (line {}, column {})",
            bin.display(),
            e.line(),
            e.column()
        )
    })?;
    if a.secret.is_empty() {
        return Ok(None);
    }
    Ok(Some(Credentials {
        username: a.username,
        password: a.secret,
    }))
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
    #[serde(default, rename = "identitytoken")]
    identity_token: Option<String>,
}

/// What a docker config says about one registry.
#[derive(Debug, Default, PartialEq, Eq)]
struct Found {
    /// Its `auths` entry's credentials.
    file: Option<Credentials>,
    /// The credential helper to ask first (`credHelpers`, else `credsStore`).
    helper: Option<String>,
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

fn credentials_from_config(text: &[u8], registry: &str) -> Result<Found, String> {
    let cfg: DockerConfig =
        serde_json::from_slice(text).map_err(|e| format!("not a valid docker config: {e}"))?;
    let want = normalise_registry_key(registry);
    let helper = cfg
        .cred_helpers
        .iter()
        .find(|(k, _)| normalise_registry_key(k) == want)
        .map(|(_, v)| v.clone())
        .or(cfg.creds_store)
        .filter(|h| !h.is_empty());
    Ok(Found {
        file: auths_entry(&cfg.auths, &want)?,
        helper,
    })
}

/// What a docker config says for a registry, as plain values: its `auths`
/// entry's `(username, password)` and the credential helper to ask.
pub type ConfigAnswer = (Option<(String, String)>, Option<String>);

/// [`credentials_from_config`] as plain values, for the fuzz targets.
pub(crate) fn fuzz_credentials_from_config(
    text: &[u8],
    registry: &str,
) -> Result<ConfigAnswer, String> {
    let found = credentials_from_config(text, registry)?;
    Ok((found.file.map(|c| (c.username, c.password)), found.helper))
}

fn auths_entry(
    auths: &BTreeMap<String, AuthEntry>,
    want: &str,
) -> Result<Option<Credentials>, String> {
    for (key, entry) in auths {
        if normalise_registry_key(key) != want {
            continue;
        }
        if let Some(tok) = entry.identity_token.as_deref().filter(|t| !t.is_empty()) {
            return Ok(Some(Credentials {
                username: IDENTITY_TOKEN_USER.to_string(),
                password: tok.to_string(),
            }));
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
        assert_eq!(get("unknown.example.com"), None);
        // A helper that is not installed is an error naming it and the host.
        let err = docker_config_credentials_with(
            Some(&path),
            "helped.example.com",
            &Helpers {
                search_path: Some(vec![dir.path().to_path_buf()]),
                ..Helpers::default()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("docker-credential-secretservice")
                && err.contains("helped.example.com")
                && err.contains("not installed"),
            "{err}"
        );

        // Missing file: no credentials, no error.
        assert_eq!(
            docker_config_credentials(Some(&dir.path().join("nope.json")), "x.io").unwrap(),
            None
        );
    }

    /// Writes an executable `docker-credential-<name>` script into `dir`.
    fn helper_script(dir: &Path, name: &str, body: &str) {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join(format!("docker-credential-{name}"));
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o700)).unwrap();
    }

    #[test]
    fn credential_helpers_are_asked_per_host_as_docker_asks_them() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("asked.log");
        // One helper per host, one default store; each logs what it was
        // asked (stdin, no newline) and answers for its hosts only.
        helper_script(
            dir.path(),
            "pertest",
            &format!(
                r#"[ "$1" = get ] || exit 3
host=$(cat); echo "pertest $host" >> {log}
case "$host" in
  reg.lan:5000) printf '{{"ServerURL":"%s","Username":"alice","Secret":"s3cret"}}' "$host";;
  *) echo "credentials not found in native keychain"; exit 1;;
esac"#,
                log = log.display()
            ),
        );
        helper_script(
            dir.path(),
            "store",
            &format!(
                r#"host=$(cat); echo "store $host" >> {log}
case "$host" in
  https://index.docker.io/v1/) printf '{{"Username":"<token>","Secret":"refresh-me"}}';;
  broken.lan) echo 'not json at all s3cret'; exit 0;;
  failing.lan) echo 'helper exploded' >&2; exit 2;;
  *) echo "credentials not found in native keychain"; exit 1;;
esac"#,
                log = log.display()
            ),
        );
        let cfg = dir.path().join("config.json");
        std::fs::write(
            &cfg,
            serde_json::json!({
                "auths": {"fallback.lan": {"auth": b64("carol:pw3")}, "reg.lan:5000": {}},
                "credHelpers": {"reg.lan:5000": "pertest", "other.lan": "pertest"},
                "credsStore": "store",
            })
            .to_string(),
        )
        .unwrap();
        let helpers = Helpers {
            search_path: Some(vec![dir.path().to_path_buf()]),
            ..Helpers::default()
        };
        let get = |reg: &str| docker_config_credentials_with(Some(&cfg), reg, &helpers);
        let alice = get("reg.lan:5000").unwrap().unwrap();
        assert_eq!(
            (alice.username.as_str(), alice.password.as_str()),
            ("alice", "s3cret")
        );
        assert!(!alice.is_identity_token());
        // credHelpers' helper knows nothing of other.lan: no credentials,
        // and the default store is not asked for a host with its own helper.
        assert_eq!(get("other.lan").unwrap(), None);
        // The default store, with Docker Hub by its index URL; <token>
        // makes the secret an identity token.
        let hub = get("docker.io").unwrap().unwrap();
        assert!(hub.is_identity_token() && hub.password == "refresh-me");
        // The store has nothing: the auths entry stands.
        let carol = get("fallback.lan").unwrap().unwrap();
        assert_eq!(carol.username, "carol");
        // Broken and failing helpers are errors naming helper and host,
        // never quoting what might be the secret.
        let err = get("broken.lan").unwrap_err().to_string();
        assert!(
            err.contains("docker-credential-store") && err.contains("broken.lan"),
            "{err}"
        );
        assert!(!err.contains("s3cret"), "{err}");
        let err = get("failing.lan").unwrap_err().to_string();
        assert!(
            err.contains("helper exploded") && err.contains("failing.lan"),
            "{err}"
        );
        let asked = std::fs::read_to_string(&log).unwrap();
        assert_eq!(
            asked.lines().collect::<Vec<_>>(),
            [
                "pertest reg.lan:5000",
                "pertest other.lan",
                "store https://index.docker.io/v1/",
                "store fallback.lan",
                "store broken.lan",
                "store failing.lan",
            ]
        );
        // An identity token in the file itself.
        std::fs::write(&cfg, r#"{"auths": {"tok.lan": {"identitytoken": "idt"}}}"#).unwrap();
        let t = get("tok.lan").unwrap().unwrap();
        assert!(t.is_identity_token() && t.password == "idt");
        // A helper that hangs is killed at the timeout.
        helper_script(dir.path(), "slow", "sleep 30");
        std::fs::write(&cfg, r#"{"credsStore": "slow"}"#).unwrap();
        let quick = Helpers {
            timeout: Duration::from_millis(300),
            ..helpers.clone()
        };
        let t0 = Instant::now();
        let err = docker_config_credentials_with(Some(&cfg), "x.lan", &quick).unwrap_err();
        assert!(err.to_string().contains("did not answer"), "{err}");
        assert!(t0.elapsed() < Duration::from_secs(10));
        // Names that could reach outside the helper directories are refused.
        std::fs::write(&cfg, r#"{"credsStore": "../../bin/sh"}"#).unwrap();
        let err = get("x.lan").unwrap_err().to_string();
        assert!(err.contains("not a credential helper name"), "{err}");
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
