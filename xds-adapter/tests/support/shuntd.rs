//! A real shuntd in the test process, its control API, and the adapter binary beside it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use shunt_proto::control as pb;

pub struct TestShuntd {
    pub dir: tempfile::TempDir,
    _daemon: shuntd::background::Background,
}

impl TestShuntd {
    pub fn start() -> TestShuntd {
        let dir = tempfile::tempdir().unwrap();
        let config = shuntd::config::Config::private(dir.path());
        let daemon = shuntd::background::spawn(config).expect("shuntd starts");
        TestShuntd {
            dir,
            _daemon: daemon,
        }
    }

    pub fn control_socket(&self) -> PathBuf {
        self.dir.path().join("control.sock")
    }

    /// Runs one control-API call, as an operator's `shunt` would.
    pub fn control<T>(
        &self,
        call: impl AsyncFnOnce(
            &mut shunt_proto::control::control_client::ControlClient<tonic::transport::Channel>,
        ) -> T,
    ) -> T {
        let socket = self.control_socket();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut c = shunt_proto::control_client(&socket).await.unwrap();
            call(&mut c).await
        })
    }

    /// What a config source installed: its services, its global rules, and every certificate.
    pub fn tables(
        &self,
        source: &str,
    ) -> (Vec<pb::Service>, Vec<pb::Rule>, Vec<pb::CertificateInfo>) {
        self.control(async |c| {
            let mut services: Vec<pb::Service> = c
                .list_services(pb::ListServicesRequest {})
                .await
                .unwrap()
                .into_inner()
                .services
                .into_iter()
                .filter(|s| s.source == source)
                .filter_map(|s| s.service)
                .collect();
            services.sort_by(|a, b| a.cluster.cmp(&b.cluster));
            let mut rules: Vec<pb::Rule> = c
                .list_rules(pb::ListRulesRequest {
                    scope: pb::RuleScope::Global as i32,
                    namespace: String::new(),
                })
                .await
                .unwrap()
                .into_inner()
                .rules
                .into_iter()
                .filter(|r| r.source == source)
                .collect();
            rules.sort_by(|a, b| a.tag.cmp(&b.tag));
            let certificates = c
                .list_certificates(pb::ListCertificatesRequest {})
                .await
                .unwrap()
                .into_inner()
                .certificates;
            (services, rules, certificates)
        })
    }
}

/// The `shunt-xds` binary, killed when dropped.
pub struct Adapter {
    child: Child,
    pub log: PathBuf,
    pub metrics: SocketAddr,
}

impl Adapter {
    /// `shunt-xds run` with `args`, installing into `shuntd`, its metrics on a free port.
    pub fn start(shuntd: &TestShuntd, args: &[&str]) -> Adapter {
        let metrics = SocketAddr::from((
            [127, 0, 0, 1],
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port(),
        ));
        let log = shuntd.dir.path().join("shunt-xds.log");
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_shunt-xds"))
            .arg("run")
            .args(args)
            .arg("--control-socket")
            .arg(shuntd.control_socket())
            .args(["--metrics-address", &metrics.to_string()])
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("spawn shunt-xds");
        Adapter {
            child,
            log,
            metrics,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The value of one series on the adapter's `/metrics`, if present.
    pub fn metric(&self, series: &str) -> Option<f64> {
        shunt_envoy_harness::http_get(self.metrics, "/metrics")
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
    }
}

impl Drop for Adapter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `probe` until it returns `Some`, for up to 20 s: the adapter and shuntd converge on
/// their own schedule.
pub fn eventually<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}
