//! Property: the merge converges whatever order and batching changes arrive in.

use std::collections::{BTreeMap, HashMap};

use proptest::prelude::*;
use serde_json::{Map, Value};
use sync_ext_protocol::arbitrary::{change_set, shuffled_change_set};
use sync_ext_protocol::{merge_all, merge_batch, BatchContext, Change, PulledChange, RowKey, RowState, Status};

type Rows = BTreeMap<RowKey, RowState>;

fn visible(rows: &Rows) -> BTreeMap<RowKey, Option<Map<String, Value>>> {
    rows.iter().map(|(key, row)| (key.clone(), row.visible())).collect()
}

/// Pushes `changes` in batches of the given sizes the way the server does, returning the final
/// rows and the log a pulling client would receive.
fn push_in_batches(changes: &[Change], batch_sizes: &[usize]) -> (Rows, Vec<PulledChange>) {
    let mut rows: HashMap<RowKey, RowState> = HashMap::new();
    let mut log = Vec::new();
    let mut last_seq = 0;
    let mut rest = changes;
    for size in batch_sizes.iter().copied().chain(std::iter::repeat(usize::MAX)) {
        if rest.is_empty() {
            break;
        }
        let (batch, tail) = rest.split_at(size.clamp(1, rest.len()));
        rest = tail;
        let context = BatchContext { last_seq, logged: HashMap::new(), rows: rows.clone(), latest_allowed_millis: i64::MAX, stale_through: None, refused: HashMap::new(), scopes: &Default::default(), instances: HashMap::new(), writable: None };
        let outcome = merge_batch(batch, context);
        for appended in &outcome.appended {
            let change = &batch[appended.index];
            log.push(PulledChange {
                seq: appended.seq,
                op_id: change.op_id,
                model: change.model.clone(),
                pk: change.pk.clone(),
                op: change.op,
                hlc: change.hlc,
                actor: change.actor.clone(),
                value: appended.payload.clone(),
                field_stamps: None,
                deleted_hlc: None,
            });
        }
        for (key, touched) in outcome.rows {
            rows.insert(key, touched.state);
        }
        assert!(outcome.results.iter().all(|r| !matches!(r.status, Status::Rejected { .. })));
        last_seq = outcome.last_seq;
    }
    (rows.into_iter().collect(), log)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn any_order_gives_the_same_state((changes, shuffled) in shuffled_change_set()) {
        let reference = merge_all(&changes);
        prop_assert_eq!(&merge_all(&shuffled), &reference);
        let mut reversed = changes.clone();
        reversed.reverse();
        prop_assert_eq!(&merge_all(&reversed), &reference);
    }

    #[test]
    fn redelivery_changes_nothing(changes in change_set(3, 16)) {
        let once = merge_all(&changes);
        let twice = merge_all(changes.iter().chain(changes.iter()));
        prop_assert_eq!(twice, once);
    }

    #[test]
    fn shuffled_batches_match_and_the_pulled_log_replays_to_the_same_rows(
        (changes, shuffled) in shuffled_change_set(),
        batch_sizes in proptest::collection::vec(1usize..6, 1..8),
    ) {
        let reference = merge_all(&changes);
        let (server, log) = push_in_batches(&shuffled, &batch_sizes);
        prop_assert_eq!(&server, &reference);
        prop_assert_eq!(visible(&merge_all(&log.iter().map(PulledChange::to_change).collect::<Vec<_>>())), visible(&reference));
        let seqs: Vec<i64> = log.iter().map(|c| c.seq).collect();
        prop_assert_eq!(seqs, (1..=log.len() as i64).collect::<Vec<_>>());
    }
}
