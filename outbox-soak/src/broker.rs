//! The run's broker: its isolated queue (RabbitMQ, in a virtual host of the run's own) or
//! topic (Kafka), how relays and consumers reach it, and the broker's faults (cutting every
//! connection of the run, restarting the broker).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use outbox::registry::BrokerKind;
use outbox::testkit::proxy::FaultProxy;
use tokio::process::Command;
use url::Url;

use crate::nisshi::{self, Nisshi};
use crate::plan::BrokerPlan;

/// Partitions of the run's Kafka topic.
#[cfg(feature = "kafka")]
const KAFKA_PARTITIONS: i32 = 8;

/// How long one `rabbitmqctl` call may take.
const CTL_TIMEOUT: Duration = Duration::from_secs(120);

/// The `rabbitmqctl` command the soak runs (possibly with options: `rabbitmqctl -n node`).
#[derive(Debug, Clone)]
pub(crate) struct Rabbitmqctl {
    program: String,
    prefix: Vec<String>,
}

impl Rabbitmqctl {
    /// The command `cmd` (words split on whitespace), or `None` for `none` or a program that
    /// is neither a path that exists nor on `PATH`.
    pub(crate) fn find(cmd: &str) -> Option<Rabbitmqctl> {
        let mut words = cmd.split_whitespace().map(str::to_string);
        let program = words.next().filter(|p| p != "none")?;
        let found = if program.contains('/') {
            Path::new(&program).is_file()
        } else {
            std::env::var_os("PATH").is_some_and(|path| {
                std::env::split_paths(&path).any(|dir| dir.join(&program).is_file())
            })
        };
        found.then(|| Rabbitmqctl {
            program,
            prefix: words.collect(),
        })
    }

    /// Run it with `args`; its stdout, or an error with its stderr.
    pub(crate) async fn run(&self, args: &[&str]) -> Result<String> {
        let output = tokio::time::timeout(
            CTL_TIMEOUT,
            Command::new(&self.program)
                .args(&self.prefix)
                .args(args)
                .kill_on_drop(true)
                .output(),
        )
        .await
        .with_context(|| format!("{} {} timed out", self.program, args.join(" ")))?
        .with_context(|| format!("running {}", self.program))?;
        if !output.status.success() {
            bail!(
                "{} {} failed ({}): {}",
                self.program,
                args.join(" "),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }
}

/// The `--broker` setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum BrokerArg {
    /// RabbitMQ at this URL.
    Amqp(String),
    /// A Kafka cluster at these bootstrap servers (not restartable by the soak).
    Kafka(String),
    /// A nisshi process of the soak's own.
    Nisshi,
}

impl BrokerArg {
    /// Parse `--broker`.
    pub(crate) fn parse(text: &str) -> Result<BrokerArg> {
        let text = text.trim();
        if text.eq_ignore_ascii_case("nisshi") {
            return Ok(BrokerArg::Nisshi);
        }
        match BrokerKind::of(text) {
            Some(BrokerKind::Amqp) => Ok(BrokerArg::Amqp(text.to_string())),
            Some(BrokerKind::Kafka) => match BrokerKind::kafka_bootstrap(text) {
                Some(servers) if !servers.is_empty() => Ok(BrokerArg::Kafka(servers.to_string())),
                _ => bail!("kafka:// names no bootstrap server: use kafka://host:port"),
            },
            _ => bail!(
                "--broker must be amqp://…, kafka://host:port or nisshi (a broker of its own)"
            ),
        }
    }

    /// The kind, for output.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            BrokerArg::Amqp(_) => "rabbitmq",
            BrokerArg::Kafka(_) | BrokerArg::Nisshi => "kafka",
        }
    }
}

/// RabbitMQ as the run uses it.
pub(crate) struct AmqpSide {
    ctl: Option<Rabbitmqctl>,
    /// The URL with the run's virtual host.
    url: Url,
    /// The run's virtual host, if the soak created one.
    vhost: Option<String>,
    queue: String,
    upstream: String,
}

/// Kafka as the run uses it.
pub(crate) struct KafkaSide {
    proxy: Option<FaultProxy>,
    nisshi: Option<Nisshi>,
    bootstrap: String,
    topic: String,
}

/// The run's broker.
pub(crate) enum Broker {
    /// RabbitMQ.
    Amqp(AmqpSide),
    /// Kafka.
    Kafka(KafkaSide),
}

/// What the broker side of a run needs to open.
pub(crate) struct BrokerSettings<'a> {
    /// `--broker`.
    pub(crate) arg: &'a BrokerArg,
    /// The run's id.
    pub(crate) run_id: &'a str,
    /// The topic (queue) name.
    pub(crate) topic: &'a str,
    /// The run directory.
    pub(crate) dir: &'a Path,
    /// `--rabbitmqctl`, found.
    pub(crate) ctl: Option<Rabbitmqctl>,
    /// `--nisshi-bin`.
    pub(crate) nisshi_bin: Option<&'a Path>,
}

