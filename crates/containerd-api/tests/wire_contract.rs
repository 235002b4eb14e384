//! Our restated protos against containerd's own (the Go sources of
//! containerd 1.6 that Debian ships, golang-github-containerd-containerd-dev,
//! under /usr/share/gocode): both compiled with protox, containerd's with its
//! gogo options stripped (they shape only its Go code), and compared
//! package by package: the same messages, fields (name, number, label, type,
//! message type), enums (values and numbers) and services (methods, request
//! and reply types, streaming). A renumbered, retyped or missing field fails
//! here, naming it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use prost_types::{
    DescriptorProto, EnumDescriptorProto, FileDescriptorSet, ServiceDescriptorProto,
};

const GO_ROOT: &str = "/usr/share/gocode/src";
const CONTAINERD_API: &str = "github.com/containerd/containerd/api";

/// containerd's files we restate: (path under the api dir, package).
const RESTATED: &[(&str, &str)] = &[
    ("types/mount.proto", "containerd.types"),
    ("types/descriptor.proto", "containerd.types"),
    (
        "services/snapshots/v1/snapshots.proto",
        "containerd.services.snapshots.v1",
    ),
    (
        "services/content/v1/content.proto",
        "containerd.services.content.v1",
    ),
    (
        "services/images/v1/images.proto",
        "containerd.services.images.v1",
    ),
    (
        "services/leases/v1/leases.proto",
        "containerd.services.leases.v1",
    ),
];

/// containerd's proto text without its gogo import and options.
fn strip_gogo(text: &str) -> String {
    let options = regex::Regex::new(r"\s*\[\s*\(gogoproto\.[^\]]*\]").unwrap();
    let mut out = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with("import weak \"gogoproto/") || t.starts_with("option (gogoproto.") {
            continue;
        }
        out.push_str(&options.replace_all(line, ""));
        out.push('\n');
    }
    out
}

/// containerd's files, stripped, in a temporary include tree; compiled.
fn containerd_set(tmp: &Path) -> FileDescriptorSet {
    let api = Path::new(GO_ROOT).join(CONTAINERD_API);
    assert!(
        api.is_dir(),
        "{} is missing: apt-get install golang-github-containerd-containerd-dev",
        api.display()
    );
    let mut files = Vec::new();
    for (rel, _) in RESTATED {
        let text = std::fs::read_to_string(api.join(rel)).unwrap();
        let path: PathBuf = Path::new(CONTAINERD_API).join(rel);
        std::fs::create_dir_all(tmp.join(path.parent().unwrap())).unwrap();
        std::fs::write(tmp.join(&path), strip_gogo(&text)).unwrap();
        files.push(path);
    }
    protox::compile(&files, [tmp]).expect("compiling containerd's protos")
}

fn our_set() -> FileDescriptorSet {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("proto");
    let files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "proto"))
        .collect();
    assert_eq!(files.len(), RESTATED.len(), "{files:?}");
    protox::compile(&files, [&dir]).expect("compiling our protos")
}

#[derive(Debug, Default, PartialEq)]
struct Package {
    messages: BTreeMap<String, Vec<String>>,
    enums: BTreeMap<String, Vec<String>>,
    services: BTreeMap<String, Vec<String>>,
}

fn fields(m: &DescriptorProto) -> Vec<String> {
    let mut out: Vec<String> = m
        .field
        .iter()
        .map(|f| {
            format!(
                "{} = {} label {:?} type {:?} {}",
                f.name(),
                f.number(),
                f.label(),
                f.r#type(),
                f.type_name()
            )
        })
        .collect();
    out.sort();
    out
}

fn enum_values(e: &EnumDescriptorProto) -> Vec<String> {
    e.value
        .iter()
        .map(|v| format!("{} = {}", v.name(), v.number()))
        .collect()
}

fn methods(s: &ServiceDescriptorProto) -> Vec<String> {
    s.method
        .iter()
        .map(|m| {
            format!(
                "{}({}{}) returns ({}{})",
                m.name(),
                if m.client_streaming() { "stream " } else { "" },
                m.input_type(),
                if m.server_streaming() { "stream " } else { "" },
                m.output_type()
            )
        })
        .collect()
}

fn add_message(p: &mut Package, prefix: &str, m: &DescriptorProto) {
    let name = format!("{prefix}.{}", m.name());
    for nested in &m.nested_type {
        // Map entries are the compiler's; compare them too (key and value).
        add_message(p, &name, nested);
    }
    for e in &m.enum_type {
        p.enums
            .insert(format!("{name}.{}", e.name()), enum_values(e));
    }
    p.messages.insert(name, fields(m));
}

/// The set's packages, by name (only those of [`RESTATED`]).
fn packages(set: &FileDescriptorSet) -> BTreeMap<String, Package> {
    let mut out: BTreeMap<String, Package> = BTreeMap::new();
    for f in &set.file {
        let pkg = f.package();
        if !RESTATED.iter().any(|(_, p)| *p == pkg) {
            continue;
        }
        let p = out.entry(pkg.to_owned()).or_default();
        for m in &f.message_type {
            add_message(p, &format!(".{pkg}"), m);
        }
        for e in &f.enum_type {
            p.enums
                .insert(format!(".{pkg}.{}", e.name()), enum_values(e));
        }
        for s in &f.service {
            p.services
                .insert(format!(".{pkg}.{}", s.name()), methods(s));
        }
    }
    out
}

#[test]
fn our_protos_state_containerds_wire_contract() {
    let tmp = tempfile::tempdir().unwrap();
    let theirs = packages(&containerd_set(tmp.path()));
    let ours = packages(&our_set());
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        theirs.keys().collect::<Vec<_>>()
    );
    let mut compared = 0;
    for (name, want) in &theirs {
        let got = &ours[name];
        for (kind, w, g) in [
            ("message", &want.messages, &got.messages),
            ("enum", &want.enums, &got.enums),
            ("service", &want.services, &got.services),
        ] {
            assert_eq!(
                g.keys().collect::<Vec<_>>(),
                w.keys().collect::<Vec<_>>(),
                "{name}: {kind} names"
            );
            for (item, wanted) in w {
                assert_eq!(&g[item], wanted, "{kind} {item}");
                compared += 1;
            }
        }
    }
    // Not vacuous: every restated package, with its messages and services.
    assert!(compared > 60, "only {compared} items compared");
    assert!(theirs["containerd.services.content.v1"]
        .services
        .contains_key(".containerd.services.content.v1.Content"));
}

#[test]
fn gogo_options_are_stripped_and_nothing_else() {
    let text = "import weak \"gogoproto/gogo.proto\";\n\
                option (gogoproto.goproto_enum_prefix) = false;\n\
                string digest = 1 [(gogoproto.customtype) = \"x\", (gogoproto.nullable) = false];\n\
                STAT = 0 [(gogoproto.enumvalue_customname) = \"WriteActionStat\"];\n\
                map<string, string> labels  = 5;\n";
    assert_eq!(
        strip_gogo(text),
        "string digest = 1;\nSTAT = 0;\nmap<string, string> labels  = 5;\n"
    );
}
