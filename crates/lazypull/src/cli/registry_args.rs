//! How the commands reach and log in to a registry (shared by push, convert,
//! pull, optimize and mount): the flags, the credentials they name, the
//! host configuration (containerd's `hosts.toml`) they read, and the client
//! options they imply. The daemon's registry settings are its config's, not
//! these.

use std::path::PathBuf;

use anyhow::{bail, Context};
use lazypull_backend::registry::{
    docker_config_credentials, ClientOptions, Credentials, Reference, Registry,
};

/// How to reach and log in to a registry (shared by push, convert and mount).
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct RegistryArgs {
    /// Registry user name. Also LAZYPULL_REGISTRY_USER. Without a user, the
    /// docker config file (`docker login`) is consulted.
    #[arg(long, env = "LAZYPULL_REGISTRY_USER", value_name = "USER")]
    pub(crate) username: Option<String>,
    /// Read the registry password from standard input (one line). Also
    /// LAZYPULL_REGISTRY_PASSWORD.
    #[arg(long)]
    pub(crate) password_stdin: bool,
    /// Speak plain HTTP to the registry (loopback registries always do).
    #[arg(long)]
    pub(crate) insecure: bool,
    /// Extra trusted root certificate (PEM); repeatable.
    #[arg(long = "ca-file", value_name = "FILE")]
    pub(crate) ca_files: Vec<PathBuf>,
    /// Docker-style config file with credentials. Default:
    /// $DOCKER_CONFIG/config.json, then ~/.docker/config.json.
    #[arg(long, value_name = "FILE")]
    pub(crate) docker_config: Option<PathBuf>,
    /// containerd's registry host directory, read as containerd and the
    /// daemon read it: `<DIR>/<host>/hosts.toml` (else
    /// `<DIR>/_default/hosts.toml`) declares a registry's mirrors (for
    /// reads: manifests and blobs come through them, pushes go to the
    /// registry itself), its TLS (`ca`, `client`, `skip_verify`), `server`
    /// and headers. Also LAZYPULL_HOSTS_DIR; "" reads none. (What a daemon
    /// fetches for `mount` goes by the daemon's own `hosts_dir`.)
    #[arg(
        long,
        env = "LAZYPULL_HOSTS_DIR",
        value_name = "DIR",
        default_value = crate::config::DEFAULT_HOSTS_DIR,
        value_parser = crate::config::path_or_empty
    )]
    pub(crate) hosts_dir: PathBuf,
}

impl RegistryArgs {
    /// Credentials from flags/env, else from the docker config file.
    pub(crate) fn credentials(&self, registry: &str) -> anyhow::Result<Option<Credentials>> {
        let password = if self.password_stdin {
            let mut line = String::new();
            std::io::stdin()
                .read_line(&mut line)
                .context("reading the password from standard input")?;
            Some(line.trim_end_matches(['\r', '\n']).to_owned())
        } else {
            std::env::var("LAZYPULL_REGISTRY_PASSWORD").ok()
        };
        match (&self.username, password) {
            (Some(u), Some(p)) => Ok(Some(Credentials {
                username: u.clone(),
                password: p,
            })),
            (Some(u), None) => bail!(
                "a user name ({u}) but no password: pass --password-stdin or set LAZYPULL_REGISTRY_PASSWORD"
            ),
            (None, Some(_)) if self.password_stdin => {
                bail!("--password-stdin needs --username (or LAZYPULL_REGISTRY_USER)")
            }
            (None, _) => Ok(docker_config_credentials(self.docker_config.as_deref(), registry)?),
        }
    }

    pub(crate) fn client_options(&self, registry: &str) -> ClientOptions {
        let docker_config = self.docker_config.clone();
        let mut o = ClientOptions {
            ca_files: self.ca_files.clone(),
            hosts_dir: (!self.hosts_dir.as_os_str().is_empty()).then(|| self.hosts_dir.clone()),
            // A mirror gets its own credentials (by its host name), never
            // the registry's: as the daemon does.
            mirror_credentials: Some(lazypull_backend::CredentialLookup(std::sync::Arc::new(
                move |host: &str| docker_config_credentials(docker_config.as_deref(), host),
            ))),
            ..ClientOptions::default()
        };
        if self.insecure {
            o.insecure_hosts.push(registry.to_owned());
        }
        o
    }

    pub(crate) fn connect(&self, reference: &Reference) -> anyhow::Result<Registry> {
        let creds = self.credentials(&reference.registry)?;
        self.connect_with(reference, creds)
    }

    /// A client for `reference` logging in with `creds`.
    pub(crate) fn connect_with(
        &self,
        reference: &Reference,
        creds: Option<Credentials>,
    ) -> anyhow::Result<Registry> {
        Ok(Registry::new(
            &reference.registry,
            &reference.repository,
            creds,
            &self.client_options(&reference.registry),
        )?)
    }

    /// Clients for two registries, `flags_for` the one the flag or
    /// environment credentials belong to (`convert`'s target). Credentials
    /// are scoped per registry host: `other` gets them only when it is on
    /// the same `host[:port]`; elsewhere it gets the docker config's entry
    /// for its own host (or none). The password is read once.
    pub(crate) fn connect_pair(
        &self,
        flags_for: &Reference,
        other: &Reference,
    ) -> anyhow::Result<(Registry, Registry)> {
        let creds = self.credentials(&flags_for.registry)?;
        let other_creds = if other.registry.eq_ignore_ascii_case(&flags_for.registry) {
            creds.clone()
        } else {
            docker_config_credentials(self.docker_config.as_deref(), &other.registry)?
        };
        Ok((
            self.connect_with(flags_for, creds)?,
            self.connect_with(other, other_creds)?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        registry: RegistryArgs,
    }

    #[test]
    fn hosts_dir_defaults_to_containerds_and_an_empty_one_reads_none() {
        let default = Cli::try_parse_from(["lazypull"]).unwrap();
        assert_eq!(
            default.registry.client_options("r.lan").hosts_dir,
            Some(PathBuf::from(crate::config::DEFAULT_HOSTS_DIR))
        );
        let none = Cli::try_parse_from(["lazypull", "--hosts-dir", ""])
            .unwrap_or_else(|e| panic!("--hosts-dir \"\" refused: {e}"));
        assert_eq!(none.registry.client_options("r.lan").hosts_dir, None);
    }
}
