//! How the commands reach and log in to a registry (shared by push, convert
//! and mount): the flags, the credentials they name, and the client options
//! they imply. The daemon's registry settings are its config's, not these.

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
        let mut o = ClientOptions {
            ca_files: self.ca_files.clone(),
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
