//! Operator settings: the limits and the authentication rule that protect the system.
//!
//! They live in the table `sync_ext.settings`, which only the extension's owner can write (through
//! [`sync_configure`]), not in configuration parameters: a placeholder parameter set by a connection
//! option or a `SET` before the library loads could silently replace what an operator configured.
//! Nothing a caller sets in its session changes them.

use pgrx::prelude::*;

use crate::errors::{SyncError, SyncResult};

/// The unit a setting is given in.
#[derive(Clone, Copy)]
enum Unit {
    Count,
    Bytes,
    Millis,
    Text,
}

/// One setting: its name, default and valid range.
struct Definition {
    name: &'static str,
    unit: Unit,
    default: i32,
    min: i32,
    max: i32,
}

const fn numeric(name: &'static str, unit: Unit, default: i32, min: i32, max: i32) -> Definition {
    Definition { name, unit, default, min, max }
}

const MB: i32 = 1024 * 1024;

const DEFINITIONS: [Definition; 8] = [
    numeric("max_push_changes", Unit::Count, 10_000, 1, 1_000_000),
    numeric("max_push_bytes", Unit::Bytes, 8 * MB, 1024, i32::MAX),
    numeric("max_value_bytes", Unit::Bytes, MB, 1, i32::MAX),
    numeric("max_pull_changes", Unit::Count, 10_000, 1, 1_000_000),
    numeric("max_pull_bytes", Unit::Bytes, 8 * MB, 1024, i32::MAX),
    numeric("max_clock_skew", Unit::Millis, 5 * 60 * 1000, 0, i32::MAX),
    Definition { name: "jwt_tenant_claim", unit: Unit::Text, default: 0, min: 0, max: 0 },
    Definition { name: "jwt_scopes_claim", unit: Unit::Text, default: 0, min: 0, max: 0 },
];

/// The settings in force for one call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// The most changes one push may carry.
    pub max_push_changes: i32,
    /// The largest body (JSON or MessagePack bytes) one push may carry.
    pub max_push_bytes: i32,
    /// The largest value one change may carry, in bytes of its JSON.
    pub max_value_bytes: i32,
    /// The most changes one pull returns.
    pub max_pull_changes: i32,
    /// The most bytes of changes one pull page holds (a single larger change still comes alone).
    pub max_pull_bytes: i32,
    /// How far (ms) a change's hlc may run ahead of the server clock.
    pub max_clock_skew_ms: i32,
    /// When set, the claim of `request.jwt.claims` that must equal the tenant.
    pub jwt_tenant_claim: Option<String>,
    /// When set, the claim of `request.jwt.claims` listing the only scope instances the request may reach.
    pub jwt_scopes_claim: Option<String>,
}

impl Default for Settings {
    fn default() -> Self {
        let default = |name: &str| DEFINITIONS.iter().find(|definition| definition.name == name).map_or(0, |definition| definition.default);
        Settings {
            max_push_changes: default("max_push_changes"),
            max_push_bytes: default("max_push_bytes"),
            max_value_bytes: default("max_value_bytes"),
            max_pull_changes: default("max_pull_changes"),
            max_pull_bytes: default("max_pull_bytes"),
            max_clock_skew_ms: default("max_clock_skew"),
            jwt_tenant_claim: None,
            jwt_scopes_claim: None,
        }
    }
}

impl Settings {
    /// The settings from the rows of `sync_ext.settings` (names and values), defaults for the rest.
    pub fn from_rows(names: Vec<String>, values: Vec<String>) -> SyncResult<Settings> {
        let mut settings = Settings::default();
        for (name, value) in names.into_iter().zip(values) {
            settings.set(&name, value)?;
        }
        Ok(settings)
    }

    fn set(&mut self, name: &str, value: String) -> SyncResult<()> {
        let number = || {
            value.parse::<i32>().map_err(|_| SyncError::InvalidArgument { argument: "sync_ext.settings", problem: format!("{name}: {value:?} is not a whole number") })
        };
        match name {
            "max_push_changes" => self.max_push_changes = number()?,
            "max_push_bytes" => self.max_push_bytes = number()?,
            "max_value_bytes" => self.max_value_bytes = number()?,
            "max_pull_changes" => self.max_pull_changes = number()?,
            "max_pull_bytes" => self.max_pull_bytes = number()?,
            "max_clock_skew" => self.max_clock_skew_ms = number()?,
            "jwt_tenant_claim" => self.jwt_tenant_claim = Some(value).filter(|claim| !claim.is_empty()),
            "jwt_scopes_claim" => self.jwt_scopes_claim = Some(value).filter(|claim| !claim.is_empty()),
            _ => {}
        }
        Ok(())
    }

    /// The limits a push response tells clients, so that they refuse what the server would before sending it.
    pub fn push_limits_for_clients(&self) -> sync_ext_protocol::wire::PushLimits {
        sync_ext_protocol::wire::PushLimits {
            max_push_changes: self.max_push_changes,
            max_push_bytes: self.max_push_bytes,
            max_value_bytes: self.max_value_bytes,
        }
    }

