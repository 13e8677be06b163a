//! Throwaway Postgres clusters with sync_ext installed, and typed calls to its SQL functions.
//!
//! Each [`Cluster`] is initialized in a temporary directory on a free loopback port and removed when
//! dropped, so tests are hermetic and run on any machine with Postgres 15 and the extension installed
//! (`scripts/install.sh`). As root, the server runs as the `postgres` OS user (initdb refuses root).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

use postgres::{Client, NoTls};
use serde_json::Value;
use sync_ext_protocol::{Change, Hlc, Op, PullResponse, PushResponse};
use tempfile::TempDir;
use uuid::Uuid;

/// A Postgres cluster of its own, stopped and deleted on drop.
pub struct Cluster {
    dir: TempDir,
    port: u16,
    bin: PathBuf,
    /// Whether the server flushes commits to disk (see [`Cluster::start_durable`]).
    durable: bool,
}

fn running_as_root() -> bool {
    Command::new("id").arg("-u").output().map(|out| out.stdout.starts_with(b"0\n")).unwrap_or(false)
}

/// The Postgres bin directory, from `$PG_CONFIG` or the Debian Postgres 15 default.
fn pg_bin_dir() -> PathBuf {
    let pg_config = std::env::var("PG_CONFIG").unwrap_or_else(|_| "/usr/lib/postgresql/15/bin/pg_config".into());
    let out = Command::new(&pg_config).arg("--bindir").output().unwrap_or_else(|e| panic!("running {pg_config}: {e}"));
    PathBuf::from(String::from_utf8(out.stdout).expect("utf-8 path").trim())
}

/// A command running a Postgres program, as the `postgres` OS user when we are root.
fn pg_command(program: &Path) -> Command {
    if running_as_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

/// Runs a Postgres program and panics on failure.
fn run_pg(bin: &Path, program: &str, args: &[&str]) {
    let program = bin.join(program);
    let mut command = pg_command(&program);
    let out = command.args(args).output().unwrap_or_else(|e| panic!("running {}: {e}", program.display()));
    assert!(out.status.success(), "{} {args:?} failed:\n{}", program.display(), String::from_utf8_lossy(&out.stderr));
}

/// A temporary directory the server's OS user owns.
fn server_dir(prefix: &str) -> TempDir {
    let dir = tempfile::Builder::new().prefix(prefix).tempdir().expect("a temporary directory");
    if running_as_root() {
        let status = Command::new("chown").arg("postgres").arg(dir.path()).status().expect("chown");
        assert!(status.success(), "chown postgres {}", dir.path().display());
    }
    dir
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|listener| listener.local_addr()).expect("a free loopback port").port()
}

impl Cluster {
    /// Initializes and starts a cluster on a free loopback port.
    pub fn start() -> Cluster {
        Cluster::start_with(&[])
    }

    /// Like [`Cluster::start`], with extra `postgresql.conf` lines (`"shared_buffers = '1GB'"`).
    pub fn start_with(settings: &[&str]) -> Cluster {
        Cluster::initialize_and_start(settings, false)
    }

    /// Like [`Cluster::start_with`], but durable: every other cluster runs with `fsync=off` (on the
    /// server's command line, which overrides `postgresql.conf`), this one keeps Postgres's default
    /// `fsync=on`, so commits wait for the disk. For measurements where that matters (concurrent
    /// pushes, group commit).
    pub fn start_durable(settings: &[&str]) -> Cluster {
        Cluster::initialize_and_start(settings, true)
    }

