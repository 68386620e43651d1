//! Everything a run owns: its database and broker, the fault proxies, the processes; how
//! they are created, supervised and stopped.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use outbox::testkit::proxy::FaultProxy;

use super::settings::Settings;
use crate::broker::{Broker, BrokerSettings};
use crate::db::{Admin, RunNames};
use crate::faults::{Counts, Schedule};
use crate::plan::{DbPlan, Plan, WriterPlan};
use crate::procs::{Proc, Spec};

/// A process that exits on its own this soon after its start counts towards a crash loop.
const QUICK_EXIT: Duration = Duration::from_secs(10);
/// Quick exits in a row after which the run gives up on a process.
const CRASH_LOOP: u32 = 5;
/// How long a stopping process may take before it is killed.
pub(super) const STOP_GRACE: Duration = Duration::from_secs(20);

/// Prints timestamped lines, and keeps a copy in the run directory.
pub(crate) struct Log {
    started: Instant,
    file: Option<File>,
}

impl Log {
    fn new(path: PathBuf) -> Log {
        Log {
            started: Instant::now(),
            file: File::create(path).ok(),
        }
    }

    /// Print `line` with the time since the start of the run.
    pub(crate) fn say(&mut self, line: &str) {
        let line = format!("[{:>7.1}s] {line}", self.started.elapsed().as_secs_f64());
        println!("{line}");
        if let Some(f) = self.file.as_mut() {
            let _ = writeln!(f, "{line}");
        }
    }
}

/// A relay process and the proxies between it and the servers.
pub(crate) struct RelayProc {
    /// The `outbox relay` process.
    pub(crate) proc: Proc,
    /// Between it and the database.
    pub(crate) db_proxy: FaultProxy,
    /// Between it and the broker (RabbitMQ only: Kafka clients all go through the one proxy
    /// the soak's broker advertises).
    pub(crate) broker_proxy: Option<FaultProxy>,
}

/// A run in progress.
pub(crate) struct World {
    /// The settings.
    pub(crate) s: Settings,
    /// The plan the writers and consumers read.
    pub(crate) plan: Plan,
    /// The orchestrator's connection to the database.
    pub(crate) admin: Admin,
    /// The run's broker side.
    pub(crate) broker: Broker,
    /// The relays with their proxies.
    pub(crate) relays: Vec<RelayProc>,
    /// The consumer processes.
    pub(crate) consumers: Vec<Proc>,
    /// The writer processes.
    pub(crate) writers: Vec<Proc>,
    /// Which writers finished their quota.
    pub(crate) writers_done: Vec<bool>,
    /// The fault schedule.
    pub(crate) schedule: Schedule,
    /// Faults injected so far.
    pub(crate) counts: Counts,
    /// Processes that exited on their own and were started again.
    pub(crate) restarts: u64,
    /// Exits right after a start, in a row, per process.
    quick_exits: HashMap<String, u32>,
    /// Output.
    pub(crate) log: Log,
}

impl World {
    /// Create the run's database objects, queue or topic, proxies and process specs (nothing
    /// started). On failure, whatever was created is removed again.
    pub(crate) async fn setup(s: Settings) -> Result<World> {
        std::fs::create_dir_all(&s.dir)
            .with_context(|| format!("creating the run directory {}", s.dir.display()))?;
        let mut log = Log::new(s.dir.join("soak.log"));
        let names = RunNames::new(&s.run_id);
        let admin = Admin::connect(s.db, &s.store, &names).await?;
        if let Err(e) = admin.setup(s.args.orders).await {
            let _ = admin.teardown().await;
            return Err(e);
        }
        log.say(&format!("database: {} {}", s.db.name(), names.schema));
        let topic = format!("outbox-soak-{}", s.run_id);
        let opened = Broker::open(BrokerSettings {
            arg: &s.broker,
            run_id: &s.run_id,
            topic: &topic,
            dir: &s.dir,
            ctl: s.ctl.clone(),
            nisshi_bin: s.args.nisshi_bin.as_deref(),
        })
        .await;
        let broker = match opened {
            Ok(b) => b,
            Err(e) => {
                let _ = admin.teardown().await;
                return Err(e);
            }
        };
        log.say(&format!("broker: {} {topic}", s.broker.kind()));
        match assemble(s, admin, broker, topic, log).await {
            Ok(world) => Ok(world),
            Err((e, admin, mut broker)) => {
                let _ = broker.teardown().await;
                let _ = admin.teardown().await;
                Err(e)
            }
        }
    }

