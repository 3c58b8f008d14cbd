//! The PostgreSQL test harness itself (tests/common/pg.rs, scripts/test-postgres): a
//! reachable shared server, isolated empty schemas, and a private server that stops and
//! comes back on its port.

use crate::common::pg::{self, PrivateServer};

#[test]
fn fresh_stores_are_distinct_empty_schemas_on_the_shared_server() {
    let Some(url) = pg::server() else { return };
    assert_eq!(pg::psql(&url, "SELECT 1 + 1"), "2");

    let a = pg::fresh_store(&url);
    let b = pg::fresh_store(&url);
    assert_ne!(a, b);
    let schema_a = pg::psql(&a, "SELECT current_schema()");
    let schema_b = pg::psql(&b, "SELECT current_schema()");
    assert!(schema_a.starts_with("t_"), "search_path not applied: {schema_a:?}");
    assert_ne!(schema_a, schema_b);
    let tables = "SELECT count(*) FROM pg_tables WHERE schemaname = current_schema()";
    assert_eq!(pg::psql(&a, tables), "0");

    // An unqualified table lands in the store's schema and no other.
    pg::psql(&a, "CREATE TABLE probe (x int); INSERT INTO probe VALUES (7)");
    assert_eq!(pg::psql(&a, "SELECT x FROM probe"), "7");
    assert_eq!(pg::psql(&b, tables), "0");
    assert_eq!(pg::psql(&url, &format!("SELECT x FROM {schema_a}.probe")), "7");
}

#[test]
fn a_private_server_stops_and_restarts_on_its_port() {
    let Some(server) = PrivateServer::start("harness") else { return };
    let store = pg::fresh_store(server.url());
    pg::psql(&store, "CREATE TABLE kept (x int); INSERT INTO kept VALUES (1)");

    server.stop();
    let err = pg::try_psql(server.url(), "SELECT 1").expect_err("the stopped server answered");
    assert!(err.contains("Connection refused"), "{err}");

    server.start_again();
    assert_eq!(pg::psql(&store, "SELECT x FROM kept"), "1");
}