    /// Runs initdb with `settings` appended to `postgresql.conf` and starts the server.
    fn initialize_and_start(settings: &[&str], durable: bool) -> Cluster {
        let dir = server_dir("sync_ext-cluster-");
        let bin = pg_bin_dir();
        let data = dir.path().join("data");
        run_pg(&bin, "initdb", &["-D", data.to_str().unwrap(), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"]);
        if !settings.is_empty() {
            let mut conf = std::fs::OpenOptions::new().append(true).open(data.join("postgresql.conf")).expect("postgresql.conf");
            std::io::Write::write_all(&mut conf, format!("\n{}\n", settings.join("\n")).as_bytes()).expect("writing postgresql.conf");
        }
        let cluster = Cluster { port: free_port(), dir, bin, durable };
        cluster.pg_ctl(&["start", "-w", "-t", "60", "-l", cluster.log_path().to_str().unwrap()]);
        cluster
    }

    /// Starts a streaming-replication hot standby of this cluster (pg_basebackup) on its own port.
    pub fn start_standby(&self) -> Cluster {
        let dir = server_dir("sync_ext-standby-");
        let data = dir.path().join("data");
        self.run_tool("pg_basebackup", &["-D", data.to_str().unwrap(), "-R", "-X", "stream", "--no-sync", "--checkpoint=fast"]);
        let standby = Cluster { port: free_port(), dir, bin: self.bin.clone(), durable: false };
        standby.pg_ctl(&["start", "-w", "-t", "60", "-l", standby.log_path().to_str().unwrap()]);
        standby
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    fn pg_ctl(&self, action: &[&str]) {
        let data = self.dir.path().join("data");
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1{} -c max_connections=50",
            self.port,
            self.dir.path().display(),
            if self.durable { "" } else { " -c fsync=off" }
        );
        let mut args = vec!["-D", data.to_str().unwrap(), "-o", &options];
        args.extend_from_slice(action);
        run_pg(&self.bin, "pg_ctl", &args);
    }

    /// Restarts the server (a fast shutdown, then start), keeping its data.
    pub fn restart(&self) {
        self.pg_ctl(&["restart", "-m", "fast", "-w", "-t", "60", "-l", self.log_path().to_str().unwrap()]);
    }

    /// Runs a Postgres client program (pg_dump, pg_restore...) against this cluster.
    pub fn run_tool(&self, program: &str, args: &[&str]) {
        let port = self.port.to_string();
        let mut full = vec!["-h", "127.0.0.1", "-p", &port, "-U", "postgres"];
        full.extend_from_slice(args);
        run_pg(&self.bin, program, &full);
    }

    /// A path inside the cluster's directory (writable by the server's OS user).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A libpq-style connection string for database `db`.
    pub fn connection_string(&self, db: &str) -> String {
        format!("host=127.0.0.1 port={} user=postgres dbname={db}", self.port)
    }

    /// Connects to database `db`.
    pub fn connect(&self, db: &str) -> Client {
        Client::connect(&self.connection_string(db), NoTls).unwrap_or_else(|e| panic!("connecting to {db}: {e}"))
    }

    /// Connects to database `db` as role `user` (trust authentication: no password).
    pub fn connect_as(&self, db: &str, user: &str) -> Client {
        self.connect_with_options(db, user, "")
    }

    /// Like [`Cluster::connect_as`], with libpq `options` sent at startup (what `PGOPTIONS` carries,
    /// e.g. `"-c statement_timeout=1s"`).
    pub fn connect_with_options(&self, db: &str, user: &str, options: &str) -> Client {
        self.try_connect_with_options(db, user, options).unwrap_or_else(|e| panic!("connecting to {db} as {user} ({options:?}): {e}"))
    }

    /// Like [`Cluster::connect_with_options`], returning the error of a refused connection.
    pub fn try_connect_with_options(&self, db: &str, user: &str, options: &str) -> Result<Client, postgres::Error> {
        let mut config = postgres::Config::new();
        config.host("127.0.0.1").port(self.port).user(user).dbname(db);
        if !options.is_empty() {
            config.options(options);
        }
        config.connect(NoTls)
    }

    /// Creates database `name` with sync_ext installed and returns its connection string.
    pub fn create_database(&self, name: &str) -> String {
        self.connect("postgres").batch_execute(&format!("CREATE DATABASE \"{name}\"")).expect("CREATE DATABASE");
        if let Err(error) = self.connect(name).batch_execute("CREATE EXTENSION sync_ext") {
            panic!("CREATE EXTENSION sync_ext failed ({error}); install it first: scripts/install.sh");
        }
        self.connection_string(name)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let _ = pg_command(&self.bin.join("pg_ctl")).args(["-D", data.to_str().unwrap(), "stop", "-m", "immediate", "-w"]).output();
    }
}

/// An HLC `ago_millis` before now, with the given counter.
pub fn hlc_ago(ago_millis: i64, counter: u16) -> Hlc {
    Hlc::new(sync_ext_protocol::hlc::wall_clock_millis() - ago_millis, counter).expect("a current HLC")
}

/// A change with a fresh op_id; `value` is ignored for a delete.
pub fn change(op: Op, model: &str, pk: &str, hlc: Hlc, actor: &str, value: Value) -> Change {
    Change {
        op_id: Uuid::new_v4(),
        model: model.into(),
        pk: pk.into(),
        op,
        hlc,
        actor: actor.into(),
        value: if op == Op::Delete { None } else { Some(value.as_object().cloned().expect("a JSON object")) },
    }
}

/// Calls `sync_push` with typed changes and returns the typed response.
pub fn push(client: &mut Client, tenant: &str, changes: &[Change]) -> Result<PushResponse, postgres::Error> {
    let body = serde_json::to_value(changes).expect("changes serialize");
    let row = client.query_one("SELECT sync_push($1, $2)", &[&tenant, &body])?;
    Ok(serde_json::from_value(row.get::<_, Value>(0)).expect("a push response"))
}

/// Calls `sync_pull` and returns the typed response.
pub fn pull(client: &mut Client, tenant: &str, since: i64, max_changes: i32) -> Result<PullResponse, postgres::Error> {
    let row = client.query_one("SELECT sync_pull($1, $2, $3)", &[&tenant, &since, &max_changes])?;
    Ok(serde_json::from_value(row.get::<_, Value>(0)).expect("a pull response"))
}

/// Calls `sync_pull` for the scope instances `scopes` and returns the typed response.
pub fn pull_scoped(client: &mut Client, tenant: &str, since: i64, max_changes: i32, scopes: &[&str]) -> Result<PullResponse, postgres::Error> {
    let row = client.query_one("SELECT sync_pull($1, $2, $3, $4)", &[&tenant, &since, &max_changes, &scopes])?;
    Ok(serde_json::from_value(row.get::<_, Value>(0)).expect("a pull response"))
}

/// Pulls every change after `since`, page by page.
pub fn pull_all(client: &mut Client, tenant: &str, since: i64, page: i32) -> Result<PullResponse, postgres::Error> {
    let mut all = PullResponse { changes: Vec::new(), cursor: since, has_more: true, reset: false, digest: None, digests: None };
    while all.has_more {
        let next = pull(client, tenant, all.cursor, page)?;
        all.changes.extend(next.changes);
        all.cursor = next.cursor;
        all.has_more = next.has_more;
        all.reset |= next.reset;
        all.digest = next.digest;
    }
    Ok(all)
}

/// A cluster whose processes are stopped (SIGSTOP), as a server that hangs without closing its
/// connections: they accept TCP connections and answer nothing. Resumed (SIGCONT) on drop.
pub struct Paused {
    pids: Vec<String>,
}

impl Cluster {
    /// The port the cluster listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops the postmaster and every backend with SIGSTOP until the returned guard is dropped.
    pub fn pause(&self) -> Paused {
        let pid_file = std::fs::read_to_string(self.dir.path().join("data").join("postmaster.pid")).expect("postmaster.pid");
        let postmaster = pid_file.lines().next().expect("the postmaster's pid").trim().to_owned();
        let children = Command::new("pgrep").args(["-P", &postmaster]).output().expect("pgrep");
        let mut pids = vec![postmaster];
        pids.extend(String::from_utf8_lossy(&children.stdout).split_whitespace().map(str::to_owned));
        signal("STOP", &pids);
        Paused { pids }
    }

    /// Starts a PgBouncer in transaction mode in front of this cluster, on a free loopback port.
    pub fn start_pgbouncer(&self) -> PgBouncer {
        let dir = server_dir("sync_ext-pgbouncer-");
        let port = free_port();
        let ini = dir.path().join("pgbouncer.ini");
        let users = dir.path().join("users.txt");
        std::fs::write(&users, "\"postgres\" \"\"\n").expect("writing users.txt");
        std::fs::write(
            &ini,
            format!(
                "[databases]\n* = host=127.0.0.1 port={}\n\n[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
                 auth_type = trust\nauth_file = {}\npool_mode = transaction\nmax_client_conn = 500\ndefault_pool_size = 5\n\
                 ignore_startup_parameters = extra_float_digits,options\nlogfile = {}\n",
                self.port,
                users.display(),
                dir.path().join("pgbouncer.log").display()
            ),
        )
        .expect("writing pgbouncer.ini");
        let program = ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"].into_iter().map(PathBuf::from).find(|path| path.exists()).expect("pgbouncer is installed (scripts/setup.sh)");
        // PgBouncer refuses to run as root; started as root, it switches to the server's OS user itself.
        let mut command = Command::new(&program);
        if running_as_root() {
            command.args(["-u", "postgres"]);
        }
        let child = command.arg(&ini).spawn().expect("starting pgbouncer");
        let bouncer = PgBouncer { child, port, dir };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "pgbouncer did not listen within 30 s: {}", bouncer.log());
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        bouncer
    }
}

fn signal(name: &str, pids: &[String]) {
    let status = Command::new("kill").arg(format!("-{name}")).args(pids).status().expect("kill");
    assert!(status.success(), "kill -{name} {pids:?}");
}

impl Drop for Paused {
    fn drop(&mut self) {
        signal("CONT", &self.pids);
    }
}

/// A PgBouncer process in transaction mode in front of a [`Cluster`], stopped on drop.
pub struct PgBouncer {
    child: std::process::Child,
    port: u16,
    dir: TempDir,
}

impl PgBouncer {
    /// A libpq-style connection string for database `db` through the pooler.
    pub fn connection_string(&self, db: &str) -> String {
        format!("host=127.0.0.1 port={} user=postgres dbname={db}", self.port)
    }

