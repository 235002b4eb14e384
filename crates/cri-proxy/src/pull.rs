//! What the proxy reads of a CRI `PullImage`: the image and the credentials
//! kubelet sends with it, from the request's one gRPC message.
//!
//! The messages are restated here with only the fields read (`runtime.v1`
//! and `v1alpha2` share them: `PullImageRequest.image` = 1, `.auth` = 2;
//! `AuthConfig` fields 1 to 6); protobuf skips the fields a restatement
//! leaves out, so the rest of kubelet's request (its sandbox config) is
//! ignored here and forwarded unchanged by the proxy.

use base64::Engine;

/// `runtime.v1.ImageSpec`, its image only.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ImageSpec {
    /// The image reference as kubelet names it.
    #[prost(string, tag = "1")]
    pub image: String,
}

/// `runtime.v1.AuthConfig`: what kubelet found in its keyring (a pull
/// secret, a credential provider plugin, its docker config) for the image.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AuthConfig {
    #[prost(string, tag = "1")]
    pub username: String,
    #[prost(string, tag = "2")]
    pub password: String,
    /// base64 of `username:password` (docker config's `auth`).
    #[prost(string, tag = "3")]
    pub auth: String,
    #[prost(string, tag = "4")]
    pub server_address: String,
    /// An OAuth2 refresh token for the registry's token server.
    #[prost(string, tag = "5")]
    pub identity_token: String,
    /// A bearer token for the registry itself.
    #[prost(string, tag = "6")]
    pub registry_token: String,
}

/// `runtime.v1.PullImageRequest`, image and auth only.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PullImageRequest {
    #[prost(message, optional, tag = "1")]
    pub image: Option<ImageSpec>,
    #[prost(message, optional, tag = "2")]
    pub auth: Option<AuthConfig>,
}

/// The gRPC paths of `PullImage` (kubelet speaks v1; v1alpha2 is what
/// kubelets before 1.26 may speak, with the same messages).
pub const PULL_IMAGE_PATHS: [&str; 2] = [
    "/runtime.v1.ImageService/PullImage",
    "/runtime.v1alpha2.ImageService/PullImage",
];

/// The username that makes a password an identity token (docker's
/// convention, which lazypull's registry client follows).
pub const IDENTITY_TOKEN_USER: &str = "<token>";

/// Credentials kubelet sent for one image. Its `Debug` hides the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct PullCredentials {
    /// The image reference of the pull, as kubelet sent it.
    pub image: String,
    pub username: String,
    /// The password, or the identity token when `username` is
    /// [`IDENTITY_TOKEN_USER`].
    pub secret: String,
}

impl std::fmt::Debug for PullCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PullCredentials")
            .field("image", &self.image)
            .field("username", &self.username)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// Why a `PullImage` request's credentials cannot be taken.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PullError {
    #[error("the request body is not one gRPC message ({0})")]
    Framing(String),
    #[error("the request's message is compressed (grpc-encoding); kubelet sends it uncompressed")]
    Compressed,
    #[error("the request's message is not a PullImageRequest: {0}")]
    Decode(String),
    #[error("the request names no image")]
    NoImage,
    #[error("its auth field is not base64 of user:password")]
    BadAuth,
    #[error("it carries only a registry token (a bearer token), which lazypull's registry client cannot use; give kubelet a username and password or an identity token")]
    RegistryTokenOnly,
}

/// The one message of a unary gRPC request body: 1 byte compressed flag,
/// 4 bytes big-endian length, then the message.
pub fn grpc_message(body: &[u8]) -> Result<&[u8], PullError> {
    let Some((head, rest)) = body.split_first_chunk::<5>() else {
        return Err(PullError::Framing(format!(
            "{} bytes, shorter than a frame header",
            body.len()
        )));
    };
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if head[0] == 1 {
        return Err(PullError::Compressed);
    }
    if head[0] != 0 {
        return Err(PullError::Framing(format!("compressed flag {}", head[0])));
    }
    if rest.len() != len {
        return Err(PullError::Framing(format!(
            "the frame says {len} bytes, the body holds {}",
            rest.len()
        )));
    }
    Ok(rest)
}

