//! The contract as data, against a real server: every case of `conformance/` (format in
//! `conformance/README.md`) runs on one cluster, each in a fresh database, and every step's outcome is
//! compared exactly. All failing cases are reported, each with its file and step.

use std::path::{Path, PathBuf};

use postgres::Client;
use serde_json::{Map, Value};
use sync_ext_protocol::conformance::{self, DEFAULT_TENANT, MIN_CASES};
use sync_ext_pgrx_tests::Cluster;


/// The repository's case files, in name order.
fn case_files() -> Vec<PathBuf> {
    conformance::case_files(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../conformance"))
}

/// What a step does.
enum Action {
    /// `sync_push(tenant, body)`, the body as JSON text.
    Push(String),
    Pull { since: i64, max_changes: i32 },
    Compact { keep: String },
    /// The tenant's visible rows: `{model: {pk: fields}}`.
    Rows(Value),
}

/// What a call must return.
enum Expected {
    Value(Value),
    Error { sqlstate: String, prefix: String },
}

struct Step {
    action: Action,
    tenant: String,
    expected: Option<Expected>,
}

struct Case {
    setup_sql: Vec<String>,
    steps: Vec<Step>,
}

/// Refuses keys the format does not define for `what`.
fn only_keys(object: &Map<String, Value>, allowed: &[&str], what: &str) -> Result<(), String> {
    match object.keys().find(|key| !allowed.contains(&key.as_str())) {
        Some(unknown) => Err(format!("unknown {what} field {unknown:?}")),
        None => Ok(()),
    }
}

fn field<'a>(object: &'a Map<String, Value>, name: &str) -> Result<&'a Value, String> {
    object.get(name).ok_or_else(|| format!("{name} is missing"))
}

fn string(value: &Value, what: &str) -> Result<String, String> {
    value.as_str().map(str::to_owned).ok_or_else(|| format!("{what} must be a string"))
}

/// Reads a case file, refusing anything the format does not define (so a typo cannot skip a check).
fn parse_case(path: &Path) -> Result<Case, String> {
    let text = std::fs::read_to_string(path).map_err(|error| error.to_string())?;
    let case: Value = serde_json::from_str(&text).map_err(|error| format!("not JSON: {error}"))?;
    let case = case.as_object().ok_or("a case is a JSON object")?;
    only_keys(case, &["name", "description", "tenant", "setup_sql", "steps"], "case")?;
    let name = string(field(case, "name")?, "name")?;
    if Some(name.as_str()) != path.file_stem().and_then(|stem| stem.to_str()) {
        return Err(format!("name {name:?} differs from the file name"));
    }
    string(field(case, "description")?, "description")?;
    let tenant = case.get("tenant").map(|tenant| string(tenant, "tenant")).transpose()?.unwrap_or_else(|| DEFAULT_TENANT.to_owned());
    let setup_sql = match case.get("setup_sql") {
        None => Vec::new(),
        Some(Value::Array(statements)) => statements.iter().map(|sql| string(sql, "setup_sql[]")).collect::<Result<_, _>>()?,
        Some(_) => return Err("setup_sql must be an array of strings".into()),
    };
    let steps = field(case, "steps")?.as_array().ok_or("steps must be an array")?;
    if steps.is_empty() {
        return Err("a case needs steps".into());
    }
    let steps = steps
        .iter()
        .enumerate()
        .map(|(index, step)| parse_step(step, &tenant).map_err(|problem| format!("steps[{index}]: {problem}")))
        .collect::<Result<_, _>>()?;
    Ok(Case { setup_sql, steps })
}

