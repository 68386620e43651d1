//! Injecting one fault of the schedule.

use std::time::Duration;

use anyhow::Result;

use super::world::World;
use crate::faults::FaultKind;

impl World {
    /// Inject the schedule's next fault and count it. A fault that could not be injected is
    /// reported and not counted; a broker that does not come back ends the run.
    pub(crate) async fn inject(&mut self) -> Result<()> {
        let Some(kind) = self.schedule.next_kind() else {
            return Ok(());
        };
        let started = std::time::Instant::now();
        let done = match kind {
            FaultKind::RelayKills => self.kill_relay().await,
            FaultKind::ConsumerKills => self.kill_consumer().await,
            FaultKind::DbCuts => self.cut_db().await,
            FaultKind::BrokerCuts => self.broker.cut().await,
            FaultKind::BrokerRestarts => {
                let down = self
                    .schedule
                    .between(Duration::from_secs(1), Duration::from_secs(3));
                self.broker.restart(down).await
            }
            FaultKind::Stalls => self.stall().await,
        };
        match done {
            Ok(what) => {
                self.counts.add(kind);
                let n = self.counts.total();
                let took = started.elapsed().as_secs_f64();
                self.log
                    .say(&format!("fault {n} {kind} ({took:.1}s): {what}"));
                Ok(())
            }
            Err(e) if kind == FaultKind::BrokerRestarts => {
                Err(e.context("restarting the broker failed"))
            }
            Err(e) => {
                self.log.say(&format!(
                    "fault {kind} could not be injected (not counted): {e:#}"
                ));
                Ok(())
            }
        }
    }

    async fn kill_relay(&mut self) -> Result<String> {
        let i = self.schedule.target(self.relays.len());
        let pause = self
            .schedule
            .between(Duration::from_millis(200), Duration::from_secs(2));
        let relay = &mut self.relays[i].proc;
        relay.kill9().await;
        tokio::time::sleep(pause).await;
        relay.start()?;
        Ok(format!(
            "kill -9 {}, started again after {:.1}s",
            relay.name,
            pause.as_secs_f64()
        ))
    }

    async fn kill_consumer(&mut self) -> Result<String> {
        let i = self.schedule.target(self.consumers.len());
        let pause = self
            .schedule
            .between(Duration::from_millis(200), Duration::from_millis(1500));
        let consumer = &mut self.consumers[i];
        consumer.kill9().await;
        tokio::time::sleep(pause).await;
        consumer.start()?;
        Ok(format!(
            "kill -9 {}, started again after {:.1}s",
            consumer.name,
            pause.as_secs_f64()
        ))
    }

    async fn cut_db(&mut self) -> Result<String> {
        let n = self.admin.kill_sessions().await?;
        let how = match self.s.db {
            crate::plan::DbKind::Postgres => "pg_terminate_backend",
            crate::plan::DbKind::MySql => "KILL CONNECTION",
        };
        Ok(format!(
            "{how}: the database ended {n} session(s) of the relays and consumers"
        ))
    }

    async fn stall(&mut self) -> Result<String> {
        let i = self.schedule.target(self.relays.len());
        let extra = self
            .schedule
            .between(Duration::from_secs(1), Duration::from_secs(3));
        let length = self.s.args.lease + extra;
        let relay = &self.relays[i];
        relay.db_proxy.stall();
        if let Some(p) = &relay.broker_proxy {
            p.stall();
        }
        tokio::time::sleep(length).await;
        relay.db_proxy.heal();
        if let Some(p) = &relay.broker_proxy {
            p.heal();
        }
        Ok(format!(
            "{}'s connections to the database{} stalled for {:.1}s (lease {:.1}s), then healed",
            relay.proc.name,
            if relay.broker_proxy.is_some() {
                " and the broker"
            } else {
                ""
            },
            length.as_secs_f64(),
            self.s.args.lease.as_secs_f64()
        ))
    }
}
