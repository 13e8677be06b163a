//! The contract as data, against the client crate and without a server: for every case of
//! `conformance/` (format in `conformance/README.md`), a `SyncClient` with a memory store syncs with a
//! scripted [`Remote`] that answers its pulls with the case's expected pull responses, in step order
//! (resets included), and the client's visible rows must equal each `rows` step it can know.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde_json::{Map, Value};
use sync_ext_client::protocol::conformance::{self, DEFAULT_TENANT, MIN_CASES};
use sync_ext_client::protocol::{Change, PullResponse, PushResponse};
use sync_ext_client::{Error, LocalStore, Remote, RemoteFuture, Result, SyncClient};

/// Fewer `rows` steps checked over all cases than this means the run checked too little: it fails.
const MIN_ROWS_CHECKED: usize = 40;

/// The repository's case files, in name order.
fn case_files() -> Vec<PathBuf> {
    conformance::case_files(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../conformance"))
}

/// Pull responses waiting to be served, and what went wrong while serving them.
#[derive(Default)]
struct Script {
    pages: VecDeque<PullResponse>,
    /// The cursor of the last page served: the `since` the client must ask next.
    cursor: i64,
    problems: Vec<String>,
}

/// A [`Remote`] that serves scripted pull responses in order and takes no pushes.
#[derive(Clone, Default)]
struct ScriptedRemote(Arc<Mutex<Script>>);

impl Remote for ScriptedRemote {
    fn push<'a>(&'a self, _tenant: &'a str, changes: &'a [Change]) -> RemoteFuture<'a, PushResponse> {
        let error = Error::Protocol(format!("the conformance client makes no local writes, yet it pushed {} changes", changes.len()));
        Box::pin(async move { Err(error) })
    }

    fn pull<'a>(&'a self, _tenant: &'a str, since: i64, _max_changes: i32, _scopes: Option<&'a [String]>) -> RemoteFuture<'a, PullResponse> {
        Box::pin(async move { self.next_page(since) })
    }
}

impl ScriptedRemote {
    fn next_page(&self, since: i64) -> Result<PullResponse> {
        let mut script = self.0.lock().expect("the script lock");
        if since != script.cursor {
            let problem = format!("the client pulled since {since}, not from the cursor {} of the page it was last given", script.cursor);
            script.problems.push(problem);
        }
        let page = script.pages.pop_front().ok_or_else(|| Error::Protocol("the client pulled beyond the case's pull responses".into()))?;
        script.cursor = page.cursor;
        Ok(page)
    }

    fn queued(&self) -> usize {
        self.0.lock().expect("the script lock").pages.len()
    }
}

/// What a case gives the client, in step order.
enum Event {
    /// An expected pull response for the case's tenant.
    Page(PullResponse),
    /// A step that may change the server's rows (a push).
    ServerWrite,
    /// The tenant's visible rows (`{model: {pk: fields}}`), with the index of the step.
    Rows(usize, Value),
}

struct Case {
    tenant: String,
    events: Vec<Event>,
}

/// Reads what the client needs from a case file: pull responses, pushes, rows (the server runner
/// checks the file's whole format).
fn parse_case(path: &Path) -> std::result::Result<Case, String> {
    let text = std::fs::read_to_string(path).map_err(|error| error.to_string())?;
    let case: Value = serde_json::from_str(&text).map_err(|error| format!("not JSON: {error}"))?;
    let tenant = case.get("tenant").and_then(Value::as_str).unwrap_or(DEFAULT_TENANT).to_owned();
    let steps = case.get("steps").and_then(Value::as_array).ok_or("steps is missing")?;
    let mut events = Vec::new();
    for (index, step) in steps.iter().enumerate() {
        let own_tenant = step.get("tenant").and_then(Value::as_str).is_none_or(|step_tenant| step_tenant == tenant);
        if step.get("push").is_some() || step.get("push_raw").is_some() {
            events.push(Event::ServerWrite);
        } else if let (Some(_), Some(expected), true) = (step.get("pull"), step.get("expect"), own_tenant) {
            let page = serde_json::from_value(expected.clone()).map_err(|error| format!("steps[{index}]: the client cannot read this pull response: {error}"))?;
            events.push(Event::Page(page));
        } else if let Some(rows) = step.get("rows") {
            events.push(Event::Rows(index, rows.clone()));
        }
    }
    Ok(Case { tenant, events })
}

/// The client's visible rows over `models`, as a case writes them (models without rows left out).
fn visible_rows(client: &SyncClient<ScriptedRemote>, models: &BTreeSet<String>) -> Value {
    let mut all = Map::new();
    for model in models {
        let rows: BTreeMap<String, Map<String, Value>> = client.list(model).expect("listing rows").into_iter().collect();
        if !rows.is_empty() {
            all.insert(model.clone(), serde_json::to_value(rows).expect("rows serialize"));
        }
    }
    Value::Object(all)
}

/// Runs a case: returns how many `rows` steps were checked, or what went wrong.
async fn run_case(case: Case) -> std::result::Result<usize, String> {
    let remote = ScriptedRemote::default();
    let client = SyncClient::builder().tenant(&case.tenant).actor("conformance-client").local(LocalStore::memory()).remote(remote.clone()).build().map_err(|error| error.to_string())?;
    let mut models = BTreeSet::new();
    // Rows are knowable when the last page given ended a pull (has_more false) after the last push.
    let mut caught_up = false;
    let mut checked = 0;
    for event in case.events {
        match event {
            Event::Page(page) => {
                models.extend(page.changes.iter().map(|change| change.model.clone()));
                caught_up = !page.has_more;
                remote.0.lock().expect("the script lock").pages.push_back(page);
            }
            Event::ServerWrite => caught_up = false,
            Event::Rows(index, expected) => {
                models.extend(expected.as_object().ok_or(format!("steps[{index}]: rows is not an object"))?.keys().cloned());
                if !caught_up {
                    continue;
                }
                while remote.queued() > 0 {
                    client.sync().await.map_err(|error| format!("steps[{index}]: sync failed: {error}"))?;
                }
                let actual = visible_rows(&client, &models);
                if actual != expected {
                    return Err(format!("steps[{index}] (rows) differ\n      expected {expected}\n      actual   {actual}"));
                }
                checked += 1;
            }
        }
    }
    // Pages after the last rows step must still be accepted.
    if caught_up {
        while remote.queued() > 0 {
            client.sync().await.map_err(|error| format!("the last pages: sync failed: {error}"))?;
        }
    }
    let problems = std::mem::take(&mut remote.0.lock().expect("the script lock").problems);
    if !problems.is_empty() {
        return Err(problems.join("; "));
    }
    Ok(checked)
}

#[tokio::test]
async fn every_conformance_case_holds_for_the_client() {
    let files = case_files();
    assert!(files.len() >= MIN_CASES, "conformance/ holds {} case files, expected at least {MIN_CASES}", files.len());
    let mut failures = Vec::new();
    let mut checked = 0;
    for path in &files {
        let file = path.file_name().expect("a file name").to_string_lossy().into_owned();
        match parse_case(path) {
            Ok(case) => match run_case(case).await {
                Ok(rows) => checked += rows,
                Err(problem) => failures.push(format!("{file}: {problem}")),
            },
            Err(problem) => failures.push(format!("{file}: bad case file: {problem}")),
        }
    }
    assert!(failures.is_empty(), "{} of {} conformance cases failed for the client:\n\n{}", failures.len(), files.len(), failures.join("\n\n"));
    assert!(checked >= MIN_ROWS_CHECKED, "only {checked} rows steps were checked against the client, expected at least {MIN_ROWS_CHECKED}");
}
