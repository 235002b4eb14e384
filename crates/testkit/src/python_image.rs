//! An ordinary OCI image around Debian's real python3.11 (issue 12's "a real
//! program"): the interpreter with the shared libraries it links and its
//! standard library, copied from this host. The lazy pull tests run it and
//! `lazypull-bench containers` measures its start.

use std::collections::BTreeSet;
use std::io;
use std::path::Path;
use std::process::Command;

use crate::oci_image::{Image, LayerBuilder};

/// Debian's python3.11 interpreter.
pub const PYTHON: &str = "/usr/bin/python3.11";
/// Its standard library.
pub const PYTHON_LIB: &str = "/usr/lib/python3.11";

/// What [`python_image`]'s container prints (one line).
pub const PYTHON_OUTPUT: &str = "hello-python from /srv as 0; argv ['from-cmd']; \
    json {\"layers\": [1, 2, 3]}; crc 630555178; stdlib os.py found; python 3.11";

fn other(msg: String) -> io::Error {
    io::Error::other(msg)
}

/// The shared libraries `binary` loads, as `ldd` resolves them (the loader
/// included): absolute paths.
pub fn shared_libraries(binary: &str) -> io::Result<Vec<String>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .map_err(|e| other(format!("running ldd (apt-get install libc-bin): {e}")))?;
    if !out.status.success() {
        return Err(other(format!(
            "ldd {binary} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            // "libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x...)" or
            // "/lib64/ld-linux-x86-64.so.2 (0x...)"; vdso has no file.
            let l = l.trim();
            let path = match l.split_once("=> ") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| path.to_owned())
        })
        .collect())
}

/// Adds `path` (absolute, on the host) as a regular file with the host
/// file's bytes (symlinks followed) and parents not yet in `dirs`.
pub fn add_host_file(
    mut layer: LayerBuilder,
    dirs: &mut BTreeSet<String>,
    path: &str,
    mode: u32,
) -> io::Result<LayerBuilder> {
    let rel = path.trim_start_matches('/');
    let parts: Vec<&str> = rel.split('/').collect();
    let mut parent = String::new();
    for part in &parts[..parts.len().saturating_sub(1)] {
        if !parent.is_empty() {
            parent.push('/');
        }
        parent.push_str(part);
        if dirs.insert(parent.clone()) {
            layer = layer.dir(&parent, 0o755)?;
        }
    }
    let data = std::fs::read(path).map_err(|e| other(format!("reading {path}: {e}")))?;
    layer.file(rel, &data, mode)
}

/// The image, three layers: the interpreter and the shared libraries it
/// links (as `ldd` names them); the standard library (`/usr/lib/python3.11`
/// without `test` and the static `config-*` directory; symlinks pointing out
/// of it dropped), some 30 MB; and the program `/srv/app.py`. Config:
/// `Entrypoint ["/usr/bin/python3", "/srv/app.py"]`, `Cmd ["from-cmd"]`,
/// `Env` with `GREETING`, `WorkingDir "/srv"`. It prints [`PYTHON_OUTPUT`].
/// Fails naming the package when python3.11 is not installed.
pub fn python_image() -> io::Result<Image> {
    if !(Path::new(PYTHON).is_file() && Path::new(PYTHON_LIB).is_dir()) {
        return Err(other(format!(
            "{PYTHON} and {PYTHON_LIB} are needed (apt-get install python3.11)"
        )));
    }
    let mut dirs = BTreeSet::new();
    let mut runtime = add_host_file(LayerBuilder::new(), &mut dirs, PYTHON, 0o755)?;
    runtime = runtime.symlink("usr/bin/python3", "python3.11")?;
    for lib in shared_libraries(PYTHON)? {
        runtime = add_host_file(runtime, &mut dirs, &lib, 0o755)?;
    }
    let runtime = runtime.dir("tmp", 0o1777)?.finish()?;

    let mut stdlib = LayerBuilder::new()
        .dir("usr", 0o755)?
        .dir("usr/lib", 0o755)?;
    let root = Path::new(PYTHON_LIB);
    let walk = walkdir::WalkDir::new(root)
        .sort_by_file_name()
        .into_iter()
        .filter_entry(|e| {
            let name = e.file_name().to_string_lossy();
            !(e.depth() == 1 && (name == "test" || name.starts_with("config-")))
        });
    for entry in walk {
        let entry = entry.map_err(|e| other(format!("walking {PYTHON_LIB}: {e}")))?;
        let Some(rel) = entry.path().strip_prefix("/").ok().and_then(|p| p.to_str()) else {
            continue;
        };
        let kind = entry.file_type();
        if kind.is_dir() {
            stdlib = stdlib.dir(rel, 0o755)?;
        } else if kind.is_symlink() {
            let target = std::fs::read_link(entry.path())?;
            if let Some(target) = target.to_str() {
                if !target.starts_with('/') && !target.contains("..") {
                    stdlib = stdlib.symlink(rel, target)?;
                }
            }
        } else if kind.is_file() {
            let data = std::fs::read(entry.path())
                .map_err(|e| other(format!("reading {}: {e}", entry.path().display())))?;
            stdlib = stdlib.file(rel, &data, 0o644)?;
        }
    }
    let stdlib = stdlib.finish()?;

    let app = concat!(
        "import json, os, sys, zlib\n",
        "print(f\"{os.environ['GREETING']} from {os.getcwd()} as {os.getuid()}; \"\n",
        "      f\"argv {sys.argv[1:]}; json {json.dumps({'layers': [1, 2, 3]})}; \"\n",
        "      f\"crc {zlib.crc32(b'lazypull')}; \"\n",
        "      f\"stdlib {os.path.basename(os.__file__)} found; \"\n",
        "      f\"python {sys.version_info[0]}.{sys.version_info[1]}\")\n",
    );
    let app = LayerBuilder::new()
        .dir("srv", 0o755)?
        .file("srv/app.py", app.as_bytes(), 0o644)?
        .finish()?;
    Image::new(
        vec![runtime, stdlib, app],
        serde_json::json!({
            "Env": ["PATH=/usr/bin:/bin", "GREETING=hello-python", "PYTHONDONTWRITEBYTECODE=1"],
            "Entrypoint": ["/usr/bin/python3", "/srv/app.py"],
            "Cmd": ["from-cmd"],
            "WorkingDir": "/srv",
        }),
    )
}
