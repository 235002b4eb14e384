//! `digest`: the per-unit digest candidates (SHA-256 from `sha2`, BLAKE3 from
//! `blake3`, single-threaded) hashing the same units, with zstd decoding of those
//! units (at the level `pack` uses by default) as the reference a cold READ also
//! pays. Every figure is a median over rounds; ratios are taken per round.
//!
//! Run it natively and under qemu's TCG (`qemu-x86_64 -cpu max`, the CPU model the
//! test guest boots with) to see both sides of issue 13.

use std::hint::black_box;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use sha2::{Digest, Sha256};

/// What the units hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Data {
    /// Pseudo-random words (seeded): compressible, so zstd has work to do.
    Words,
    /// Pseudo-random bytes: incompressible, so every unit is stored raw (decode = copy).
    Random,
}

pub struct Args {
    pub mib: usize,
    pub units: Vec<u32>,
    pub rounds: u32,
    pub data: Data,
    pub input: Option<PathBuf>,
    pub json: bool,
}

/// xorshift64: deterministic, fast, good enough for benchmark bytes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

fn make_data(data: Data, len: usize) -> Vec<u8> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut out = Vec::with_capacity(len + 16);
    match data {
        Data::Random => {
            while out.len() < len {
                out.extend_from_slice(&rng.next().to_le_bytes());
            }
        }
        Data::Words => {
            // A vocabulary of 4096 random lowercase words of 2..=12 letters,
            // drawn uniformly: zstd-3 gets roughly what it gets on text.
            let vocab: Vec<Vec<u8>> = (0..4096)
                .map(|_| {
                    let n = 2 + (rng.next() % 11) as usize;
                    (0..n).map(|_| b'a' + (rng.next() % 26) as u8).collect()
                })
                .collect();
            while out.len() < len {
                let r = rng.next();
                out.extend_from_slice(&vocab[(r % 4096) as usize]);
                out.push(if r >> 60 == 0 { b'\n' } else { b' ' });
            }
        }
    }
    out.truncate(len);
    out
}

