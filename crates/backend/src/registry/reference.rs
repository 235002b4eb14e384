//! Image references (`host[:port]/repo[:tag|@sha256:…]`) and the syntax of
//! their parts: repository names, tags, digests.

use std::fmt;

use super::RegistryError;

/// A fully qualified image reference.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Reference {
    /// `host[:port]`.
    pub registry: String,
    /// `path/of/repo`.
    pub repository: String,
    /// A tag, or a digest `sha256:<hex>`.
    pub reference: String,
}

impl Reference {
    /// Parses `host[:port]/repo[:tag]` or `host[:port]/repo@sha256:<hex>`
    /// (the tag defaults to `latest`; with both a tag and a digest the digest
    /// wins). The registry host must be explicit: the first path component
    /// counts as one only if it contains `.` or `:` or is `localhost`.
    pub fn parse(input: &str) -> Result<Reference, RegistryError> {
        let bad = |why: String| RegistryError::InvalidReference {
            input: input.to_string(),
            why,
        };
        if input.is_empty() {
            return Err(bad("empty".into()));
        }
        if input.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad("contains whitespace or control characters".into()));
        }
        let (name, digest) = match input.split_once('@') {
            Some((n, d)) => {
                validate_digest(d).map_err(|e| bad(e.to_string()))?;
                (n, Some(d))
            }
            None => (input, None),
        };
        let (name, tag) = match name.rfind(':') {
            Some(i) if !name[i..].contains('/') => (&name[..i], Some(&name[i + 1..])),
            _ => (name, None),
        };
        if let Some(t) = tag {
            validate_tag(t).map_err(|why| bad(why.to_string()))?;
        }
        let Some((registry, repository)) = name.split_once('/') else {
            return Err(bad(no_registry_hint(name)));
        };
        if !(registry.contains('.') || registry.contains(':') || registry == "localhost") {
            return Err(bad(no_registry_hint(name)));
        }
        validate_registry(registry).map_err(|why| bad(why.to_string()))?;
        validate_repository(repository).map_err(|why| bad(why.to_string()))?;
        let reference = match (digest, tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.to_string(),
            (None, None) => "latest".to_string(),
        };
        Ok(Reference {
            registry: registry.to_string(),
            repository: repository.to_string(),
            reference,
        })
    }

    /// Whether [`reference`](Self::reference) is a digest rather than a tag.
    pub fn is_digest(&self) -> bool {
        self.reference.contains(':')
    }
}

fn no_registry_hint(name: &str) -> String {
    format!(
        "no registry host: write it in full, e.g. docker.io/{}{name} or 127.0.0.1:5000/{name}",
        if name.contains('/') { "" } else { "library/" }
    )
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sep = if self.is_digest() { '@' } else { ':' };
        write!(
            f,
            "{}/{}{sep}{}",
            self.registry, self.repository, self.reference
        )
    }
}

/// Checks `sha256:<64 lowercase hex>` (the only algorithm supported) and
/// returns the hex part.
pub fn validate_digest(d: &str) -> Result<&str, RegistryError> {
    let bad = |why| RegistryError::InvalidDigest {
        digest: d.to_string(),
        why,
    };
    let Some((alg, hex)) = d.split_once(':') else {
        return Err(bad("expected <algorithm>:<hex>"));
    };
    if alg != "sha256" {
        return Err(bad("only sha256 digests are supported"));
    }
    if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(bad("a sha256 digest has 64 lowercase hex digits"));
    }
    Ok(hex)
}

/// A tag: `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
pub(crate) fn validate_tag(t: &str) -> Result<(), &'static str> {
    let ok_first = t
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !ok_first
        || t.len() > 128
        || !t
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
    {
        return Err("a tag is 1-128 of [A-Za-z0-9_.-], not starting with '.' or '-'");
    }
    Ok(())
}

/// A tag or a digest, as a manifest reference.
pub(crate) fn validate_manifest_reference(r: &str) -> Result<(), RegistryError> {
    if r.contains(':') {
        validate_digest(r).map(|_| ())
    } else {
        validate_tag(r).map_err(|why| RegistryError::InvalidReference {
            input: r.to_string(),
            why: why.to_string(),
        })
    }
}

/// Repository path: `/`-separated components of lowercase letters and digits,
/// joined inside a component by `.`, `_`, `__` or runs of `-`.
pub(crate) fn validate_repository(r: &str) -> Result<(), &'static str> {
    if r.is_empty() {
        return Err("empty repository name");
    }
    if r.len() > 255 {
        return Err("repository name longer than 255 bytes");
    }
    for comp in r.split('/') {
        let b = comp.as_bytes();
        let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
        if b.is_empty() {
            return Err("empty component in repository name");
        }
        if b.iter().any(|c| c.is_ascii_uppercase()) {
            return Err("repository names must be lowercase");
        }
        if !alnum(b[0]) || !alnum(b[b.len() - 1]) {
            return Err("repository components start and end with a letter or digit");
        }
        let mut i = 0;
        while i < b.len() {
            if alnum(b[i]) {
                i += 1;
                continue;
            }
            let start = i;
            while i < b.len() && !alnum(b[i]) {
                i += 1;
            }
            let sep = &comp[start..i];
            if !(sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|c| c == b'-')) {
                return Err(
                    "repository components contain only [a-z0-9] joined by '.', '_', '__' or '-'",
                );
            }
        }
    }
    Ok(())
}

