//! A bound table always holds the merge's visible rows: after every push, whatever the order, batching,
//! ties, late deletes, resurrections and re-sends, each row the merge shows holds exactly its visible
//! fields (other columns as a fresh INSERT would leave them) and each row the merge hides is absent; and
//! the tenant's digest, kept on every write, equals the one computed from its rows.
//!
//! Random histories are generated with proptest from a printed seed. The suite runs 1,000 histories;
//! `SYNC_EXT_CASES=10000 cargo test -p sync_ext_pgrx_tests --test bound_tables` runs ten times more, and
//! `SYNC_EXT_SEED=<seed>` replays a failing run.

use std::cell::{Cell, RefCell};

use postgres::Client;
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use serde_json::Value;
use sync_ext_pgrx_tests::{push, Cluster};
use sync_ext_protocol::arbitrary::shuffled_change_set;
use sync_ext_protocol::{Change, Status};

fn env_number(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|value| value.parse().ok())
}

/// The table rows of a tenant, as portable JSON keyed by id (the tenant column left out).
fn table_rows(client: &mut Client, tenant: &str) -> Value {
    client
        .query_one(
            "SELECT coalesce(jsonb_object_agg(t.id, sync_row_to_portable(t) - 'tenant_id'), '{}') FROM todos AS t WHERE t.tenant_id = $1",
            &[&tenant],
        )
        .unwrap()
        .get(0)
}

/// What the table must hold: each visible snapshot row over the columns' defaults (c has one).
fn expected_rows(client: &mut Client, tenant: &str) -> Value {
    client
        .query_one(
            "SELECT coalesce(jsonb_object_agg(s.id, jsonb_build_object('id', s.id, 'a', NULL, 'b', NULL, 'c', 'dflt') || s.value), '{}')
               FROM sync_ext.snapshots AS s WHERE s.tenant_id = $1 AND NOT s.deleted",
            &[&tenant],
        )
        .unwrap()
        .get(0)
}

/// A history in the order it arrives: the changes shuffled, some sent again later, cut into batches.
fn arrivals(shuffled: Vec<Change>, resends: &[(prop::sample::Index, prop::sample::Index)], batch_sizes: &[usize]) -> Vec<Vec<Change>> {
    let mut sequence = shuffled;
    for (which, at) in resends {
        let again = sequence[which.index(sequence.len())].clone();
        let position = at.index(sequence.len() + 1);
        sequence.insert(position, again);
    }
    let mut batches = Vec::new();
    let mut sizes = batch_sizes.iter().cycle();
    while !sequence.is_empty() {
        let size = (*sizes.next().expect("at least one size")).min(sequence.len());
        batches.push(sequence.drain(..size).collect());
    }
    batches
}

#[test]
fn a_bound_table_equals_the_merges_visible_rows_after_every_push() {
    let cluster = Cluster::start();
    cluster.create_database("sync");
    let mut client = cluster.connect("sync");
    client
        .batch_execute(
            "CREATE TABLE todos (id text PRIMARY KEY, tenant_id text NOT NULL, a jsonb, b jsonb, c jsonb DEFAULT '\"dflt\"');
             SELECT sync_register_model('todo', 'todos', tenant_column => 'tenant_id');",
        )
        .unwrap();
    let client = RefCell::new(client);
    let history = Cell::new(0u32);
    let seed = env_number("SYNC_EXT_SEED").unwrap_or_else(|| std::process::id().into());
    let cases = env_number("SYNC_EXT_CASES").unwrap_or(1000) as u32;
    let config = Config { cases, failure_persistence: None, ..Config::default() };
    let mut seed_bytes = [0u8; 32];
    seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let mut runner = TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes));
    let strategy = (shuffled_change_set(), vec((any::<prop::sample::Index>(), any::<prop::sample::Index>()), 0..4), vec(1..6usize, 1..6));
    let outcome = runner.run(&strategy, |((_, shuffled), resends, batch_sizes)| {
        history.set(history.get() + 1);
        let tenant = format!("history-{}", history.get());
        let client = &mut *client.borrow_mut();
        // Every history has rows of its own in the one table (its key is the pk alone).
        let shuffled = shuffled.into_iter().map(|change| Change { pk: format!("{tenant}/{}", change.pk), ..change }).collect();
        for (number, batch) in arrivals(shuffled, &resends, &batch_sizes).iter().enumerate() {
            let response = push(client, &tenant, batch).map_err(|error| TestCaseError::fail(format!("push {number}: {error:?}")))?;
            let rejected: Vec<_> = response.results.iter().filter(|result| matches!(result.status, Status::Rejected { .. })).collect();
            prop_assert!(rejected.is_empty(), "push {number} refused changes: {rejected:?}");
            prop_assert_eq!(table_rows(client, &tenant), expected_rows(client, &tenant), "after push {} of {:?}", number, batch);
            let digest_kept: bool = client
                .query_one("SELECT digest = sync_ext.tenant_digest(tenant_id) FROM sync_ext.tenants WHERE tenant_id = $1", &[&tenant])
                .unwrap()
                .get(0);
            prop_assert!(digest_kept, "the digest kept by push {} equals the one computed from the rows", number);
        }
        Ok(())
    });
    if let Err(failure) = outcome {
        panic!("{failure}\nreplay with SYNC_EXT_SEED={seed}");
    }
}
