//! A throwaway PostgreSQL cluster for one test: `initdb` into a temporary directory, a server
//! listening on a Unix socket there (and, with TLS, on a loopback port that accepts TLS
//! connections only), stopped and deleted on drop.
//!
//! Needs Debian's `postgresql` package (`/usr/lib/postgresql/<version>/bin`). PostgreSQL
//! refuses to run as root, so as root the cluster runs as the `postgres` user the package
//! creates; otherwise as the calling user.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A running cluster; dropping it stops the server and deletes its files.
#[derive(Debug)]
pub struct Postgres {
    bin: PathBuf,
    dir: PathBuf,
    uid: Option<(u32, u32)>,
    databases: std::sync::atomic::AtomicU32,
    /// The loopback port, when started with TLS.
    port: Option<u16>,
}

/// The newest installed server's binary directory.
fn bin_dir() -> Option<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").is_file().then_some((v, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, b)| b)
}

/// The `postgres` user's uid and gid, from `/etc/passwd`.
fn postgres_user() -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() > 3 && f[0] == "postgres")
            .then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))?
    })
}

/// What is missing to start a cluster here, if anything.
pub fn missing() -> Option<String> {
    if bin_dir().is_none() {
        return Some("PostgreSQL server binaries (apt-get install postgresql)".into());
    }
    if rustix::process::geteuid().is_root() && postgres_user().is_none() {
        return Some("a `postgres` user to run the server as (apt-get install postgresql)".into());
    }
    None
}

/// How a cluster listens besides its Unix socket.
#[derive(Clone, Copy)]
enum Tcp<'a> {
    None,
    Plain,
    /// TLS only, with this certificate and key.
    Tls(&'a Path, &'a Path),
}

impl Postgres {
    /// Starts a cluster, or `None` when the test must skip ([`crate::require`] decides,
    /// failing under CI).
    pub fn start(test: &str) -> Option<Postgres> {
        Postgres::start_with(test, Tcp::None)
    }

    /// Like [`Postgres::start`], also listening on a loopback port with TLS (`cert` and
    /// `key`, PEM) where `pg_hba.conf` accepts TLS connections only: a client that connects
    /// over it spoke TLS.
    pub fn start_tls(test: &str, cert: &Path, key: &Path) -> Option<Postgres> {
        Postgres::start_with(test, Tcp::Tls(cert, key))
    }

    /// Like [`Postgres::start`], also listening on a loopback port without TLS.
    pub fn start_plain_tcp(test: &str) -> Option<Postgres> {
        Postgres::start_with(test, Tcp::Plain)
    }