struct Stored {
    /// `Some(frame)` when zstd made the unit strictly smaller (as `pack` decides).
    frame: Option<Vec<u8>>,
    len: usize,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Seconds for one pass of `f` over all units.
fn time(mut f: impl FnMut()) -> f64 {
    let t = Instant::now();
    f();
    t.elapsed().as_secs_f64()
}

pub fn run(args: &Args) -> Result<()> {
    if args.rounds == 0 || args.mib == 0 || args.units.is_empty() {
        bail!("--rounds, --mib and --units must be non-zero");
    }
    let len = args.mib << 20;
    let (bytes, what) = match &args.input {
        Some(path) => {
            let mut b =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            if b.len() < len {
                bail!(
                    "{} has {} bytes, fewer than --mib {} asks for",
                    path.display(),
                    b.len(),
                    args.mib
                );
            }
            b.truncate(len);
            (b, format!("first {} MiB of {}", args.mib, path.display()))
        }
        None => (
            make_data(args.data, len),
            format!(
                "{} MiB of {}",
                args.mib,
                match args.data {
                    Data::Words => "pseudo-random words",
                    Data::Random => "pseudo-random bytes",
                }
            ),
        ),
    };
    let level = match lazypull_blob::Compression::default() {
        lazypull_blob::Compression::Zstd { level } => level,
        lazypull_blob::Compression::None => bail!("pack's default stores raw units"),
    };
    let mut cctx = zstd::bulk::Compressor::new(level)?;
    let mut dctx = zstd::bulk::Decompressor::new()?;
    let mut rows = Vec::new();
    for &unit in &args.units {
        lazypull_blob::format::check_unit_size(unit)?;
        let pieces: Vec<&[u8]> = bytes.chunks(unit as usize).collect();
        let stored: Vec<Stored> = pieces
            .iter()
            .map(|p| {
                let frame = cctx.compress(p)?;
                Ok(Stored {
                    frame: (frame.len() < p.len()).then_some(frame),
                    len: p.len(),
                })
            })
            .collect::<Result<_>>()?;
        let stored_bytes: usize = stored
            .iter()
            .map(|s| s.frame.as_ref().map_or(s.len, Vec::len))
            .sum();
        let zstd_units = stored.iter().filter(|s| s.frame.is_some()).count();
        let mut out = vec![0u8; unit as usize];
        let (mut sha, mut b3, mut dec) = (Vec::new(), Vec::new(), Vec::new());
        let (mut r_b3_sha, mut share_sha, mut share_b3) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..args.rounds {
            let t_sha = time(|| {
                for p in &pieces {
                    black_box(Sha256::digest(black_box(p)));
                }
            });
            let t_b3 = time(|| {
                for p in &pieces {
                    black_box(blake3::hash(black_box(p)));
                }
            });
            let mut failed = None;
            let t_dec = time(|| {
                for (s, p) in stored.iter().zip(&pieces) {
                    let dst = &mut out[..s.len];
                    match &s.frame {
                        Some(f) => match dctx.decompress_to_buffer(black_box(f), dst) {
                            Ok(n) if n == s.len => {}
                            Ok(n) => failed = Some(format!("decompressed {n} of {}", s.len)),
                            Err(e) => failed = Some(e.to_string()),
                        },
                        None => dst.copy_from_slice(black_box(p)),
                    }
                    black_box(&*dst);
                }
            });
            if let Some(e) = failed {
                bail!("zstd decode of a {unit}-byte unit: {e}");
            }
            r_b3_sha.push(t_sha / t_b3);
            share_sha.push(t_sha / (t_sha + t_dec));
            share_b3.push(t_b3 / (t_b3 + t_dec));
            sha.push(len as f64 / t_sha / 1e6);
            b3.push(len as f64 / t_b3 / 1e6);
            dec.push(len as f64 / t_dec / 1e6);
        }
        rows.push(serde_json::json!({
            "unit_bytes": unit,
            "units": pieces.len(),
            "zstd_units": zstd_units,
            "stored_ratio": len as f64 / stored_bytes as f64,
            "sha256_mb_s": median(&mut sha),
            "blake3_mb_s": median(&mut b3),
            "zstd_decode_mb_s": median(&mut dec),
            "blake3_speedup": median(&mut r_b3_sha),
            "sha256_share_of_decode_plus_hash": median(&mut share_sha),
            "blake3_share_of_decode_plus_hash": median(&mut share_b3),
        }));
    }
    let report = serde_json::json!({
        "data": what,
        "zstd_level": level,
        "rounds": args.rounds,
        "blake3_simd": blake3_simd(),
        "sha_ni": sha_ni(),
        "results": rows,
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "Per-unit digest over {what}, zstd level {level}, median of {} rounds; MB/s of uncompressed bytes; \
         speedup = SHA-256 time / BLAKE3 time per round; share = hash time / (zstd decode + hash time).",
        args.rounds
    );
    println!("| unit | stored ratio | SHA-256 MB/s | BLAKE3 MB/s | BLAKE3 speedup | zstd decode MB/s | SHA-256 share | BLAKE3 share |");
    println!("|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} KiB | {:.2} | {:.0} | {:.0} | **{:.2}×** | {:.0} | {:.0}% | {:.0}% |",
            r["unit_bytes"].as_u64().unwrap_or(0) >> 10,
            r["stored_ratio"].as_f64().unwrap_or(0.0),
            r["sha256_mb_s"].as_f64().unwrap_or(0.0),
            r["blake3_mb_s"].as_f64().unwrap_or(0.0),
            r["blake3_speedup"].as_f64().unwrap_or(0.0),
            r["zstd_decode_mb_s"].as_f64().unwrap_or(0.0),
            100.0
                * r["sha256_share_of_decode_plus_hash"]
                    .as_f64()
                    .unwrap_or(0.0),
            100.0
                * r["blake3_share_of_decode_plus_hash"]
                    .as_f64()
                    .unwrap_or(0.0),
        );
    }
    println!("BLAKE3 SIMD level: {}; SHA-NI: {}", blake3_simd(), sha_ni());
    Ok(())
}

/// The widest x86 SIMD level BLAKE3 can pick at run time on this CPU (what it
/// detects the same way); "portable" elsewhere.
fn blake3_simd() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vl")
        {
            return "avx512";
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            return "avx2";
        }
        if std::arch::is_x86_feature_detected!("sse4.1") {
            return "sse41";
        }
        if std::arch::is_x86_feature_detected!("sse2") {
            return "sse2";
        }
    }
    "portable"
}

/// Whether the CPU has the SHA extensions `sha2` uses when present.
fn sha_ni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("sha")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_compress_and_random_bytes_do_not() {
        let words = make_data(Data::Words, 1 << 20);
        let random = make_data(Data::Random, 1 << 20);
        assert_eq!(words.len(), 1 << 20);
        assert_eq!(words, make_data(Data::Words, 1 << 20), "seeded");
        let z = |b: &[u8]| zstd::bulk::compress(b, 3).unwrap().len();
        assert!(
            z(&words) * 2 < words.len(),
            "words must compress (zstd has work)"
        );
        assert!(z(&random) >= random.len(), "random bytes must not compress");
    }

    #[test]
    fn runs_small_and_refuses_bad_unit_sizes() {
        let args = |units| Args {
            mib: 1,
            units,
            rounds: 1,
            data: Data::Words,
            input: None,
            json: true,
        };
        run(&args(vec![65536])).unwrap();
        let err = run(&args(vec![1000])).unwrap_err().to_string();
        assert!(err.contains("invalid unit size 1000"), "{err}");
    }
}
