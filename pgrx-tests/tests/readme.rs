//! The README's Security section is a recipe: every SQL example in it runs, in order, as written, and
//! a statement marked `-- error NNNNN` fails with that SQLSTATE. Then a device logs in as the section
//! sets it up and can do exactly what it says.

use sync_ext_pgrx_tests::readme::run_section;
use sync_ext_pgrx_tests::Cluster;

#[test]
fn the_security_section_runs_as_written_and_its_device_can_do_what_it_says() {
    let cluster = Cluster::start();
    cluster.create_database("app");
    let mut admin = cluster.connect("app");
    let ran = run_section(&mut admin, "## Security").len();
    assert!(ran >= 30, "the section's statements ran ({ran})");

    let settings: Vec<(String, String)> =
        admin.query("SELECT name, value FROM sync_ext.settings ORDER BY name", &[]).unwrap().iter().map(|row| (row.get(0), row.get(1))).collect();
    let expected = [("jwt_tenant_claim", "org_id"), ("max_clock_skew", "600000"), ("max_push_bytes", "4194304")];
    assert_eq!(settings, expected.map(|(name, value)| (name.to_owned(), value.to_owned())));

    // The device logs in as itself.
    admin.batch_execute("SELECT sync_configure('jwt_tenant_claim', NULL)").unwrap();
    let mut device = cluster.connect_as("app", "device_7f1e");
    let page: serde_json::Value = device.query_one("SELECT sync_pull('acme', 0)", &[]).unwrap().get(0);
    let models: Vec<&str> = page["changes"].as_array().unwrap().iter().map(|change| change["model"].as_str().unwrap()).collect();
    assert_eq!(models, ["note", "todo"], "the note and the todo it pushed");
    let titles: Vec<String> = device.query("SELECT title FROM todos", &[]).unwrap().iter().map(|row| row.get(0)).collect();
    assert_eq!(titles, ["milk"], "the pushed row landed in the bound table, written with the device's rights");
    let timeout: String = device.query_one("SHOW idle_in_transaction_session_timeout", &[]).unwrap().get(0);
    assert_eq!(timeout, "1min");
    let temp = device.batch_execute("CREATE TEMP TABLE scratch (x int)").unwrap_err();
    assert_eq!(temp.as_db_error().map(|db| db.code().code()), Some("42501"), "TEMP was revoked");
}