/// `host[:port]`, an IPv6 address in brackets.
pub(crate) fn validate_registry(r: &str) -> Result<(), &'static str> {
    let (host, port) = super::options::split_host_port(r);
    if host.is_empty() {
        return Err("empty registry host");
    }
    let bracketed = r.starts_with('[');
    let host_ok = if bracketed {
        host.parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        host.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
    };
    if !host_ok {
        return Err("invalid registry host name");
    }
    if let Some(p) = port {
        if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return Err("invalid registry port");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn r(reg: &str, repo: &str, reference: &str) -> Reference {
        Reference {
            registry: reg.into(),
            repository: repo.into(),
            reference: reference.into(),
        }
    }

    #[test]
    fn parses_good_references() {
        let cases = [
            (
                "127.0.0.1:5000/lp/demo:v1",
                r("127.0.0.1:5000", "lp/demo", "v1"),
            ),
            (
                "127.0.0.1:5000/lp/demo",
                r("127.0.0.1:5000", "lp/demo", "latest"),
            ),
            ("localhost/x", r("localhost", "x", "latest")),
            (
                "localhost:5000/a/b/c:1.0-rc_1",
                r("localhost:5000", "a/b/c", "1.0-rc_1"),
            ),
            ("ghcr.io/owner/img:tag", r("ghcr.io", "owner/img", "tag")),
            (
                "docker.io/library/alpine",
                r("docker.io", "library/alpine", "latest"),
            ),
            (
                &*format!("reg.example.com/repo@{D}"),
                r("reg.example.com", "repo", D),
            ),
            (
                &*format!("reg.example.com/repo:t@{D}"),
                r("reg.example.com", "repo", D),
            ),
            (
                "[::1]:5000/my-repo__x.y:v",
                r("[::1]:5000", "my-repo__x.y", "v"),
            ),
        ];
        for (input, want) in cases {
            let got = Reference::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(got, want, "{input}");
        }
        assert_eq!(
            Reference::parse("127.0.0.1:5000/lp/demo:v1")
                .unwrap()
                .to_string(),
            "127.0.0.1:5000/lp/demo:v1"
        );
        assert_eq!(
            Reference::parse("127.0.0.1:5000/lp/demo")
                .unwrap()
                .to_string(),
            "127.0.0.1:5000/lp/demo:latest"
        );
        let d = Reference::parse(&format!("h.io/r@{D}")).unwrap();
        assert!(d.is_digest());
        assert_eq!(d.to_string(), format!("h.io/r@{D}"));
    }

    #[test]
    fn refuses_bad_references_with_a_reason() {
        let cases = [
            ("", "empty"),
            ("alpine", "no registry host"),
            ("alpine:3", "no registry host"),
            ("library/alpine:3", "no registry host"),
            ("127.0.0.1:5000/Upper", "lowercase"),
            ("127.0.0.1:5000/", "empty repository"),
            ("127.0.0.1:5000/a//b", "empty component"),
            ("127.0.0.1:5000/-a", "start and end"),
            ("127.0.0.1:5000/a..b", "joined by"),
            ("127.0.0.1:5000/a:", "tag"),
            ("127.0.0.1:5000/a:-x", "tag"),
            ("127.0.0.1:5000/a:x/y", "joined by"),
            ("127.0.0.1:5000/a@sha256:abc", "64 lowercase hex"),
            ("127.0.0.1:5000/a@md5:abc", "only sha256"),
            ("127.0.0.1:5000/a b", "whitespace"),
            ("127.0.0.1:port/a", "port"),
            ("bad_host.io/a", "host"),
        ];
        for (input, why) in cases {
            let err = Reference::parse(input).expect_err(input);
            assert!(
                matches!(err, RegistryError::InvalidReference { .. }),
                "{input}: {err}"
            );
            assert!(err.to_string().contains(why), "{input}: {err}");
            assert_eq!(err.errno(), libc::EINVAL);
        }
        let err = Reference::parse("alpine").unwrap_err().to_string();
        assert!(err.contains("docker.io/library/alpine"), "{err}");
    }

    #[test]
    fn digests() {
        assert_eq!(validate_digest(D).unwrap(), &D[7..]);
        for bad in [
            "sha256:",
            "sha256",
            "sha512:00",
            &D.to_uppercase().replace("SHA256", "sha256"),
            &format!("{D}0"),
            "sha256:../../../../etc/passwd0000000000000000000000000000000000000",
        ] {
            assert!(validate_digest(bad).is_err(), "{bad}");
        }
        assert!(validate_manifest_reference("v1").is_ok());
        assert!(validate_manifest_reference(D).is_ok());
        assert!(validate_manifest_reference("../x").is_err());
        assert!(validate_manifest_reference("sha256:zz").is_err());
    }
}