fn parse_step(step: &Value, case_tenant: &str) -> Result<Step, String> {
    let step = step.as_object().ok_or("a step is a JSON object")?;
    const ACTIONS: [&str; 5] = ["push", "push_raw", "pull", "compact", "rows"];
    only_keys(step, &[&ACTIONS[..], &["tenant", "expect", "expect_error", "comment"]].concat(), "step")?;
    let actions: Vec<&str> = ACTIONS.into_iter().filter(|action| step.contains_key(*action)).collect();
    let [name] = actions.as_slice() else { return Err(format!("a step has exactly one of {ACTIONS:?}, this one {actions:?}")) };
    let argument = &step[*name];
    let action = match *name {
        "push" => Action::Push(argument.as_array().map(|_| argument.to_string()).ok_or("push is an array of changes")?),
        "push_raw" => Action::Push(string(argument, "push_raw")?),
        "pull" => {
            let pull = argument.as_object().ok_or("pull is an object")?;
            only_keys(pull, &["since", "max_changes"], "pull")?;
            let since = field(pull, "since")?.as_i64().ok_or("pull.since must be an integer")?;
            let max_changes = match pull.get("max_changes") {
                None => 1000,
                Some(max) => max.as_i64().and_then(|max| i32::try_from(max).ok()).ok_or("pull.max_changes must be an int")?,
            };
            Action::Pull { since, max_changes }
        }
        "compact" => {
            let compact = argument.as_object().ok_or("compact is an object")?;
            only_keys(compact, &["keep"], "compact")?;
            Action::Compact { keep: string(field(compact, "keep")?, "compact.keep")? }
        }
        _ => Action::Rows(argument.clone()),
    };
    let expected = match (step.get("expect"), step.get("expect_error")) {
        (Some(value), None) => Some(Expected::Value(value.clone())),
        (None, Some(error)) => {
            let error = error.as_object().ok_or("expect_error is an object")?;
            only_keys(error, &["sqlstate", "message_starts_with"], "expect_error")?;
            Some(Expected::Error {
                sqlstate: string(field(error, "sqlstate")?, "expect_error.sqlstate")?,
                prefix: string(field(error, "message_starts_with")?, "expect_error.message_starts_with")?,
            })
        }
        (None, None) => None,
        (Some(_), Some(_)) => return Err("expect and expect_error exclude each other".into()),
    };
    match (&action, &expected) {
        (Action::Rows(_), Some(_)) => return Err("a rows step carries its expectation itself".into()),
        (Action::Rows(rows), None) if !rows.is_object() => return Err("rows is an object of models".into()),
        (Action::Rows(_), None) => {}
        (_, None) => return Err("expect or expect_error is required".into()),
        _ => {}
    }
    let tenant = step.get("tenant").map(|tenant| string(tenant, "tenant")).transpose()?.unwrap_or_else(|| case_tenant.to_owned());
    Ok(Step { action, tenant, expected })
}

/// The tenant's visible rows, as a case writes them.
const VISIBLE_ROWS: &str = "
SELECT coalesce(jsonb_object_agg(model, rows), '{}')
  FROM (SELECT model, jsonb_object_agg(id, value) AS rows
          FROM sync_ext.snapshots WHERE tenant_id = $1 AND NOT deleted GROUP BY model) AS by_model";

fn compact_json(value: &Value) -> String {
    serde_json::to_string(value).expect("JSON serializes")
}

/// How a call failed: a database error, or a response that could not be read.
enum Failure {
    Database { sqlstate: String, message: String },
    Other(String),
}

/// Runs a statement returning one JSON value.
fn call(client: &mut Client, sql: &str, params: &[&(dyn postgres::types::ToSql + Sync)]) -> Result<Value, Failure> {
    let row = client.query_one(sql, params).map_err(|error| match error.as_db_error() {
        Some(db) => Failure::Database { sqlstate: db.code().code().to_owned(), message: db.message().to_owned() },
        None => Failure::Other(format!("the call failed: {error}")),
    })?;
    row.try_get(0).map_err(|error| Failure::Other(format!("the response does not read as JSON: {error}")))
}

