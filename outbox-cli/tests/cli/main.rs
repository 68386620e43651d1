//! Process tests of the `outbox` command: the real binary, run as an operator would, against
//! the PostgreSQL and RabbitMQ of `OUTBOX_TEST_POSTGRES_URL` and `OUTBOX_TEST_AMQP_URL` (each
//! test in a fresh schema and on a fresh exchange and queue). Without them the backend tests
//! are skipped loudly, and fail under `OUTBOX_TEST_REQUIRE`. One test binary with modules, to
//! keep link times down.

mod common;
mod operator;
mod relay;
mod secrets;
mod settings;
