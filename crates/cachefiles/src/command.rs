//! Text commands written to `/dev/cachefiles`.
//!
//! The kernel takes one command per `write()`: `"<verb> <args>"`, no NUL byte
//! anywhere (a NUL makes the whole write fail with EINVAL), at most a page long.

use std::fmt;
use std::path::PathBuf;

/// A command for the cachefiles device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `dir <path>`: the cache's root directory (must be on a file system with
    /// xattrs, tmpfile, statfs and sync_fs: ext4 works, tmpfs does not).
    Dir(PathBuf),
    /// `tag <name>`: names this cache; several caches can coexist under different tags.
    Tag(String),
    /// `bind ondemand`: start the cache in on-demand read mode (after `dir`/`tag`).
    BindOndemand,
    /// `copen <msg_id>,<size>`: accept an OPEN; the object's size becomes `size`.
    Copen { msg_id: u32, size: u64 },
    /// `copen <msg_id>,-<errno>`: refuse an OPEN; the mount (or read) fails with `errno`.
    CopenError { msg_id: u32, errno: i32 },
    /// `restore`: re-queue every request a previous daemon read but never answered
    /// (Linux 6.8+). Used by a daemon that took over the device fd.
    Restore,
    /// `cull <name>`: delete the cache file `name` in the *writer's current
    /// working directory* (the kernel takes `current->fs->pwd`; the name may
    /// not hold a `/`), unless it is in use (EBUSY: an object the kernel has
    /// open, marked `S_KERNEL_FILE`). Gone files are ESTALE.
    Cull(String),
    /// Culling thresholds, in percent of free space (`brun`, `bcull`, `bstop`)
    /// and of free files (`frun`, `fcull`, `fstop`).
    Limit(Limit, u8),
}

/// The culling thresholds the device accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Brun,
    Bcull,
    Bstop,
    Frun,
    Fcull,
    Fstop,
}

/// A command that cannot be written to the device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("{0} contains a NUL byte, which the device rejects")]
    Nul(&'static str),
    #[error("{0} must not be empty")]
    Empty(&'static str),
    #[error("copen errno must be a positive errno value (1..=4095), got {0}")]
    BadErrno(i32),
    #[error("cull limit must be a percentage below 100, got {0}")]
    BadPercent(u8),
    #[error("cull names a file in the current directory, without '/': {0:?}")]
    CullPath(String),
    #[error("cache dir path is not valid UTF-8: {0:?}")]
    NonUtf8Path(PathBuf),
}

impl Command {
    /// The exact bytes to `write()` to the device, after validation.
    pub fn encode(&self) -> Result<Vec<u8>, CommandError> {
        match self {
            Command::Dir(path) => {
                let s = path
                    .to_str()
                    .ok_or_else(|| CommandError::NonUtf8Path(path.clone()))?;
                check_arg("dir", s)?;
            }
            Command::Tag(tag) => check_arg("tag", tag)?,
            Command::Cull(name) => {
                check_arg("cull", name)?;
                if name.contains('/') || name == "." || name == ".." {
                    return Err(CommandError::CullPath(name.clone()));
                }
            }
            Command::CopenError { errno, .. } if !(1..=4095).contains(errno) => {
                return Err(CommandError::BadErrno(*errno))
            }
            Command::Limit(_, pct) if *pct >= 100 => return Err(CommandError::BadPercent(*pct)),
            _ => {}
        }
        Ok(self.to_string().into_bytes())
    }
}

fn check_arg(what: &'static str, s: &str) -> Result<(), CommandError> {
    if s.is_empty() {
        return Err(CommandError::Empty(what));
    }
    if s.contains('\0') {
        return Err(CommandError::Nul(what));
    }
    Ok(())
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Dir(p) => write!(f, "dir {}", p.display()),
            Command::Tag(t) => write!(f, "tag {t}"),
            Command::BindOndemand => f.write_str("bind ondemand"),
            Command::Copen { msg_id, size } => write!(f, "copen {msg_id},{size}"),
            Command::CopenError { msg_id, errno } => write!(f, "copen {msg_id},-{errno}"),
            Command::Restore => f.write_str("restore"),
            Command::Cull(name) => write!(f, "cull {name}"),
            Command::Limit(limit, pct) => {
                let verb = match limit {
                    Limit::Brun => "brun",
                    Limit::Bcull => "bcull",
                    Limit::Bstop => "bstop",
                    Limit::Frun => "frun",
                    Limit::Fcull => "fcull",
                    Limit::Fstop => "fstop",
                };
                write!(f, "{verb} {pct}%")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(c: Command) -> String {
        String::from_utf8(c.encode().unwrap()).unwrap()
    }

    #[test]
    fn commands_have_the_kernel_syntax() {
        assert_eq!(
            enc(Command::Dir("/var/cache/lp".into())),
            "dir /var/cache/lp"
        );
        assert_eq!(enc(Command::Tag("lazypull".into())), "tag lazypull");
        assert_eq!(enc(Command::BindOndemand), "bind ondemand");
        assert_eq!(
            enc(Command::Copen {
                msg_id: 12,
                size: 4096
            }),
            "copen 12,4096"
        );
        assert_eq!(
            enc(Command::CopenError {
                msg_id: 3,
                errno: libc::ENOENT
            }),
            "copen 3,-2"
        );
        assert_eq!(enc(Command::Restore), "restore");
        assert_eq!(enc(Command::Cull("Dsha256-ab".into())), "cull Dsha256-ab");
        assert_eq!(enc(Command::Limit(Limit::Bcull, 7)), "bcull 7%");
    }

    #[test]
    fn invalid_commands_are_refused() {
        assert_eq!(
            Command::Tag("a\0b".into()).encode(),
            Err(CommandError::Nul("tag"))
        );
        assert_eq!(
            Command::Tag(String::new()).encode(),
            Err(CommandError::Empty("tag"))
        );
        assert_eq!(
            Command::CopenError {
                msg_id: 1,
                errno: 0
            }
            .encode(),
            Err(CommandError::BadErrno(0))
        );
        assert_eq!(
            Command::CopenError {
                msg_id: 1,
                errno: 5000
            }
            .encode(),
            Err(CommandError::BadErrno(5000))
        );
        for bad in ["a/b", "..", "."] {
            assert_eq!(
                Command::Cull(bad.into()).encode(),
                Err(CommandError::CullPath(bad.into()))
            );
        }
        assert_eq!(
            Command::Cull(String::new()).encode(),
            Err(CommandError::Empty("cull"))
        );
        assert_eq!(
            Command::Limit(Limit::Fstop, 100).encode(),
            Err(CommandError::BadPercent(100))
        );
    }
}
