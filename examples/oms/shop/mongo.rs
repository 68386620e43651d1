//! The shop on MongoDB (a replica set), in a database of its own for this run.

use super::*;
use mongodb::bson::{Binary, Document, doc, spec::BinarySubtype};
use outbox_mongo::MongoStore;

/// The shop on MongoDB: collections `orders` and `order_effects` beside the outbox's.
#[derive(Clone)]
pub(crate) struct MongoShop(pub MongoStore);

impl MongoShop {
    fn orders(&self) -> mongodb::Collection<Document> {
        self.0.database().collection("orders")
    }

    fn effects(&self) -> mongodb::Collection<Document> {
        self.0.database().collection("order_effects")
    }
}

fn uuid(id: MessageId) -> Binary {
    Binary {
        subtype: BinarySubtype::Uuid,
        bytes: id.as_bytes().to_vec(),
    }
}

#[async_trait]
impl Shop for MongoShop {
    type S = MongoStore;
    fn store(&self) -> &MongoStore {
        &self.0
    }

    /// Collections must exist before transactions write to them (MongoDB creates none inside
    /// a transaction before 4.4, and the store's migration made its own already).
    async fn setup(&self) -> Result<()> {
        let db = self.0.database();
        let existing = db.list_collection_names().await?;
        for name in ["orders", "order_effects"] {
            if !existing.iter().any(|c| c == name) {
                db.create_collection(name).await?;
            }
        }
        Ok(())
    }

    async fn place_order(&self, topic: &str, order: &str) -> Result<()> {
        let mut tx = self.0.begin().await?;
        self.orders()
            .insert_one(doc! { "_id": order, "state": "placed", "version": 1 })
            .session(&mut *tx)
            .await?;
        let first = NewMessage::new(topic, order, format!("{order}:placed").into_bytes());
        self.0.enqueue(&mut tx, &[first]).await?;
        self.0.commit(tx).await?;
        Ok(())
    }

    async fn apply(
        &self,
        tx: &mut <Self::S as Transactional>::Tx,
        topic: &str,
        msg: &Received,
    ) -> Result<()> {
        let (order, step) = parse(msg)?;
        if let Some(next) = STEPS.get(step + 1) {
            let done = self
                .orders()
                .update_one(
                    doc! { "_id": &order, "state": STEPS[step] },
                    doc! { "$set": { "state": *next }, "$inc": { "version": 1 } },
                )
                .session(&mut **tx)
                .await?;
            if done.matched_count != 1 {
                bail!(
                    "order {order} is not in state {} for message {}",
                    STEPS[step],
                    msg.id
                );
            }
        }
        self.effects()
            .insert_one(
                doc! { "message_id": uuid(msg.id), "order_id": &order, "step": STEPS[step] },
            )
            .session(&mut **tx)
            .await?;
        if let Some(m) = next_message(topic, &order, step) {
            self.0.enqueue(tx, &[m]).await?;
        }
        Ok(())
    }

    async fn tally(&self) -> Result<Tally> {
        let shipped = self
            .orders()
            .count_documents(doc! { "state": "shipped" })
            .await?;
        let effects = self.effects().count_documents(doc! {}).await?;
        let distinct = self.effects().distinct("message_id", doc! {}).await?.len();
        let outbox = self
            .0
            .database()
            .collection::<Document>(&self.0.outbox_collection());
        let mut committed = Vec::new();
        for id in outbox.distinct("_id", doc! {}).await? {
            if let mongodb::bson::Bson::Binary(b) = id {
                committed.push(MessageId::from_slice(&b.bytes)?);
            }
        }
        Ok(Tally {
            shipped,
            effects,
            distinct_effects: u64::try_from(distinct).unwrap_or(u64::MAX),
            committed,
        })
    }

    async fn cleanup(&self) -> Result<()> {
        self.0.database().drop().await?;
        Ok(())
    }
}
