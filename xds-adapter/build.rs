//! Copies the file descriptor set that `envoy-types` generated its types from into `OUT_DIR`.
//!
//! `shunt-xds translate` reads Envoy's JSON `/config_dump`, which needs Envoy's schema at run
//! time to map JSON onto the same prost types the ADS client decodes. envoy-types ships that
//! schema (`src/generated/types.bin`) but does not export it, so it is taken from the package
//! that cargo resolved: the types and the schema then always come from one release.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=build.rs");
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let cargo = std::env::var("CARGO")?;
    // Offline first: the build already resolved envoy-types. `--offline` fails, though, when a
    // locked package this build never needs (another platform's, a dev-dependency) was never
    // downloaded, so a fresh machine falls back to letting cargo fetch the lockfile's packages.
    let metadata = |mode: &str| {
        Command::new(&cargo)
            .args(["metadata", "--format-version", "1", mode])
            .current_dir(&manifest_dir)
            .output()
    };
    let mut output = metadata("--offline")?;
    if !output.status.success() {
        output = metadata("--locked")?;
    }
    if !output.status.success() {
        return Err(format!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&output.stderr)
        )
        .into());
    }
    let metadata: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    let packages = metadata["packages"].as_array().ok_or("no packages")?;
    let envoy_types: Vec<&serde_json::Value> = packages
        .iter()
        .filter(|p| p["name"] == "envoy-types")
        .collect();
    let [package] = envoy_types.as_slice() else {
        return Err(format!(
            "expected one envoy-types package, found {}",
            envoy_types.len()
        )
        .into());
    };
    let manifest = Path::new(
        package["manifest_path"]
            .as_str()
            .ok_or("no manifest_path")?,
    );
    let descriptors = manifest
        .parent()
        .ok_or("manifest has no parent")?
        .join("src/generated/types.bin");
    println!("cargo:rerun-if-changed={}", descriptors.display());
    let out = PathBuf::from(std::env::var("OUT_DIR")?).join("envoy_descriptors.bin");
    std::fs::copy(&descriptors, &out)
        .map_err(|e| format!("reading {}: {e}", descriptors.display()))?;
    Ok(())
}