    /// PgBouncer's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pgbouncer.log")).unwrap_or_default()
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs blocking database code (the sync `postgres` crate, a [`Cluster`]) on a plain thread, off the async
/// runtime a client test runs on.
pub fn off_runtime<T: Send>(work: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|scope| scope.spawn(work).join().expect("blocking work finishes"))
}

/// The live rows of `model` in `tenant` on the `sync` database, from its snapshots, by pk (read off the
/// async runtime).
pub fn server_rows(cluster: &Cluster, tenant: &str, model: &str) -> std::collections::BTreeMap<String, serde_json::Map<String, Value>> {
    off_runtime(|| {
        cluster
            .connect("sync")
            .query("SELECT id, value FROM sync_ext.snapshots WHERE tenant_id = $1 AND model = $2 AND NOT deleted", &[&tenant, &model])
            .unwrap()
            .iter()
            .map(|row| (row.get::<_, String>(0), row.get::<_, Value>(1).as_object().cloned().unwrap()))
            .collect()
    })
}

/// Runs SQL statements on the `sync` database (off the async runtime).
pub fn execute(cluster: &Cluster, sql: &str) {
    off_runtime(|| cluster.connect("sync").batch_execute(sql).expect("statements run"));
}

/// A cluster with a `sync` database, and its connection string, started off the async runtime.
pub fn sync_cluster() -> (Cluster, String) {
    off_runtime(|| {
        let cluster = Cluster::start();
        let url = cluster.create_database("sync");
        (cluster, url)
    })
}

/// A Citus cluster of its own on loopback: a coordinator and worker nodes (none: Citus on one node, the
/// coordinator holding the shards), each a [`Cluster`] with Citus
/// preloaded and a `sync` database in which Citus is created and the nodes know each other (the
/// coordinator included, so that every node reaches every other). Needs a Postgres with Citus installed
/// (`PG_CONFIG`; see `scripts/citus-test.sh`). sync_ext is not created: that is the README's recipe.
pub struct CitusCluster {
    pub coordinator: Cluster,
    pub workers: Vec<Cluster>,
}

/// The `postgresql.conf` lines of every Citus node the tests start.
const CITUS_SETTINGS: &[&str] = &[
    "shared_preload_libraries = 'citus'",
    // Transactions that write on two nodes commit in two phases.
    "max_prepared_transactions = 100",
    // Shard moves copy through logical replication.
    "wal_level = logical",
    "citus.shard_count = 8",
];

impl CitusCluster {
    /// Starts a coordinator and `workers` workers, each with a `sync` database holding Citus, and adds the
    /// workers (and the coordinator itself) to the cluster's metadata.
    pub fn start(workers: usize) -> CitusCluster {
        CitusCluster::start_with(workers, &[])
    }