/// The credentials of a `PullImage` request body: None for an anonymous
/// pull (no auth, or an empty one).
pub fn pull_credentials(body: &[u8]) -> Result<Option<PullCredentials>, PullError> {
    let message = grpc_message(body)?;
    let req = <PullImageRequest as prost::Message>::decode(message)
        .map_err(|e| PullError::Decode(e.to_string()))?;
    let image = req.image.map(|i| i.image).unwrap_or_default();
    let Some(auth) = req.auth else {
        return Ok(None);
    };
    let (username, secret) = if !auth.username.is_empty() || !auth.password.is_empty() {
        (auth.username, auth.password)
    } else if !auth.auth.is_empty() {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.auth.trim())
            .map_err(|_| PullError::BadAuth)?;
        let text = String::from_utf8(decoded).map_err(|_| PullError::BadAuth)?;
        let (u, p) = text.split_once(':').ok_or(PullError::BadAuth)?;
        (u.to_owned(), p.to_owned())
    } else if !auth.identity_token.is_empty() {
        (IDENTITY_TOKEN_USER.to_owned(), auth.identity_token)
    } else if !auth.registry_token.is_empty() {
        return Err(PullError::RegistryTokenOnly);
    } else {
        return Ok(None);
    };
    if image.is_empty() {
        return Err(PullError::NoImage);
    }
    Ok(Some(PullCredentials {
        image,
        username,
        secret,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn framed(req: &PullImageRequest) -> Vec<u8> {
        let m = req.encode_to_vec();
        let mut out = vec![0];
        out.extend_from_slice(&(m.len() as u32).to_be_bytes());
        out.extend_from_slice(&m);
        out
    }

    fn request(auth: Option<AuthConfig>) -> PullImageRequest {
        PullImageRequest {
            image: Some(ImageSpec {
                image: "registry.lan/team/app:v1".into(),
            }),
            auth,
        }
    }

    #[test]
    fn each_form_of_kubelets_auth_gives_the_credentials() {
        let plain = AuthConfig {
            username: "alice".into(),
            password: "s3cret".into(),
            ..AuthConfig::default()
        };
        let got = pull_credentials(&framed(&request(Some(plain))))
            .unwrap()
            .unwrap();
        assert_eq!(got.image, "registry.lan/team/app:v1");
        assert_eq!(
            (got.username.as_str(), got.secret.as_str()),
            ("alice", "s3cret")
        );
        assert!(!format!("{got:?}").contains("s3cret"), "Debug hides it");

        let encoded = AuthConfig {
            auth: base64::engine::general_purpose::STANDARD.encode("bob:pa:ss"),
            server_address: "registry.lan".into(),
            ..AuthConfig::default()
        };
        let got = pull_credentials(&framed(&request(Some(encoded))))
            .unwrap()
            .unwrap();
        assert_eq!(
            (got.username.as_str(), got.secret.as_str()),
            ("bob", "pa:ss")
        );

        let token = AuthConfig {
            identity_token: "refresh-me".into(),
            ..AuthConfig::default()
        };
        let got = pull_credentials(&framed(&request(Some(token))))
            .unwrap()
            .unwrap();
        assert_eq!(got.username, IDENTITY_TOKEN_USER);
        assert_eq!(got.secret, "refresh-me");
    }

    #[test]
    fn anonymous_pulls_have_none_and_bad_ones_say_why() {
        assert_eq!(pull_credentials(&framed(&request(None))).unwrap(), None);
        assert_eq!(
            pull_credentials(&framed(&request(Some(AuthConfig::default())))).unwrap(),
            None
        );
        let bearer = AuthConfig {
            registry_token: "bearer".into(),
            ..AuthConfig::default()
        };
        assert_eq!(
            pull_credentials(&framed(&request(Some(bearer)))),
            Err(PullError::RegistryTokenOnly)
        );
        let bad = AuthConfig {
            auth: "not base64!".into(),
            ..AuthConfig::default()
        };
        assert_eq!(
            pull_credentials(&framed(&request(Some(bad)))),
            Err(PullError::BadAuth)
        );
        let no_image = PullImageRequest {
            image: None,
            auth: Some(AuthConfig {
                username: "u".into(),
                password: "p".into(),
                ..AuthConfig::default()
            }),
        };
        assert_eq!(
            pull_credentials(&framed(&no_image)),
            Err(PullError::NoImage)
        );
    }

    #[test]
    fn framing_is_checked() {
        let body = framed(&request(None));
        assert!(matches!(
            pull_credentials(&body[..3]),
            Err(PullError::Framing(_))
        ));
        assert!(matches!(
            pull_credentials(&body[..body.len() - 1]),
            Err(PullError::Framing(_))
        ));
        let mut compressed = body.clone();
        compressed[0] = 1;
        assert_eq!(pull_credentials(&compressed), Err(PullError::Compressed));
        let garbage = [0, 0, 0, 0, 3, 0xff, 0xff, 0xff];
        assert!(matches!(
            pull_credentials(&garbage),
            Err(PullError::Decode(_))
        ));
    }
}