    /// Start the consumers, the relays (unless held) and the writers.
    pub(crate) fn start(&mut self, relays: bool) -> Result<()> {
        for c in &mut self.consumers {
            c.start()?;
        }
        if relays {
            self.start_relays()?;
        }
        for w in &mut self.writers {
            w.start()?;
        }
        Ok(())
    }

    /// Start every relay.
    pub(crate) fn start_relays(&mut self) -> Result<()> {
        for r in &mut self.relays {
            r.proc.start()?;
        }
        Ok(())
    }

    /// Whether every writer finished its quota.
    pub(crate) fn writers_finished(&self) -> bool {
        self.writers_done.iter().all(|d| *d)
    }

    /// Note writers that finished; start again relays and consumers that exited on their
    /// own. Errors: a writer failed, or a process keeps exiting right after its start.
    pub(crate) fn supervise(&mut self) -> Result<()> {
        for (i, w) in self.writers.iter_mut().enumerate() {
            if let Some(status) = w.exited() {
                if !status.success() {
                    bail!("{} failed ({status}):\n{}", w.name, w.log_tail(3000));
                }
                self.writers_done[i] = true;
            }
        }
        let procs = self
            .relays
            .iter_mut()
            .map(|r| &mut r.proc)
            .chain(self.consumers.iter_mut());
        for p in procs {
            let Some(status) = p.exited() else { continue };
            let quick = self.quick_exits.entry(p.name.clone()).or_default();
            *quick = if p.uptime() < QUICK_EXIT {
                *quick + 1
            } else {
                1
            };
            if *quick >= CRASH_LOOP {
                bail!(
                    "{} exited {CRASH_LOOP} times in a row right after starting; last ({status}):\n{}",
                    p.name,
                    p.log_tail(3000)
                );
            }
            self.log.say(&format!(
                "{} exited on its own ({status}); starting it again",
                p.name
            ));
            self.restarts += 1;
            p.start()?;
        }
        Ok(())
    }

    /// Heal every proxy and make sure every relay and consumer runs.
    pub(crate) fn heal_and_revive(&mut self) -> Result<()> {
        for r in &mut self.relays {
            r.db_proxy.heal();
            if let Some(p) = &r.broker_proxy {
                p.heal();
            }
            if !r.proc.running() {
                r.proc.start()?;
            }
        }
        for c in &mut self.consumers {
            if !c.running() {
                c.start()?;
            }
        }
        Ok(())
    }

    /// Stop every process: writers, consumers, relays (SIGTERM, then kill -9 after a grace).
    pub(crate) async fn stop_all(&mut self) {
        let procs = self
            .writers
            .iter_mut()
            .chain(self.consumers.iter_mut())
            .chain(self.relays.iter_mut().map(|r| &mut r.proc));
        let stops: Vec<_> = procs.map(|p| p.terminate(STOP_GRACE)).collect();
        futures::future::join_all(stops).await;
    }

    /// Remove the run's database objects and queue or topic.
    pub(crate) async fn teardown(&mut self) {
        if let Err(e) = self.broker.teardown().await {
            self.log
                .say(&format!("cleaning up the broker failed: {e:#}"));
        }
        if let Err(e) = self.admin.teardown().await {
            self.log
                .say(&format!("cleaning up the database failed: {e:#}"));
        }
    }
}

type SetupError = (anyhow::Error, Admin, Broker);