    /// Like [`CitusCluster::start`], with extra `postgresql.conf` lines on every node.
    pub fn start_with(workers: usize, settings: &[&str]) -> CitusCluster {
        let settings: Vec<&str> = CITUS_SETTINGS.iter().chain(settings).copied().collect();
        let coordinator = Cluster::start_with(&settings);
        let workers: Vec<Cluster> = (0..workers).map(|_| Cluster::start_with(&settings)).collect();
        for node in std::iter::once(&coordinator).chain(&workers) {
            node.connect("postgres").batch_execute("CREATE DATABASE sync").expect("CREATE DATABASE sync");
            node.connect("sync").batch_execute("CREATE EXTENSION citus").expect("CREATE EXTENSION citus (is Citus installed for PG_CONFIG?)");
        }
        let mut admin = coordinator.connect("sync");
        admin.execute("SELECT citus_set_coordinator_host('127.0.0.1', $1)", &[&i32::from(coordinator.port())]).expect("citus_set_coordinator_host");
        for worker in &workers {
            admin.execute("SELECT citus_add_node('127.0.0.1', $1)", &[&i32::from(worker.port())]).expect("citus_add_node");
        }
        if workers.is_empty() {
            // Citus on one node: the coordinator holds the shards.
            admin
                .execute("SELECT citus_set_node_property('127.0.0.1', $1, 'shouldhaveshards', true)", &[&i32::from(coordinator.port())])
                .expect("citus_set_node_property");
        }
        CitusCluster { coordinator, workers }
    }

