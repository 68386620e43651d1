//! Integration tests against a real RabbitMQ (`OUTBOX_TEST_AMQP_URL`); skipped loudly without
//! one unless `OUTBOX_TEST_REQUIRE` names `amqp`.

mod broker;
mod consumer;
mod faults;
mod harness;
mod subscriber;
mod suites;
