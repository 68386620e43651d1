//! The orchestrator's settings, checked before anything is created.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use url::Url;

use crate::broker::{BrokerArg, Rabbitmqctl};
use crate::cli::RunArgs;
use crate::faults::FaultKind;
use crate::plan::DbKind;

/// A run's settings, resolved.
#[derive(Debug)]
pub(crate) struct Settings {
    /// The flags as given.
    pub(crate) args: RunArgs,
    /// The store URL, parsed.
    pub(crate) store: Url,
    /// The kind of database.
    pub(crate) db: DbKind,
    /// The broker.
    pub(crate) broker: BrokerArg,
    /// Consumer processes.
    pub(crate) consumers: u32,
    /// The seed.
    pub(crate) seed: u64,
    /// The fault kinds to inject.
    pub(crate) faults: Vec<FaultKind>,
    /// The `outbox` binary.
    pub(crate) outbox_bin: PathBuf,
    /// `rabbitmqctl`, if found (RabbitMQ runs only).
    pub(crate) ctl: Option<Rabbitmqctl>,
    /// The run's id.
    pub(crate) run_id: String,
    /// The run directory.
    pub(crate) dir: PathBuf,
}

impl Settings {
    /// Check `args` and fill in the defaults.
    pub(crate) fn resolve(args: RunArgs) -> Result<Settings> {
        let store_text = args
            .store
            .clone()
            .context("no --store: give a postgres:// or mysql:// URL (or OUTBOX_SOAK_STORE)")?;
        let broker_text = args.broker.clone().context(
            "no --broker: give amqp://…, kafka://host:port or nisshi (or OUTBOX_SOAK_BROKER)",
        )?;
        let db = crate::db::kind_of(&store_text)?;
        let store = crate::db::parse_url(&store_text)?;
        let broker = BrokerArg::parse(&broker_text)?;
        check_numbers(&args)?;
        let consumers = consumers(&args, &broker)?;
        let ctl = match broker {
            BrokerArg::Amqp(_) => Rabbitmqctl::find(&args.rabbitmqctl),
            _ => None,
        };
        let faults = args.fault_kinds()?;
        check_faults(&faults, &broker, ctl.is_some())?;
        let run_id = run_id(args.run_id.as_deref())?;
        let dir = args
            .dir
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join(format!("outbox-soak-{run_id}")));
        Ok(Settings {
            store,
            db,
            broker,
            consumers,
            seed: args.seed.unwrap_or_else(random_seed),
            faults,
            outbox_bin: outbox_bin(args.outbox_bin.as_ref())?,
            ctl,
            run_id,
            dir,
            args,
        })
    }
}

fn check_numbers(a: &RunArgs) -> Result<()> {
    if a.messages == 0 || a.relays == 0 || a.writers == 0 || a.orders == 0 {
        bail!("--messages, --relays, --writers and --orders must be at least 1");
    }
    if a.consumer_concurrency == 0 {
        bail!("--consumer-concurrency must be at least 1");
    }
    if !(0.0..=1.0).contains(&a.rollback_share) {
        bail!("--rollback-share must be between 0 and 1");
    }
    if !a.rate.is_finite() || a.rate < 0.0 {
        bail!("--rate must be 0 (as fast as possible) or more");
    }
    if a.lease.is_zero() || a.fault_interval.is_zero() {
        bail!("--lease and --fault-interval must be longer than 0");
    }
    Ok(())
}

fn consumers(a: &RunArgs, broker: &BrokerArg) -> Result<u32> {
    match (broker, a.consumers) {
        (BrokerArg::Amqp(_), Some(n)) if n != 1 => bail!(
            "--consumers {n}: on RabbitMQ the soak runs one consumer process at a time (competing \
             consumers of one queue do not keep a key's order, which the soak checks)"
        ),
        (_, Some(0)) => bail!("--consumers must be at least 1"),
        (BrokerArg::Amqp(_), _) => Ok(1),
        (_, Some(n)) => Ok(n),
        (_, None) => Ok(2),
    }
}