impl Broker {
    /// Prepare the run's queue or topic (and start the soak's own broker).
    pub(crate) async fn open(s: BrokerSettings<'_>) -> Result<Broker> {
        match s.arg {
            BrokerArg::Amqp(url) => Ok(Broker::Amqp(open_amqp(url, &s).await?)),
            BrokerArg::Kafka(bootstrap) => {
                create_topic(bootstrap, s.topic).await?;
                Ok(Broker::Kafka(KafkaSide {
                    proxy: None,
                    nisshi: None,
                    bootstrap: bootstrap.clone(),
                    topic: s.topic.to_string(),
                }))
            }
            BrokerArg::Nisshi => open_nisshi(&s).await.map(Broker::Kafka),
        }
    }

    /// How consumers reach it.
    pub(crate) fn consumer_plan(&self, group: &str) -> BrokerPlan {
        match self {
            Broker::Amqp(a) => BrokerPlan::Amqp {
                url: a.url.to_string(),
                queue: a.queue.clone(),
            },
            Broker::Kafka(k) => BrokerPlan::Kafka {
                bootstrap: k.bootstrap.clone(),
                group: group.to_string(),
            },
        }
    }

    /// The server a relay's own broker proxy forwards to, if relays get one (RabbitMQ: yes;
    /// Kafka: no, every client goes through the one proxy the broker advertises).
    pub(crate) fn relay_upstream(&self) -> Option<&str> {
        match self {
            Broker::Amqp(a) => Some(&a.upstream),
            Broker::Kafka(_) => None,
        }
    }

    /// The broker URL of a relay whose own proxy (if any) listens at `proxy`.
    pub(crate) fn relay_url(&self, proxy: Option<SocketAddr>) -> Result<String> {
        match (self, proxy) {
            (Broker::Amqp(a), Some(addr)) => Ok(crate::db::via(&a.url, addr)?.to_string()),
            (Broker::Amqp(a), None) => Ok(a.url.to_string()),
            (Broker::Kafka(k), _) => Ok(format!("kafka://{}", k.bootstrap)),
        }
    }

    /// Extra arguments of `outbox relay` for this broker.
    pub(crate) fn relay_args(&self) -> Vec<String> {
        match self {
            // The default exchange: the queue named like the topic receives the messages.
            Broker::Amqp(_) => vec!["--exchange".into(), String::new()],
            Broker::Kafka(_) => Vec::new(),
        }
    }

    /// Close every client connection of the run; says what was done.
    pub(crate) async fn cut(&self) -> Result<String> {
        match self {
            Broker::Amqp(a) => {
                let (ctl, vhost) = (a.ctl.as_ref(), a.vhost.as_deref());
                let (Some(ctl), Some(vhost)) = (ctl, vhost) else {
                    bail!("no rabbitmqctl");
                };
                ctl.run(&[
                    "close_all_connections",
                    "-p",
                    vhost,
                    "outbox-soak broker cut",
                ])
                .await?;
                Ok(format!("rabbitmqctl close_all_connections -p {vhost}"))
            }
            Broker::Kafka(k) => {
                let proxy = k.proxy.as_ref().context("no proxy")?;
                proxy.cut();
                Ok("every Kafka client connection cut at the broker's address".into())
            }
        }
    }

    /// Stop the broker, wait `down`, start it again; says what was done.
    pub(crate) async fn restart(&mut self, down: Duration) -> Result<String> {
        match self {
            Broker::Amqp(a) => {
                let ctl = a.ctl.as_ref().context("no rabbitmqctl")?;
                ctl.run(&["stop_app"]).await?;
                tokio::time::sleep(down).await;
                start_app(ctl).await?;
                Ok("rabbitmqctl stop_app, start_app".into())
            }
            Broker::Kafka(k) => {
                let nisshi = k.nisshi.as_mut().context("no broker of the soak's own")?;
                nisshi.kill().await?;
                tokio::time::sleep(down).await;
                nisshi.start_again().await?;
                Ok("nisshi killed (kill -9) and started again on its storage".into())
            }
        }
    }

    /// Remove the run's virtual host, queue or topic; stop the soak's own broker.
    pub(crate) async fn teardown(&mut self) -> Result<()> {
        match self {
            Broker::Amqp(a) => match (&a.ctl, &a.vhost) {
                (Some(ctl), Some(vhost)) => ctl.run(&["delete_vhost", vhost]).await.map(drop),
                _ => delete_queue(&a.url, &a.queue).await,
            },
            Broker::Kafka(k) => match k.nisshi.as_mut() {
                Some(nisshi) => {
                    nisshi.stop().await;
                    Ok(())
                }
                None => delete_topic(&k.bootstrap, &k.topic).await,
            },
        }
    }
}

