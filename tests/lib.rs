//! chan-run's integration tests, as one crate (one build and one link for them all):
//! each module drives the real binary through `common::TestEnv`.

mod common;

mod bad_input;
mod collect;
mod crash;
mod exit_codes;
mod hardening;
mod hostile;
mod io;
mod limits;
mod load;
mod mutex;
mod names;
mod operators;
mod order;
mod pg_harness;
mod pools;
mod postgres;
mod postgres_attack;
mod postgres_collect;
mod postgres_outage;
mod postgres_partition;
mod postgres_pooler;
mod postgres_pools;
mod profiles;
mod sessions;
mod signals;
mod spend;
mod state;
mod status;
mod terminal;
mod write_failures;