    fn start_with(test: &str, tcp: Tcp<'_>) -> Option<Postgres> {
        if !crate::require(test, missing()) {
            return None;
        }
        let bin = bin_dir()?;
        let uid = rustix::process::geteuid()
            .is_root()
            .then(postgres_user)
            .flatten();
        let dir = std::env::temp_dir().join(format!(
            "agentfense-pg-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir(&dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        if let Some((u, g)) = uid {
            std::os::unix::fs::chown(&dir, Some(u), Some(g))
                .unwrap_or_else(|e| panic!("cannot chown {}: {e}", dir.display()));
        }
        let port = (!matches!(tcp, Tcp::None)).then(|| {
            // A free loopback port (another process could take it before the server does;
            // then the start fails loudly).
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .unwrap_or_else(|e| panic!("cannot find a free port: {e}"))
        });
        let pg = Postgres {
            bin,
            dir,
            uid,
            databases: std::sync::atomic::AtomicU32::new(0),
            port,
        };
        let data = pg.dir.join("data");
        pg.run("initdb", |c| {
            c.arg("-D").arg(&data).args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ]);
        });
        let mut options = format!(
            "-k {} -c fsync=off -c synchronous_commit=off",
            pg.dir.display()
        );
        match (tcp, port) {
            (Tcp::Plain, Some(port)) => {
                options.push_str(&format!(
                    " -c listen_addresses=127.0.0.1 -p {port} -c ssl=off"
                ));
            }
            (Tcp::Tls(cert, key), Some(port)) => {
                // The server reads its key as its own user, and only from a private file.
                for (from, to) in [(cert, "server.pem"), (key, "server.key")] {
                    let to = pg.dir.join(to);
                    std::fs::copy(from, &to)
                        .unwrap_or_else(|e| panic!("cannot copy {}: {e}", from.display()));
                    std::fs::set_permissions(
                        &to,
                        std::os::unix::fs::PermissionsExt::from_mode(0o600),
                    )
                    .unwrap_or_else(|e| panic!("cannot chmod {}: {e}", to.display()));
                    if let Some((u, g)) = uid {
                        std::os::unix::fs::chown(&to, Some(u), Some(g))
                            .unwrap_or_else(|e| panic!("cannot chown {}: {e}", to.display()));
                    }
                }
                std::fs::write(
                    data.join("pg_hba.conf"),
                    "local all all trust\nhostssl all all 127.0.0.1/32 trust\n\
                     host all all 127.0.0.1/32 reject\n",
                )
                .unwrap_or_else(|e| panic!("cannot write pg_hba.conf: {e}"));
                options.push_str(&format!(
                    " -c listen_addresses=127.0.0.1 -p {port} -c ssl=on \
                     -c ssl_cert_file={0}/server.pem -c ssl_key_file={0}/server.key",
                    pg.dir.display()
                ));
            }
            _ => options.push_str(" -c listen_addresses=''"),
        }
        // `-w` waits until the server accepts connections: no polling here.
        pg.run("pg_ctl", |c| {
            c.arg("-D")
                .arg(&data)
                .args(["-w", "-l"])
                .arg(pg.dir.join("log"))
                .args(["-o", &options, "start"]);
        });
        Some(pg)
    }

    fn run(&self, program: &str, args: impl FnOnce(&mut Command)) {
        let mut c = Command::new(self.bin.join(program));
        args(&mut c);
        c.current_dir(&self.dir);
        if let Some((u, g)) = self.uid {
            c.uid(u).gid(g).env("HOME", &self.dir);
        }
        let out = c
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
        assert!(
            out.status.success(),
            "{program} failed: {}{}\nserver log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
        );
    }

    /// The socket directory (the URL's host).
    pub fn socket_dir(&self) -> &Path {
        &self.dir
    }

    /// Creates a new, empty database and returns its URL (user `postgres`, no password,
    /// over the Unix socket).
    pub fn database(&self) -> String {
        let name = self.create_database();
        let host = self.dir.display().to_string().replace('/', "%2F");
        format!("postgresql://postgres@{host}{}/{name}", self.port_part())
    }

    /// Creates a new, empty database and returns its URL over the loopback port (without
    /// `sslmode`; started with [`Postgres::start_tls`] or [`Postgres::start_plain_tcp`]).
    pub fn tls_database(&self) -> String {
        let name = self.create_database();
        format!("postgresql://postgres@127.0.0.1{}/{name}", self.port_part())
    }

    /// Stops the server now (`immediate`: as if the database host vanished); the files stay
    /// until drop.
    pub fn stop(&self) {
        self.run("pg_ctl", |c| {
            c.arg("-D")
                .arg(self.dir.join("data"))
                .args(["-w", "-m", "immediate", "stop"]);
        });
    }

    /// Runs `sql` with `psql` on the database at `url` (one of this cluster's).
    pub fn psql(&self, url: &str, sql: &str) {
        self.run("psql", |c| {
            c.args(["-v", "ON_ERROR_STOP=1", "-X", "-q", url, "-c", sql]);
        });
    }

    fn port_part(&self) -> String {
        self.port.map(|p| format!(":{p}")).unwrap_or_default()
    }

    fn create_database(&self) -> String {
        let n = self
            .databases
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("test{n}");
        let mut args = vec!["-U".to_owned(), "postgres".to_owned()];
        if let Some(p) = self.port {
            args.extend(["-p".to_owned(), p.to_string()]);
        }
        args.push(name.clone());
        self.run("createdb", |c| {
            c.arg("-h").arg(&self.dir).args(&args);
        });
        name
    }
}

static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let mut c = Command::new(self.bin.join("pg_ctl"));
        c.arg("-D")
            .arg(&data)
            .args(["-w", "-m", "immediate", "stop"]);
        if let Some((u, g)) = self.uid {
            c.uid(u).gid(g);
        }
        let _ = c.output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