/// The plan, the proxies and the process specs.
async fn assemble(
    s: Settings,
    admin: Admin,
    broker: Broker,
    topic: String,
    log: Log,
) -> Result<World, SetupError> {
    let plan = plan_of(&s, &admin, &broker, topic);
    let plan_path = s.dir.join("plan.json");
    let parts = match plan.write(&plan_path) {
        Ok(()) => relays(&s, &admin, &broker, &plan).await,
        Err(e) => Err(e),
    };
    let roles = std::env::current_exe()
        .map_err(anyhow::Error::from)
        .map(|own| Roles {
            own,
            plan: plan_path,
            dir: s.dir.clone(),
        });
    let (relays, roles) = match (parts, roles) {
        (Ok(r), Ok(roles)) => (r, roles),
        (Err(e), _) | (_, Err(e)) => return Err((e, admin, broker)),
    };
    let consumers = (1..=s.consumers)
        .map(|i| {
            let name = format!("consumer-{i}");
            roles.proc("consumer", name.clone(), &["--label", &name])
        })
        .collect();
    let writers: Vec<Proc> = (0..s.args.writers)
        .map(|i| {
            roles.proc(
                "writer",
                format!("writer-{i}"),
                &["--index", &i.to_string()],
            )
        })
        .collect();
    Ok(World {
        schedule: Schedule::new(s.seed, &s.faults, s.args.fault_interval),
        writers_done: vec![false; writers.len()],
        writers,
        consumers,
        relays,
        counts: Counts::default(),
        restarts: 0,
        quick_exits: HashMap::new(),
        log,
        plan,
        admin,
        broker,
        s,
    })
}

fn plan_of(s: &Settings, admin: &Admin, broker: &Broker, topic: String) -> Plan {
    Plan {
        run_id: s.run_id.clone(),
        db: DbPlan {
            kind: s.db,
            writer_url: admin.writer_url().to_string(),
            consumer_url: admin.consumer_url().to_string(),
            schema: admin.schema().to_string(),
        },
        broker: broker.consumer_plan(&topic),
        topic,
        writers: WriterPlan {
            messages: s.args.messages,
            writers: s.args.writers,
            orders: s.args.orders,
            rollback_share: s.args.rollback_share,
            rate: s.args.rate,
            seed: s.seed,
        },
        consumer_concurrency: s.args.consumer_concurrency,
        dir: s.dir.clone(),
    }
}

/// How the orchestrator starts its own binary in a role.
struct Roles {
    own: PathBuf,
    plan: PathBuf,
    dir: PathBuf,
}

impl Roles {
    /// `outbox-soak <role> --plan PLAN <extra> --watch-stdin`, logging to `<name>.log`.
    fn proc(&self, role: &str, name: String, extra: &[&str]) -> Proc {
        let mut args: Vec<OsString> = vec![role.into(), "--plan".into(), self.plan.clone().into()];
        args.extend(extra.iter().map(OsString::from));
        args.push("--watch-stdin".into());
        let spec = Spec {
            program: self.own.clone(),
            args,
            env: Vec::new(),
            log: self.dir.join(format!("{name}.log")),
            stdin_pipe: true,
        };
        Proc::new(name, spec)
    }
}

/// Each relay: a database proxy, a broker proxy where the broker allows one, and its
/// `outbox relay` command, settings with secrets in the environment.
async fn relays(
    s: &Settings,
    admin: &Admin,
    broker: &Broker,
    plan: &Plan,
) -> Result<Vec<RelayProc>> {
    let db_upstream = crate::db::upstream(&s.store)?;
    let mut out = Vec::new();
    for i in 1..=s.args.relays {
        let db_proxy = FaultProxy::start(&db_upstream).await?;
        let broker_proxy = match broker.relay_upstream() {
            Some(up) => Some(FaultProxy::start(up).await?),
            None => None,
        };
        let id = format!("outbox-soak-{}-relay-{i}", s.run_id);
        let mut args: Vec<OsString> = [
            "relay",
            "--relay-id",
            &id,
            "--schema",
            &plan.db.schema,
            "--lease",
            &format!("{}ms", s.args.lease.as_millis()),
            "--retention",
            "none",
            "--max-attempts",
            "1000000",
            "--retry-max",
            "5s",
            "--poll-interval",
            "100ms",
            "--http",
            "off",
            "--shutdown-timeout",
            "10s",
            "--log-level",
            "warn",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        args.extend(broker.relay_args().into_iter().map(OsString::from));
        let env = vec![
            (
                "OUTBOX_STORE".to_string(),
                admin.relay_url(db_proxy.addr())?.to_string(),
            ),
            (
                "OUTBOX_BROKER".to_string(),
                broker.relay_url(broker_proxy.as_ref().map(FaultProxy::addr))?,
            ),
        ];
        let spec = Spec {
            program: s.outbox_bin.clone(),
            args,
            env,
            log: s.dir.join(format!("relay-{i}.log")),
            stdin_pipe: false,
        };
        out.push(RelayProc {
            proc: Proc::new(format!("relay-{i}"), spec),
            db_proxy,
            broker_proxy,
        });
    }
    Ok(out)
}