    /// The port of the worker that holds `tenant`'s shard of `table` (the coordinator's port if it holds it).
    pub fn node_of(&self, table: &str, tenant: &str) -> u16 {
        let row = self
            .coordinator
            .connect("sync")
            .query_one(
                "SELECT n.nodeport FROM pg_dist_placement AS p JOIN pg_dist_node AS n USING (groupid)
                  WHERE p.shardid = get_shard_id_for_distribution_column($1::text::regclass, $2::text)",
                &[&table, &tenant],
            )
            .expect("the placement of a tenant's shard");
        u16::try_from(row.get::<_, i32>(0)).expect("a port")
    }
}

/// The README's SQL examples, run as written.
pub mod readme {
    use postgres::Client;

    /// The SQL code blocks of the README section headed `heading`.
    pub fn sql_blocks(heading: &str) -> Vec<String> {
        let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).expect("README.md");
        let start = readme.find(&format!("\n{heading}\n")).unwrap_or_else(|| panic!("README has no {heading}"));
        let section = &readme[start + heading.len() + 2..];
        let section = &section[..section.find("\n## ").unwrap_or(section.len())];
        section.split("```sql\n").skip(1).map(|block| block[..block.find("```").expect("a closed code block")].to_owned()).collect()
    }

    /// A block's statements (each ending with `;` at the end of a line, before any comment), each with the
    /// SQLSTATE its comment says it fails with.
    pub fn statements(block: &str) -> Vec<(String, Option<String>)> {
        let mut statements = Vec::new();
        let mut current = String::new();
        for line in block.lines() {
            let (code, comment) = line.split_once("--").unwrap_or((line, ""));
            if code.trim().is_empty() {
                continue;
            }
            current.push_str(code);
            current.push('\n');
            if code.trim_end().ends_with(';') {
                let expected = comment.trim().strip_prefix("error ").map(|code| code.trim().to_owned());
                statements.push((std::mem::take(&mut current), expected));
            }
        }
        assert!(current.trim().is_empty(), "a statement without its ';': {current}");
        statements
    }

    /// Runs every statement of the README section headed `heading` in order, checking the SQLSTATE of those
    /// marked `-- error NNNNN`, and returns the statements that ran.
    pub fn run_section(client: &mut Client, heading: &str) -> Vec<String> {
        let mut ran = Vec::new();
        for block in sql_blocks(heading) {
            for (statement, expected) in statements(&block) {
                let outcome = client.batch_execute(&statement);
                match (&expected, outcome) {
                    (None, Ok(())) => {}
                    (None, Err(error)) => panic!("README statement failed:\n{statement}{error:?}"),
                    (Some(code), Ok(())) => panic!("README statement should fail with {code}:\n{statement}"),
                    (Some(code), Err(error)) => {
                        let actual = error.as_db_error().map(|db| db.code().code().to_owned());
                        assert_eq!(actual.as_deref(), Some(code.as_str()), "{statement}{error:?}");
                    }
                }
                ran.push(statement);
            }
        }
        ran
    }
}
