//! Each separate build (`cargo build --bin F` for every function, as `cargo lambda watch` runs
//! them, and `cargo run -p chat-local`) must resolve every registry dependency with the features
//! `cargo test --workspace` resolves. A difference recompiles the SDK stack once more per build:
//! minutes of every CI run and of a newcomer's first `make dev`.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

/// The builds made on their own, besides the workspace's test build.
const SEPARATE_BUILDS: [&str; 5] = ["ingest", "generator", "stream", "sweeper", "chat-local"];

type Features = BTreeMap<String, BTreeSet<String>>;

/// `name version` → features of every package in a build, by `cargo tree`.
fn resolve(args: &[&str]) -> Features {
    let output = Command::new(env!("CARGO"))
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
        .args(["tree", "--locked", "--offline", "--prefix", "none", "--format", "{p}|{f}"])
        .args(args)
        .output()
        .expect("cargo tree runs");
    assert!(output.status.success(), "cargo tree {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    let mut features = Features::new();
    for line in String::from_utf8(output.stdout).expect("UTF-8").lines() {
        // Other lines are headings (`[build-dependencies]`) and blanks.
        let Some((package, enabled)) = line.split_once('|') else { continue };
        // Workspace members (path packages) are cheap to rebuild and may differ on purpose:
        // chat-auth's local token issuer never goes into a function.
        if package.contains(" (/") {
            continue;
        }
        let package = package.trim_end_matches(" (*)").trim_end_matches(" (proc-macro)").to_owned();
        let enabled =
            enabled.trim_end_matches(" (*)").split(',').filter(|f| !f.is_empty()).map(str::to_owned);
        features.entry(package).or_default().extend(enabled);
    }
    features
}

#[test]
fn every_separate_build_resolves_the_test_builds_features() {
    let workspace = resolve(&["--workspace"]);
    let mut drift = Vec::new();
    for build in SEPARATE_BUILDS {
        for (package, features) in resolve(&["-p", build, "--edges", "normal,build"]) {
            let Some(everywhere) = workspace.get(&package) else { continue };
            if *everywhere != features {
                let missing: Vec<_> = everywhere.difference(&features).collect();
                drift.push(format!("{build}: {package} lacks {missing:?}"));
            }
        }
    }
    assert!(
        drift.is_empty(),
        "these builds would recompile dependencies the tests already built; add the features to \
         shared/workspace-hack/Cargo.toml:\n  {}",
        drift.join("\n  ")
    );
}
