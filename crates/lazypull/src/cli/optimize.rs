//! `lazypull optimize`: records what a workload reads first from a lazy
//! image and publishes the image again with that order, which the daemon
//! then fetches first at every mount.
//!
//! The workload runs once, as root, chrooted in the image: the image is
//! registered with the running daemon and mounted (as `lazypull mount`
//! does, without prefetching), an overlay gives it a writable root (upper
//! and work dirs in a scratch dir), `/proc` and `/dev` are mounted in it
//! where the image has those directories. The daemon records, in order, the
//! data blob ranges the workload's reads waited for (first touch only) and
//! maps them back to files and ranges within them through the meta blob
//! (`catalog::recorded`). The record becomes a blob of the target repository
//! named by the manifest's annotations (`lazypull_oci::prefetch`); the
//! layers and config are the source's, copied when the target repository
//! lacks them.
//!
//! Containers are not used to run the workload: a chroot on the same mount
//! reads the same files, and recording needs no more.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use lazypull_backend::registry::{docker_config_credentials, Reference, Registry};
use lazypull_oci::lazy::{self, BlobRef, LazyImage};
use lazypull_oci::prefetch::Record;
use rustix::mount::{MountFlags, UnmountFlags};
use sha2::{Digest, Sha256};

use super::mount::{mount_image, ImageTrust};
use super::registry_args::RegistryArgs;
use crate::control::{self, PrefetchSpec, RegisterRequest, Request};

#[derive(Debug, clap::Args)]
pub struct OptimizeArgs {
    /// The lazy image to record: REGISTRY/REPOSITORY[:TAG|@DIGEST].
    pub(crate) source: String,
    /// Where to push the image with its recorded prefetch order:
    /// REGISTRY/REPOSITORY:TAG (may be the source's repository). The
    /// --username / --password-stdin credentials (and the environment's) are
    /// this registry's; the source gets them only on the same registry host.
    #[arg(long, value_name = "REF")]
    pub(crate) out: String,
    #[command(flatten)]
    pub(crate) registry: RegistryArgs,
    /// The daemon's control socket. Its cache must not hold the image's data
    /// yet (reads of cached bytes would not show in the record).
    #[arg(long, value_name = "PATH", default_value = control::DEFAULT_SOCKET)]
    pub(crate) socket: PathBuf,
    /// Scratch directory for the mounts and the overlay's upper dir (default: a
    /// temporary directory, removed afterwards).
    #[arg(long, value_name = "DIR")]
    pub(crate) work_dir: Option<PathBuf>,
    /// Publish the record even if the workload exits non-zero.
    #[arg(long)]
    pub(crate) allow_failure: bool,
    /// Print the result as JSON on stdout (the workload's own output goes to
    /// stderr then).
    #[arg(long)]
    pub(crate) json: bool,
    /// The workload and its arguments, run chrooted in the image as root, in
    /// `/`, with the image config's Env (PATH, unless it sets one, is
    /// /usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin; HOME=/root).
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub(crate) command: Vec<String>,
}

/// PATH inside the image.
const IMAGE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The mounts made for the workload, undone in reverse order on drop.
struct Mounts {
    socket: PathBuf,
    /// The EROFS mount, which the daemon knows of.
    image: Option<PathBuf>,
    /// Overlay, /proc, /dev: detached (with what is below them) on drop.
    others: Vec<PathBuf>,
}

impl Mounts {
    fn undo(&mut self) -> anyhow::Result<()> {
        while let Some(m) = self.others.pop() {
            rustix::mount::unmount(&m, UnmountFlags::DETACH)
                .with_context(|| format!("unmounting {}", m.display()))?;
        }
        if let Some(m) = self.image.take() {
            rustix::mount::unmount(&m, UnmountFlags::empty())
                .with_context(|| format!("unmounting the image at {}", m.display()))?;
            control::call(
                &self.socket,
                &Request::Unmounted { mountpoint: m },
                Duration::from_secs(30),
            )
            .context("telling the daemon about the unmount")?;
        }
        Ok(())
    }
}

