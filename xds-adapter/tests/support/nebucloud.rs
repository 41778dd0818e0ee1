//! The third-party nebucloud-xds control plane (through `xds-snapshot-server`, built by
//! `ci/xds-server.sh`), serving one snapshot.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;

use base64::Engine;

use shunt_xds::resource::Resource;

/// Builds the server on first use. Fails loudly: these tests never skip.
pub fn server_binary() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ci/xds-server.sh");
            let out = Command::new("bash")
                .arg(&script)
                .stderr(Stdio::inherit())
                .output()
                .expect("run ci/xds-server.sh");
            assert!(out.status.success(), "ci/xds-server.sh failed");
            PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
        })
        .clone()
}

pub struct NebucloudServer {
    child: Child,
    pub address: SocketAddr,
    _dir: tempfile::TempDir,
}

impl NebucloudServer {
    /// Serves `resources` as version `version` to the node `node_id`.
    pub fn start(node_id: &str, version: &str, resources: &[Resource]) -> NebucloudServer {
        let dir = tempfile::tempdir().unwrap();
        let b64 = base64::engine::general_purpose::STANDARD;
        let snapshot = serde_json::json!({
            "node_id": node_id,
            "version": version,
            "resources": resources.iter().map(|r| serde_json::json!({
                "type_url": r.kind().type_url(),
                "name": r.name(),
                "value": b64.encode(r.encode_to_vec()),
            })).collect::<Vec<_>>(),
        });
        let file = dir.path().join("snapshot.json");
        std::fs::write(&file, snapshot.to_string()).unwrap();
        let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
        let mut child = Command::new(server_binary())
            .args(["--listen", "127.0.0.1:0", "--snapshot"])
            .arg(&file)
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn xds-snapshot-server");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let address = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line `{line}`"))
            .parse()
            .unwrap();
        NebucloudServer {
            child,
            address,
            _dir: dir,
        }
    }
}

impl Drop for NebucloudServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
