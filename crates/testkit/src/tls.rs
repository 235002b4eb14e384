//! A test certificate authority made with the `openssl` command-line tool
//! at test time: a CA, server certificates for 127.0.0.1, client
//! certificates. Nothing is checked in; a missing `openssl` is an error that
//! says how to install it.

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A CA whose key and certificate live in a directory.
pub struct TestCa {
    dir: PathBuf,
    /// The CA's certificate (PEM): what a client or server must trust.
    pub cert: PathBuf,
    key: PathBuf,
}

/// A certificate and its private key (PEM files).
#[derive(Clone, Debug)]
pub struct CertPair {
    /// The certificate.
    pub cert: PathBuf,
    /// Its private key (unencrypted).
    pub key: PathBuf,
}

fn openssl(args: &[&str], what: &str) -> io::Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "cannot run openssl ({e}): the TLS tests make their certificates with it; \
                     apt-get install openssl"
                ),
            )
        })?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "openssl {what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(())
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 test paths")
}

impl TestCa {
    /// A new CA (EC P-256, valid two days) named `name`, its files in `dir`.
    pub fn new(dir: &Path, name: &str) -> io::Result<TestCa> {
        std::fs::create_dir_all(dir)?;
        let cert = dir.join(format!("{name}.pem"));
        let key = dir.join(format!("{name}.key"));
        openssl(
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                s(&key),
                "-out",
                s(&cert),
                "-days",
                "2",
                "-subj",
                &format!("/CN={name}"),
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
            "making the CA",
        )?;
        Ok(TestCa {
            dir: dir.to_path_buf(),
            cert,
            key,
        })
    }

    /// A server certificate for 127.0.0.1 and localhost.
    pub fn server(&self, name: &str) -> io::Result<CertPair> {
        self.issue(
            name,
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
        )
    }

    /// A client certificate for `CN=name`.
    pub fn client(&self, name: &str) -> io::Result<CertPair> {
        self.issue(name, "extendedKeyUsage=clientAuth\n")
    }

    fn issue(&self, name: &str, ext: &str) -> io::Result<CertPair> {
        let key = self.dir.join(format!("{name}.key"));
        let csr = self.dir.join(format!("{name}.csr"));
        let cert = self.dir.join(format!("{name}.pem"));
        let extfile = self.dir.join(format!("{name}.ext"));
        std::fs::write(
            &extfile,
            format!("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n{ext}"),
        )?;
        openssl(
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                s(&key),
                "-out",
                s(&csr),
                "-subj",
                &format!("/CN={name}"),
            ],
            "making a key and request",
        )?;
        openssl(
            &[
                "x509",
                "-req",
                "-in",
                s(&csr),
                "-CA",
                s(&self.cert),
                "-CAkey",
                s(&self.key),
                "-CAcreateserial",
                "-out",
                s(&cert),
                "-days",
                "2",
                "-extfile",
                s(&extfile),
            ],
            "signing a certificate",
        )?;
        Ok(CertPair { cert, key })
    }
}