impl Drop for Mounts {
    fn drop(&mut self) {
        if let Err(e) = self.undo() {
            tracing::warn!("cleaning up the workload's mounts: {e:#}");
        }
    }
}

/// A path for an overlay option: its separators (`,` `:`) and `\` would
/// need escaping, which a scratch path never needs.
/// `name` on this process's PATH (coreutils' chroot).
fn host_program(name: &str) -> anyhow::Result<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .with_context(|| format!("{name} is not on PATH (Debian's coreutils has it)"))
}

/// Largest image config read (they are a few KB; the bound keeps a hostile
/// registry from filling memory).
const MAX_CONFIG_SIZE: u64 = 4 << 20;

/// The image config's `config.Env` (`KEY=VALUE` strings), as a container of
/// the image gets it.
fn image_env(src: &Registry, digest: &str, size: u64) -> anyhow::Result<Vec<(String, String)>> {
    if size > MAX_CONFIG_SIZE {
        bail!("the image config is {size} bytes, more than the {MAX_CONFIG_SIZE} read");
    }
    let bytes = src.get_blob_sized(digest, size, &|_| {})?;
    let config: serde_json::Value =
        serde_json::from_slice(&bytes).context("the image config is not JSON")?;
    env_of(&config)
}

fn env_of(config: &serde_json::Value) -> anyhow::Result<Vec<(String, String)>> {
    let Some(env) = config.pointer("/config/Env") else {
        return Ok(Vec::new());
    };
    let env = env
        .as_array()
        .context("config.Env is not an array of strings")?;
    env.iter()
        .map(|e| {
            let e = e.as_str().context("config.Env holds a non-string")?;
            let (k, v) = e.split_once('=').unwrap_or((e, ""));
            if k.is_empty() {
                bail!("config.Env holds {e:?}, which names no variable");
            }
            Ok((k.to_owned(), v.to_owned()))
        })
        .collect()
}

fn overlay_path(p: &Path) -> anyhow::Result<String> {
    let s = p
        .to_str()
        .with_context(|| format!("{} is not UTF-8", p.display()))?;
    if s.contains([',', ':', '\\']) {
        bail!("the scratch path {s} contains ',', ':' or '\\', which overlay options cannot hold: pass another --work-dir");
    }
    Ok(s.to_owned())
}

/// Copies blob `d` from `src` to `dst` unless `dst` has it; the bytes it moved.
fn copy_blob(src: &Registry, dst: &Registry, d: &BlobRef, scratch: &Path) -> anyhow::Result<u64> {
    if dst.blob_size(&d.digest)?.is_some() {
        return Ok(0);
    }
    let mut file = tempfile::tempfile_in(scratch).context("creating a scratch file")?;
    src.get_blob_to_sized(&d.digest, d.size, &mut file, &|_| {})
        .with_context(|| format!("downloading {}", d.digest))?;
    file.flush()?;
    let open = || -> std::io::Result<Box<dyn Read + Send>> {
        let mut f = file.try_clone()?;
        f.rewind()?;
        Ok(Box::new(f))
    };
    dst.push_blob(&d.digest, d.size, &open, &|_| {})
        .with_context(|| format!("uploading {}", d.digest))?;
    Ok(d.size)
}

