//! Local queries: rows of a model whose fields compare to values, ordered by a field, served by an
//! index of the local store (see [`Query`]).

use std::cmp::Ordering;

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// How a field compares to the value of a filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Cmp {
    /// Equal (with a null value: the field is null or absent).
    Eq,
    /// Less than.
    Lt,
    /// Less than or equal.
    Le,
    /// Greater than.
    Gt,
    /// Greater than or equal.
    Ge,
}

impl Cmp {
    pub(crate) fn sql(self) -> &'static str {
        match self {
            Cmp::Eq => "=",
            Cmp::Lt => "<",
            Cmp::Le => "<=",
            Cmp::Gt => ">",
            Cmp::Ge => ">=",
        }
    }

    fn holds(self, ordering: Ordering) -> bool {
        match self {
            Cmp::Eq => ordering == Ordering::Equal,
            Cmp::Lt => ordering == Ordering::Less,
            Cmp::Le => ordering != Ordering::Greater,
            Cmp::Gt => ordering == Ordering::Greater,
            Cmp::Ge => ordering != Ordering::Less,
        }
    }
}

/// A query over the rows of one model as the app sees them (unsent changes included), run by
/// [`crate::Collection::query`]:
/// `Query::new().filter("done", Cmp::Eq, false).order_by("due").limit(20)`.
///
/// Fields are compared as SQLite compares JSON values: null (or absent) before numbers (booleans are
/// 0 and 1), numbers before strings, strings byte-wise; an object or array compares as its JSON text.
/// Field names are letters, digits and `_`. In a SQLite store each field a query filters or orders on
/// gets an expression index the first time (`json_extract` of the field, per model), so a filter on
/// one field, and an order by one field, reads only the rows it returns.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Query {
    pub(crate) filters: Vec<(String, Cmp, Value)>,
    pub(crate) order: Option<(String, bool)>,
    pub(crate) limit: Option<usize>,
}

impl Query {
    /// Every row, in pk order.
    pub fn new() -> Self {
        Query::default()
    }

    /// Keeps the rows whose `field` compares to `value` by `cmp` (filters add up: all must hold).
    pub fn filter(mut self, field: &str, cmp: Cmp, value: impl Into<Value>) -> Self {
        self.filters.push((field.to_owned(), cmp, value.into()));
        self
    }

    /// Orders the rows by `field`, ascending (then by pk).
    pub fn order_by(mut self, field: &str) -> Self {
        self.order = Some((field.to_owned(), false));
        self
    }

    /// Orders the rows by `field`, descending (then by pk, descending).
    pub fn order_by_desc(mut self, field: &str) -> Self {
        self.order = Some((field.to_owned(), true));
        self
    }

    /// Returns at most `rows` rows.
    pub fn limit(mut self, rows: usize) -> Self {
        self.limit = Some(rows);
        self
    }

    /// Refuses what the store cannot run: a field name other than letters, digits and `_`, a
    /// comparison with an object or an array, or with null other than `Eq`.
    pub(crate) fn validate(&self) -> Result<()> {
        let fields = self.filters.iter().map(|(field, _, _)| field).chain(self.order.iter().map(|(field, _)| field));
        for field in fields {
            if field.is_empty() || !field.bytes().all(|byte| byte.is_ascii_alphanumeric() || byte == b'_') {
                return Err(Error::InvalidQuery(format!("field {field:?}: query fields are letters, digits and _")));
            }
        }
        for (field, cmp, value) in &self.filters {
            match value {
                Value::Array(_) | Value::Object(_) => return Err(Error::InvalidQuery(format!("field {field}: compare with a string, number, boolean or null"))),
                Value::Null if *cmp != Cmp::Eq => return Err(Error::InvalidQuery(format!("field {field}: null compares with Cmp::Eq only"))),
                _ => {}
            }
        }
        Ok(())
    }

    /// Whether a row's fields pass every filter (the store in memory; SQLite runs the same in SQL).
    pub(crate) fn matches(&self, fields: &Map<String, Value>) -> bool {
        self.filters.iter().all(|(field, cmp, value)| match value {
            Value::Null => sql_rank(fields.get(field)) == SqlValue::Null,
            _ => {
                let (left, right) = (sql_rank(fields.get(field)), sql_rank(Some(value)));
                left != SqlValue::Null && cmp.holds(left.cmp(&right))
            }
        })
    }

    /// Orders two rows as the query does (the order field, then the pk, both in its direction).
    pub(crate) fn compare(&self, (left_pk, left): (&str, &Map<String, Value>), (right_pk, right): (&str, &Map<String, Value>)) -> Ordering {
        match &self.order {
            Some((field, descending)) => {
                let ordering = sql_rank(left.get(field)).cmp(&sql_rank(right.get(field))).then_with(|| left_pk.cmp(right_pk));
                if *descending {
                    ordering.reverse()
                } else {
                    ordering
                }
            }
            None => left_pk.cmp(right_pk),
        }
    }
}

/// A JSON value as SQLite's `json_extract` returns it, ordered as SQLite orders values.
#[derive(Debug, PartialEq)]
enum SqlValue {
    Null,
    Number(f64),
    Text(String),
}

impl SqlValue {
    /// SQLite's order: null, then numbers (numerically), then text (byte-wise).
    fn cmp(&self, other: &Self) -> Ordering {
        match (self, other) {
            (SqlValue::Number(left), SqlValue::Number(right)) => left.total_cmp(right),
            (SqlValue::Text(left), SqlValue::Text(right)) => left.cmp(right),
            _ => self.rank().cmp(&other.rank()),
        }
    }

    fn rank(&self) -> u8 {
        match self {
            SqlValue::Null => 0,
            SqlValue::Number(_) => 1,
            SqlValue::Text(_) => 2,
        }
    }
}

fn sql_rank(value: Option<&Value>) -> SqlValue {
    match value {
        None | Some(Value::Null) => SqlValue::Null,
        Some(Value::Bool(flag)) => SqlValue::Number(f64::from(u8::from(*flag))),
        Some(Value::Number(number)) => SqlValue::Number(number.as_f64().unwrap_or(f64::NAN)),
        Some(Value::String(text)) => SqlValue::Text(text.clone()),
        Some(other) => SqlValue::Text(other.to_string()),
    }
}
