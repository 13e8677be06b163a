//! Partial sync: which scope instances a row belongs to.
//!
//! A scope definition `(scope, model, field)` puts every visible row of `model` in the instance
//! `<scope>:<value>`, where `<value>` is the row's `field` as its JSON text, strings without quotes
//! (`project:42`, `owner:ann`). A field that is absent, null, an array or an object puts the row in no
//! instance of that scope. A model with no definition is *tenant-wide*: its rows are in every device's
//! pulls, and on the server's scope index they are in the instance [`TENANT_WIDE`].
//!
//! Membership follows the merged row: a deleted row stays in the instances it was in when it was
//! deleted (so the devices that held it see the delete), and a row brought back moves to the instances
//! of its new fields.

use std::collections::{BTreeSet, HashMap};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::merge::RowState;

/// The instance under which the server indexes the rows of tenant-wide models.
pub const TENANT_WIDE: &str = "";

/// One scope definition, as `sync_define_scope` records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScopeDefinition {
    pub scope: String,
    pub model: String,
    pub field: String,
}

/// Every scope definition of a database, by model.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scopes {
    /// `(scope, field)` pairs of each model with definitions.
    by_model: HashMap<String, Vec<(String, String)>>,
}

/// A set of scope instances, in byte order.
pub type Instances = BTreeSet<String>;

impl Scopes {
    /// The definitions, grouped by model.
    pub fn new(definitions: impl IntoIterator<Item = ScopeDefinition>) -> Self {
        let mut by_model: HashMap<String, Vec<(String, String)>> = HashMap::new();
        for definition in definitions {
            by_model.entry(definition.model).or_default().push((definition.scope, definition.field));
        }
        Scopes { by_model }
    }

    /// Whether no scope is defined at all: every model is tenant-wide and nothing is indexed by scope.
    pub fn is_empty(&self) -> bool {
        self.by_model.is_empty()
    }

    /// Whether `model` has definitions (is not tenant-wide).
    pub fn is_scoped(&self, model: &str) -> bool {
        self.by_model.contains_key(model)
    }

    /// The instances a row is in, given those stored for it: the stored ones for a scoped model (a
    /// deleted row keeps those it had; a row stored without any, those of its fields), the tenant-wide
    /// instance otherwise.
    pub fn membership(&self, model: &str, row: &RowState, stored: Option<&Instances>) -> Instances {
        if !self.is_scoped(model) {
            return self.instances(model, &Map::new());
        }
        match stored {
            Some(stored) => stored.clone(),
            None if row.is_deleted() => Instances::new(),
            None => self.instances(model, &row.field_values()),
        }
    }

    /// Whether `instance` belongs to a scope defined for `model`.
    pub fn defines(&self, model: &str, instance: &str) -> bool {
        let scope = instance.split_once(':').map_or(instance, |(scope, _)| scope);
        self.by_model.get(model).is_some_and(|definitions| definitions.iter().any(|(defined, _)| defined == scope))
    }

    /// The instances a visible row of `model` with fields `value` is in: [`TENANT_WIDE`] alone for a
    /// tenant-wide model (none when no scope is defined at all).
    pub fn instances(&self, model: &str, value: &Map<String, Value>) -> Instances {
        match self.by_model.get(model) {
            Some(definitions) => definitions
                .iter()
                .filter_map(|(scope, field)| Some(instance(scope, &instance_value(value.get(field)?)?)))
                .collect(),
            None if self.is_empty() => Instances::new(),
            None => Instances::from([TENANT_WIDE.to_owned()]),
        }
    }
}

/// The text of a scope field's value that names its instance: a string as itself, a number or a
/// boolean as its JSON text; `None` for null, arrays and objects.
pub fn instance_value(value: &Value) -> Option<String> {
    match value {
        Value::String(text) => Some(text.clone()),
        Value::Number(number) => Some(number.to_string()),
        Value::Bool(flag) => Some(flag.to_string()),
        Value::Null | Value::Array(_) | Value::Object(_) => None,
    }
}

/// The instance `<scope>:<value>`.
pub fn instance(scope: &str, value: &str) -> String {
    format!("{scope}:{value}")
}

/// Checks an instance named by a client or a grant: `<scope>:<value>` with a non-empty scope.
pub fn validate_instance(location: &str, text: &str) -> Result<(), crate::WireError> {
    match text.split_once(':') {
        Some((scope, _)) if !scope.is_empty() => crate::change::check_name(location, text, crate::change::MAX_PK_BYTES),
        _ => Err(crate::WireError::invalid(location, format!("expected <scope>:<value>, got {text:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn scopes() -> Scopes {
        Scopes::new([("project", "task", "project_id"), ("owner", "task", "owner")].map(|(scope, model, field)| ScopeDefinition {
            scope: scope.into(),
            model: model.into(),
            field: field.into(),
        }))
    }

    fn instances_of(scopes: &Scopes, model: &str, value: Value) -> Vec<String> {
        scopes.instances(model, value.as_object().unwrap()).into_iter().collect()
    }

    #[test]
    fn a_row_is_in_one_instance_per_definition_whose_field_it_holds() {
        let scopes = scopes();
        assert_eq!(instances_of(&scopes, "task", json!({"project_id": 42, "owner": "ann"})), ["owner:ann", "project:42"]);
        assert_eq!(instances_of(&scopes, "task", json!({"project_id": "42", "owner": null})), ["project:42"], "a string as itself");
        assert!(instances_of(&scopes, "task", json!({"title": "x", "owner": ["ann"]})).is_empty(), "absent, null or an array: none");
        assert_eq!(instances_of(&scopes, "task", json!({"owner": true, "project_id": 1.5})), ["owner:true", "project:1.5"]);
        assert_eq!(instances_of(&scopes, "label", json!({"project_id": 42})), [TENANT_WIDE], "a model with no definition is tenant-wide");
        assert!(instances_of(&Scopes::default(), "label", json!({})).is_empty(), "nothing is indexed when no scope exists");
    }

    #[test]
    fn instances_are_named_scope_colon_value() {
        assert!(validate_instance("scopes[0]", "project:42").is_ok());
        assert!(validate_instance("scopes[0]", "url:https://x").is_ok(), "the value may hold colons");
        for bad in ["project", ":42", ""] {
            let error = validate_instance("scopes[1]", bad).unwrap_err();
            assert!(error.to_string().starts_with("scopes[1]: "), "{error}");
        }
    }
}
