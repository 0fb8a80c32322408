//! Starting and stopping a real `agentfense serve` for tests.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// True when privileged tests can run here. Otherwise: under CI (`CI` set) the test fails,
/// because CI must run it; locally it prints `SKIPPED <test>: <reason>` and the caller returns.
pub fn privileged(test: &str) -> bool {
    agentfense_testsupport::require(test, agentfense_testsupport::privileged())
}

/// A running server; stopped (SIGTERM, then SIGKILL) on drop.
pub struct Server {
    pub child: Option<Child>,
    pub grpc: String,
    pub http: String,
    /// The unix socket (gRPC), unless configured off.
    pub unix: Option<PathBuf>,
    pub data_dir: PathBuf,
    pub log: PathBuf,
}

impl Server {
    /// Starts `agentfense serve` on ephemeral loopback ports with `data_dir`.
    pub fn start(data_dir: &Path) -> Server {
        Server::start_with(data_dir, "")
    }

    /// `agentfense serve` on ephemeral loopback ports with `data_dir` and the config file
    /// `config`, not yet started.
    pub fn command(data_dir: &Path, config: &Path) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_agentfense"));
        c.args([
            "serve",
            "--grpc-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
        ])
        .arg("--config")
        .arg(config)
        .arg("--data-dir")
        .arg(data_dir);
        c
    }

    /// Like [`Server::start`], with extra YAML configuration.
    pub fn start_with(data_dir: &Path, config_yaml: &str) -> Server {
        let log = data_dir.with_extension("log");
        let config = data_dir.with_extension("yaml");
        std::fs::write(&config, config_yaml).unwrap();
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let mut child = Server::command(data_dir, &config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .expect("spawn agentfense serve");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let (mut grpc, mut http, mut unix) = (None, None, None);
        let deadline = Instant::now() + Duration::from_secs(30);
        // "data in" is the last line of the banner.
        let mut done = false;
        while !done {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    done = line.starts_with("agentfense: data in ");
                    if let Some(a) = line.strip_prefix("agentfense: gRPC listening on ") {
                        match a.strip_prefix("unix://") {
                            Some(p) => unix = Some(PathBuf::from(p)),
                            None => grpc = Some(a.to_owned()),
                        }
                    }
                    if let Some(a) = line.strip_prefix("agentfense: REST listening on ") {
                        http = Some(a.to_owned());
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    panic!(
                        "server did not come up; log:\n{}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                }
            }
        }
        Server {
            child: Some(child),
            grpc: grpc.unwrap(),
            http: http.unwrap(),
            unix,
            data_dir: data_dir.to_owned(),
            log,
        }
    }

    /// SIGTERM and wait; asserts a clean exit and no mounts left behind.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = rustix::process::Pid::from_child(&child);
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("server did not stop within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(
            status.success(),
            "server exited with {status}; log:\n{}",
            self.log_text()
        );
        assert_eq!(
            self.mounts(),
            Vec::<String>::new(),
            "mounts left behind after shutdown"
        );
    }

    /// SIGKILL (a crash).
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// FUSE mounts under this server's data directory.
    pub fn mounts(&self) -> Vec<String> {
        let dir = self.data_dir.to_string_lossy().into_owned();
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(str::to_owned))
            .filter(|m| m.starts_with(&dir))
            .collect()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Never leave a mount behind, even when a test failed half-way.
        for m in self.mounts() {
            let _ = Command::new("umount").args(["-l", &m]).status();
        }
    }
}