pub fn optimize(args: OptimizeArgs) -> anyhow::Result<()> {
    let source = Reference::parse(&args.source)?;
    let target = Reference::parse(&args.out)?;
    if target.is_digest() {
        bail!("--out needs a tag, not a digest: {target}");
    }
    // The password is read once: the target's, and the source's on the same host.
    let creds = args.registry.credentials(&target.registry)?;
    let src_creds = if source.registry.eq_ignore_ascii_case(&target.registry) {
        creds.clone()
    } else {
        docker_config_credentials(args.registry.docker_config.as_deref(), &source.registry)?
    };
    let dst = args.registry.connect_with(&target, creds)?;
    let src = args.registry.connect_with(&source, src_creds.clone())?;
    let manifest = src
        .get_manifest(&source.reference)
        .with_context(|| format!("fetching the manifest of {source}"))?;
    let (parsed, image) = LazyImage::parse_manifest(&manifest.bytes).with_context(|| {
        format!("{source} (optimize takes lazy images: `lazypull convert` makes them)")
    })?;

    let env = image_env(&src, &parsed.config.digest, parsed.config.size)
        .with_context(|| format!("reading the image config of {source}"))?;

    let scratch = tempfile::tempdir().context("creating a temporary directory")?;
    let work = args
        .work_dir
        .clone()
        .unwrap_or_else(|| scratch.path().to_owned());
    let (lower, upper, ovl_work, root) = (
        work.join("image"),
        work.join("upper"),
        work.join("work"),
        work.join("root"),
    );
    for d in [&lower, &upper, &ovl_work, &root] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }

    // Registered pinned to the manifest just read: the record is of the image
    // published, even if the tag moves meanwhile.
    let pinned = format!(
        "{}/{}@{}",
        source.registry, source.repository, manifest.digest
    );
    let req = RegisterRequest {
        reference: pinned,
        fsid: None,
        username: src_creds.as_ref().map(|c| c.username.clone()),
        password: src_creds.map(|c| c.password),
        insecure: args.registry.insecure,
    };
    let mounted = mount_image(
        &args.socket,
        req,
        &args.source,
        Some(image.meta_hex()),
        &lower,
        None,
        &PrefetchSpec {
            skip_record: true,
            ..PrefetchSpec::default()
        },
        ImageTrust {
            suid: true,
            dev: false,
        },
    )?;
    let fsid = mounted.registered.fsid.clone();
    let mut mounts = Mounts {
        socket: args.socket.clone(),
        image: Some(mounted.mountpoint.clone()),
        others: Vec::new(),
    };

    let ovl = format!(
        "lowerdir={},upperdir={},workdir={}",
        overlay_path(&mounted.mountpoint)?,
        overlay_path(&upper)?,
        overlay_path(&ovl_work)?
    );
    let ovl = std::ffi::CString::new(ovl).context("overlay options with a NUL byte")?;
    rustix::mount::mount(
        "overlay",
        &root,
        "overlay",
        MountFlags::empty(),
        Some(ovl.as_c_str()),
    )
    .with_context(|| format!("mounting an overlay on the image at {}", root.display()))?;
    mounts.others.push(root.clone());
    if root.join("proc").is_dir() {
        rustix::mount::mount("proc", root.join("proc"), "proc", MountFlags::empty(), None)
            .context("mounting /proc in the image")?;
        mounts.others.push(root.join("proc"));
    }
    if root.join("dev").is_dir() {
        rustix::mount::mount_bind_recursive("/dev", root.join("dev"))
            .context("bind-mounting /dev in the image")?;
        mounts.others.push(root.join("dev"));
    }

    control::call(
        &args.socket,
        &Request::RecordStart { fsid: fsid.clone() },
        Duration::from_secs(30),
    )
    .context("asking the daemon to record")?;
    let started = Instant::now();
    // Found on the host's PATH: the child's environment is the image's.
    let mut cmd = Command::new(host_program("chroot")?);
    cmd.arg(&root)
        .args(&args.command)
        .env_clear()
        .env("PATH", IMAGE_PATH)
        .env("HOME", "/root")
        .envs(env)
        .current_dir("/");
    if args.json {
        // Stdout is the JSON result's.
        cmd.stdout(std::io::stderr());
    }
    let status = cmd.status();
    let workload_ms = started.elapsed().as_secs_f64() * 1000.0;
    let stopped = control::call(
        &args.socket,
        &Request::RecordStop { fsid: fsid.clone() },
        Duration::from_secs(120),
    )
    .context("asking the daemon for the record");
    mounts.undo()?;
    drop(mounts);
    let status = status.context("running the workload (chroot)")?;
    let stopped = stopped?;
    if !status.success() && !args.allow_failure {
        bail!(
            "the workload {:?} failed ({status}): nothing published (--allow-failure publishes anyway)",
            args.command
        );
    }
    let record: Record = serde_json::from_value(stopped["record"].clone())
        .context("the daemon's record is not valid")?;
    record.validate()?;
    let truncated = stopped["truncated"].as_bool().unwrap_or(false);
    if record.entries.is_empty() {
        bail!("the workload read nothing of the image's data blobs (or the daemon's cache held it all): nothing to record");
    }

    // Publish: the source's blobs (where the target lacks them), the record, the manifest.
    let mut copied = 0;
    let mut blobs = vec![BlobRef {
        digest: parsed.config.digest.clone(),
        size: parsed.config.size,
    }];
    blobs.extend(parsed.layers.iter().map(|l| BlobRef {
        digest: l.digest.clone(),
        size: l.size,
    }));
    for b in &blobs {
        copied += copy_blob(&src, &dst, b, &work)?;
    }
    let record_bytes = record.to_bytes();
    let record_ref = BlobRef {
        digest: format!("sha256:{}", hex::encode(Sha256::digest(&record_bytes))),
        size: record_bytes.len() as u64,
    };
    let record_path = work.join("prefetch-record.json");
    std::fs::write(&record_path, &record_bytes)
        .with_context(|| format!("writing {}", record_path.display()))?;
    let open =
        || -> std::io::Result<Box<dyn Read + Send>> { Ok(Box::new(File::open(&record_path)?)) };
    dst.push_blob(&record_ref.digest, record_ref.size, &open, &|_| {})
        .context("uploading the prefetch record")?;
    let out = lazy::with_prefetch_record(parsed, &record_ref);
    let out_bytes = serde_json::to_vec(&out)?;
    // What is published must read back as the same image with this record.
    LazyImage::parse_manifest(&out_bytes).context("the new manifest (a bug)")?;
    let manifest_digest = dst
        .put_manifest(&target.reference, lazy::MANIFEST_MEDIA_TYPE, &out_bytes)
        .with_context(|| format!("putting the manifest of {target}"))?;

    let result = serde_json::json!({
        "source": source.to_string(),
        "target": target.to_string(),
        "manifest_digest": manifest_digest,
        "record_digest": record_ref.digest,
        "record_entries": record.entries.len(),
        "record_bytes": record.bytes(),
        "traced_ranges": stopped["traced_ranges"],
        "truncated": truncated,
        "workload_exit": status.code(),
        "workload_ms": workload_ms,
        "copied_bytes": copied,
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&result)?);
    } else {
        println!(
            "pushed {target} ({manifest_digest}): {source} with a prefetch order of {} ranges, {} of data, recorded from {:?} ({status}, {:.0} ms){}",
            record.entries.len(),
            indicatif::HumanBytes(record.bytes()),
            args.command,
            workload_ms,
            if truncated { "; the trace hit its bound, later reads are not in it" } else { "" }
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::env_of;
    use serde_json::json;

    #[test]
    fn the_workload_gets_the_image_configs_env() {
        let env = env_of(
            &json!({"config": {"Env": ["PATH=/opt/bin:/usr/bin", "GREETING=hi=there", "EMPTY"]}}),
        )
        .unwrap();
        assert_eq!(
            env,
            [
                ("PATH".to_owned(), "/opt/bin:/usr/bin".to_owned()),
                ("GREETING".to_owned(), "hi=there".to_owned()),
                ("EMPTY".to_owned(), String::new()),
            ]
        );
        assert!(env_of(&json!({"config": {}})).unwrap().is_empty());
        assert!(env_of(&json!({"config": {"Env": "A=1"}})).is_err());
        assert!(env_of(&json!({"config": {"Env": ["=1"]}})).is_err());
    }
}