fn check_faults(faults: &[FaultKind], broker: &BrokerArg, ctl: bool) -> Result<()> {
    let broker_faults: Vec<&FaultKind> = faults
        .iter()
        .filter(|k| matches!(k, FaultKind::BrokerCuts | FaultKind::BrokerRestarts))
        .collect();
    if broker_faults.is_empty() {
        return Ok(());
    }
    let why = match broker {
        BrokerArg::Amqp(_) if !ctl => {
            "RabbitMQ faults run rabbitmqctl on this machine, and none was found (--rabbitmqctl)"
        }
        BrokerArg::Kafka(_) => {
            "the soak cannot cut or restart an external Kafka cluster: use --broker nisshi"
        }
        _ => return Ok(()),
    };
    bail!("{why}; or turn those faults off with --no-broker-cuts --no-broker-restarts")
}

fn run_id(given: Option<&str>) -> Result<String> {
    match given {
        Some(id)
            if !id.is_empty()
                && id.len() <= 20
                && id
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()) =>
        {
            Ok(id.to_string())
        }
        Some(id) => bail!("--run-id {id:?}: use 1 to 20 lowercase letters and digits"),
        None => Ok(format!("{:08x}", rand::random::<u32>())),
    }
}

fn random_seed() -> u64 {
    rand::random::<u64>() % 1_000_000_000
}

fn outbox_bin(given: Option<&PathBuf>) -> Result<PathBuf> {
    let path = match given {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .context("finding this binary")?
            .with_file_name("outbox"),
    };
    if !path.is_file() {
        bail!(
            "the relay binary {} is missing: build it next to this one with \
             `cargo build --release -p outbox-cli -p outbox-soak --features kafka` \
             (same profile and target directory), or pass --outbox-bin",
            path.display()
        );
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::Cli;

    fn resolve(extra: &[&str]) -> Result<Settings> {
        let mut all = vec![
            "outbox-soak",
            "--store",
            "postgres://postgres@127.0.0.1:5432/test",
            "--outbox-bin",
            "/bin/sh",
        ];
        all.extend_from_slice(extra);
        Settings::resolve(Cli::try_parse_from(all)?.run)
    }

    #[test]
    fn rabbitmq_runs_one_consumer_and_kafka_a_group() {
        let amqp = [
            "--broker",
            "amqp://guest:guest@127.0.0.1:5672/%2f",
            "--rabbitmqctl",
            "sh",
        ];
        assert_eq!(resolve(&amqp).unwrap().consumers, 1);
        let mut two = amqp.to_vec();
        two.extend(["--consumers", "2"]);
        assert!(
            resolve(&two)
                .unwrap_err()
                .to_string()
                .contains("one consumer")
        );
        assert_eq!(resolve(&["--broker", "nisshi"]).unwrap().consumers, 2);
    }

    #[test]
    fn broker_faults_the_soak_cannot_inject_are_refused_unless_turned_off() {
        let external = ["--broker", "kafka://127.0.0.1:9092"];
        let err = resolve(&external).unwrap_err().to_string();
        assert!(err.contains("--broker nisshi"), "{err}");
        let mut off = external.to_vec();
        off.extend(["--no-broker-cuts", "--no-broker-restarts"]);
        assert!(resolve(&off).is_ok());
        let no_ctl = ["--broker", "amqp://h/%2f", "--rabbitmqctl", "none"];
        assert!(
            resolve(&no_ctl)
                .unwrap_err()
                .to_string()
                .contains("rabbitmqctl")
        );
    }

    #[test]
    fn a_given_seed_and_run_id_are_kept_and_bad_ids_refused() {
        let s = resolve(&["--broker", "nisshi", "--seed", "42", "--run-id", "ci1"]).unwrap();
        assert_eq!((s.seed, s.run_id.as_str()), (42, "ci1"));
        assert!(s.dir.ends_with("outbox-soak-ci1"));
        assert!(resolve(&["--broker", "nisshi", "--run-id", "Bad-Id"]).is_err());
    }
}