    /// The per-change limits of a push.
    pub fn push_limits(&self) -> sync_ext_protocol::change::Limits {
        sync_ext_protocol::change::Limits {
            max_changes: usize::try_from(self.max_push_changes).unwrap_or(0),
            max_value_bytes: usize::try_from(self.max_value_bytes).unwrap_or(0),
        }
    }
}

/// A setting's value as stored: a whole number in the setting's base unit (a count, bytes or
/// milliseconds), read like a Postgres setting (`'8MB'`, `'2h'`), or text; `None` for the default.
fn normalize(definition: &Definition, value: &str) -> SyncResult<Option<String>> {
    let flags = match definition.unit {
        Unit::Text => return Ok(Some(value.to_owned()).filter(|text| !text.is_empty())),
        Unit::Count => 0,
        Unit::Bytes => pg_sys::GUC_UNIT_BYTE,
        Unit::Millis => pg_sys::GUC_UNIT_MS,
    };
    let text = std::ffi::CString::new(value).map_err(|_| invalid(definition, value, "it holds a NUL character"))?;
    let mut parsed = 0;
    let mut hint: *const std::ffi::c_char = std::ptr::null();
    // SAFETY: parse_int reads a C string and writes the number and an optional static hint.
    if !unsafe { pg_sys::parse_int(text.as_ptr(), &mut parsed, flags as i32, &mut hint) } {
        let unit = match definition.unit {
            Unit::Bytes => " (bytes, or with a unit: B, kB, MB, GB)",
            Unit::Millis => " (milliseconds, or with a unit: ms, s, min, h, d)",
            _ => "",
        };
        return Err(invalid(definition, value, &format!("expected a whole number{unit}")));
    }
    if !(definition.min..=definition.max).contains(&parsed) {
        return Err(invalid(definition, value, &format!("must be between {} and {}", definition.min, definition.max)));
    }
    Ok((parsed != definition.default).then(|| parsed.to_string()))
}

fn invalid(definition: &Definition, value: &str, problem: &str) -> SyncError {
    SyncError::InvalidArgument { argument: "value", problem: format!("{}: {value:?}: {problem}", definition.name) }
}

/// Sets an operator setting for this database (`NULL` puts back its default). Only the extension's
/// owner may call it. See the README's Security section for the settings.
#[pg_extern(volatile, parallel_unsafe)]
fn sync_configure(setting: &str, value: Option<&str>) -> Result<(), pgrx::pg_sys::panic::ErrorReport> {
    Ok(configure(setting, value)?)
}

fn configure(setting: &str, value: Option<&str>) -> SyncResult<()> {
    let definition = DEFINITIONS.iter().find(|definition| definition.name == setting).ok_or_else(|| {
        let names: Vec<&str> = DEFINITIONS.iter().map(|definition| definition.name).collect();
        SyncError::InvalidArgument { argument: "setting", problem: format!("{setting:?} is not a setting; the settings are {}", names.join(", ")) }
    })?;
    let stored = value.map(|value| normalize(definition, value)).transpose()?.flatten();
    Spi::connect_mut(|client| {
        client.update("DELETE FROM sync_ext.settings WHERE name = $1", None, &[setting.into()])?;
        if let Some(stored) = stored {
            client.update("INSERT INTO sync_ext.settings (name, value) VALUES ($1, $2)", None, &[setting.into(), stored.into()])?;
        }
        Ok(())
    })
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    use crate::testing::error_of;

    fn stored() -> Option<String> {
        Spi::get_one::<String>("SELECT string_agg(name || '=' || value, ',' ORDER BY name) FROM sync_ext.settings").unwrap()
    }

    #[pg_test]
    fn settings_are_read_with_units_checked_and_defaults_are_not_stored() {
        Spi::run("SELECT sync_configure('max_push_bytes', '2MB'); SELECT sync_configure('max_clock_skew', '2h')").unwrap();
        Spi::run("SELECT sync_configure('jwt_tenant_claim', 'org'); SELECT sync_configure('max_pull_changes', '10000')").unwrap();
        assert_eq!(stored().as_deref(), Some("jwt_tenant_claim=org,max_clock_skew=7200000,max_push_bytes=2097152"));
        Spi::run("SELECT sync_configure('max_push_bytes', NULL); SELECT sync_configure('jwt_tenant_claim', '')").unwrap();
        assert_eq!(stored().as_deref(), Some("max_clock_skew=7200000"));
        assert_eq!(error_of("SELECT sync_configure('max_push_bytes', 'lots')"), "22023: value: max_push_bytes: \"lots\": expected a whole number (bytes, or with a unit: B, kB, MB, GB)");
        assert_eq!(error_of("SELECT sync_configure('max_push_changes', '0')"), "22023: value: max_push_changes: \"0\": must be between 1 and 1000000");
        assert!(error_of("SELECT sync_configure('max_everything', '1')").starts_with("22023: setting: \"max_everything\" is not a setting; the settings are max_push_changes,"));
        assert_eq!(stored().as_deref(), Some("max_clock_skew=7200000"), "refused values changed nothing");
    }
}