/// Runs one step; `Err` says how its outcome differs from the expected one.
fn run_step(client: &mut Client, step: &Step) -> Result<(), String> {
    let outcome = match &step.action {
        Action::Push(body) => call(client, "SELECT sync_push($1, $2::text::jsonb)", &[&step.tenant, body]),
        Action::Pull { since, max_changes } => call(client, "SELECT sync_pull($1, $2, $3)", &[&step.tenant, since, max_changes]),
        Action::Compact { keep } => call(client, "SELECT sync_compact($1, $2::text::interval)", &[&step.tenant, keep]),
        Action::Rows(expected) => {
            let actual = call(client, VISIBLE_ROWS, &[&step.tenant]).map_err(|failure| match failure {
                Failure::Database { sqlstate, message } => format!("reading rows: {sqlstate} {message}"),
                Failure::Other(problem) => format!("reading rows: {problem}"),
            })?;
            return differ("the rows", expected, &actual);
        }
    };
    match (outcome, step.expected.as_ref().expect("checked when parsed")) {
        (Ok(actual), Expected::Value(expected)) => differ("the responses", expected, &actual),
        (Ok(actual), Expected::Error { sqlstate, prefix }) => {
            Err(format!("expected error {sqlstate} {prefix:?}..., got the response {}", compact_json(&actual)))
        }
        (Err(Failure::Other(problem)), _) => Err(problem),
        (Err(Failure::Database { sqlstate: code, message }), expected) => match expected {
            Expected::Error { sqlstate, prefix } if code == *sqlstate && message.starts_with(prefix.as_str()) => Ok(()),
            Expected::Error { sqlstate, prefix } => Err(format!("expected error {sqlstate} {prefix:?}..., got error {code} {message:?}")),
            Expected::Value(expected) => Err(format!("expected {}, got error {code} {message:?}", compact_json(expected))),
        },
    }
}

fn differ(what: &str, expected: &Value, actual: &Value) -> Result<(), String> {
    if expected == actual {
        return Ok(());
    }
    Err(format!("{what} differ\n      expected {}\n      actual   {}", compact_json(expected), compact_json(actual)))
}

fn step_name(step: &Step) -> &'static str {
    match step.action {
        Action::Push(_) => "push",
        Action::Pull { .. } => "pull",
        Action::Compact { .. } => "compact",
        Action::Rows(_) => "rows",
    }
}

/// Runs a case in a fresh database; `Err` names the first step that went otherwise (later steps would
/// only run against a state the case did not describe).
fn run_case(cluster: &Cluster, database: &str, case: &Case) -> Result<(), String> {
    cluster.create_database(database);
    let mut client = cluster.connect(database);
    for (index, sql) in case.setup_sql.iter().enumerate() {
        client.batch_execute(sql).map_err(|error| format!("setup_sql[{index}] failed: {}", describe(&error)))?;
    }
    for (index, step) in case.steps.iter().enumerate() {
        run_step(&mut client, step).map_err(|problem| format!("steps[{index}] ({}): {problem}", step_name(step)))?;
    }
    Ok(())
}

fn describe(error: &postgres::Error) -> String {
    error.as_db_error().map(|db| format!("{} {}", db.code().code(), db.message())).unwrap_or_else(|| error.to_string())
}

#[test]
fn every_conformance_case_holds_against_the_server() {
    let files = case_files();
    assert!(files.len() >= MIN_CASES, "conformance/ holds {} case files, expected at least {MIN_CASES}", files.len());
    let cluster = Cluster::start();
    let mut failures = Vec::new();
    for (number, path) in files.iter().enumerate() {
        let file = path.file_name().expect("a file name").to_string_lossy().into_owned();
        let outcome = parse_case(path).map_err(|problem| format!("bad case file: {problem}")).and_then(|case| run_case(&cluster, &format!("case_{number}"), &case));
        if let Err(problem) = outcome {
            failures.push(format!("{file}: {problem}"));
        }
    }
    assert!(failures.is_empty(), "{} of {} conformance cases failed:\n\n{}", failures.len(), files.len(), failures.join("\n\n"));
}