async fn open_amqp(url: &str, s: &BrokerSettings<'_>) -> Result<AmqpSide> {
    let base = Url::parse(url)
        .map_err(|e| anyhow::anyhow!("bad --broker URL {}: {e}", outbox::redact_url(url)))?;
    let upstream = crate::db::upstream(&base)?;
    let (url, vhost) = match &s.ctl {
        Some(ctl) => {
            let vhost = format!("outbox-soak-{}", s.run_id);
            let user = percent_encoding::percent_decode_str(base.username()).decode_utf8_lossy();
            let user = if user.is_empty() {
                "guest".into()
            } else {
                user
            };
            ctl.run(&["add_vhost", &vhost]).await?;
            ctl.run(&["set_permissions", "-p", &vhost, &user, ".*", ".*", ".*"])
                .await?;
            let mut with_vhost = base.clone();
            with_vhost.set_path(&format!("/{vhost}"));
            (with_vhost, Some(vhost))
        }
        None => (base, None),
    };
    outbox::amqp::Topology::new("")
        .queue(outbox::amqp::QueueSpec::new(s.topic))
        .declare(url.as_str())
        .await
        .context("declaring the run's queue")?;
    Ok(AmqpSide {
        ctl: s.ctl.clone(),
        url,
        vhost,
        queue: s.topic.to_string(),
        upstream,
    })
}

/// `start_app`, tried again a few times (it can fail while the node is still stopping), then
/// `await_startup`.
async fn start_app(ctl: &Rabbitmqctl) -> Result<()> {
    let mut last = None;
    for _ in 0..5 {
        match ctl.run(&["start_app"]).await {
            Ok(_) => {
                ctl.run(&["await_startup"]).await?;
                return Ok(());
            }
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("start_app failed")))
}

async fn delete_queue(url: &Url, queue: &str) -> Result<()> {
    let conn = lapin::Connection::connect(url.as_str(), lapin::ConnectionProperties::default())
        .await
        .context("connecting to RabbitMQ to delete the run's queue")?;
    let channel = conn.create_channel().await?;
    channel
        .queue_delete(queue.into(), lapin::options::QueueDeleteOptions::default())
        .await
        .context("deleting the run's queue")?;
    let _ = conn.close(200, "outbox-soak done".into()).await;
    Ok(())
}

async fn open_nisshi(s: &BrokerSettings<'_>) -> Result<KafkaSide> {
    let binary = nisshi::binary(s.nisshi_bin).context(
        "no nisshi binary: pass --nisshi-bin, set OUTBOX_TEST_KAFKA_BIN, or install it: \
         cargo install nisshi --version 0.8.1 --locked --ignore-rust-version \
         --no-default-features --features dynostore,libsql --root ~/.cache/nisshi",
    )?;
    let port = nisshi::free_port()?;
    let proxy = FaultProxy::start(&format!("127.0.0.1:{port}")).await?;
    let nisshi = Nisshi::start(&binary, &s.dir.join("nisshi"), port, proxy.addr()).await?;
    let bootstrap = proxy.addr().to_string();
    create_topic(&bootstrap, s.topic).await?;
    Ok(KafkaSide {
        proxy: Some(proxy),
        nisshi: Some(nisshi),
        bootstrap,
        topic: s.topic.to_string(),
    })
}

#[cfg(feature = "kafka")]
async fn create_topic(bootstrap: &str, topic: &str) -> Result<()> {
    outbox::kafka::KafkaAdmin::new(bootstrap)?
        .ensure_topic(topic, KAFKA_PARTITIONS)
        .await
        .with_context(|| format!("creating topic {topic}"))
}

#[cfg(feature = "kafka")]
async fn delete_topic(bootstrap: &str, topic: &str) -> Result<()> {
    outbox::kafka::KafkaAdmin::new(bootstrap)?
        .delete_topics(&[topic])
        .await
        .with_context(|| format!("deleting topic {topic}"))
}

#[cfg(not(feature = "kafka"))]
async fn create_topic(_: &str, _: &str) -> Result<()> {
    bail!("this build of outbox-soak has no Kafka support: build it with --features kafka")
}

#[cfg(not(feature = "kafka"))]
async fn delete_topic(_: &str, _: &str) -> Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_settings_name_rabbitmq_kafka_or_a_broker_of_its_own() {
        assert_eq!(
            BrokerArg::parse("amqp://guest:guest@h:5672/%2f").unwrap(),
            BrokerArg::Amqp("amqp://guest:guest@h:5672/%2f".into())
        );
        assert_eq!(
            BrokerArg::parse("kafka://h1:9092,h2:9092/").unwrap(),
            BrokerArg::Kafka("h1:9092,h2:9092".into())
        );
        assert_eq!(BrokerArg::parse("nisshi").unwrap(), BrokerArg::Nisshi);
        assert!(BrokerArg::parse("kafka://").is_err());
        assert!(BrokerArg::parse("nats://x").is_err());
    }

    #[test]
    fn rabbitmqctl_none_or_missing_is_no_command() {
        assert!(Rabbitmqctl::find("none").is_none());
        assert!(Rabbitmqctl::find("/nonexistent/rabbitmqctl -n x").is_none());
        let sh = Rabbitmqctl::find("sh -c").unwrap();
        assert_eq!(sh.prefix, vec!["-c".to_string()]);
    }
}
