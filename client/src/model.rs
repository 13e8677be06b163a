//! Typed models: a Rust type per model, its key type (wire pks formatted exactly as the server formats
//! the primary key of a bound table), its patch type and its local schema version.

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};
use uuid::Uuid;

/// A kind of row, as the app reads and writes it through [`crate::SyncClient::collection`].
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use sync_ext_client::Model;
///
/// #[derive(Serialize, Deserialize)]
/// struct Todo { id: uuid::Uuid, title: String, done: bool }
///
/// #[derive(Serialize, Default)]
/// struct TodoPatch {
///     #[serde(skip_serializing_if = "Option::is_none")]
///     title: Option<String>,
///     #[serde(skip_serializing_if = "Option::is_none")]
///     done: Option<bool>,
/// }
///
/// impl Model for Todo {
///     const NAME: &'static str = "todo";
///     type Key = uuid::Uuid;
///     type Patch = TodoPatch;
///     fn key(&self) -> uuid::Uuid { self.id }
/// }
/// ```
pub trait Model: Serialize + DeserializeOwned {
    /// The model's name on the wire (the name a bound table is registered under).
    const NAME: &'static str;
    /// The version of the row shape this code reads and writes. When a store last opened with an
    /// older version is opened with this one, [`Model::migrate`] runs once over the stored rows.
    const VERSION: u32 = 1;
    /// The key: one [`KeyPart`], or a tuple of them for a composite primary key.
    type Key: Key;
    /// What [`crate::Collection::update`] writes: a struct of the changed fields (skip the others
    /// with `#[serde(skip_serializing_if = "Option::is_none")]`), or `serde_json::Value`.
    type Patch: Serialize;
    /// The key of a row.
    fn key(&self) -> Self::Key;
    /// Upgrades a stored row from `from_version` to [`Model::VERSION`]: the fields it should hold now,
    /// or `None` to leave it as it is (the default). A changed row is written back as an ordinary
    /// update (a field left out is written as null), so the migration syncs like any local write and
    /// other replicas, and the server, get the new shape.
    fn migrate(from_version: u32, fields: &Map<String, Value>) -> Option<Map<String, Value>> {
        let _ = (from_version, fields);
        None
    }
}

/// One column of a key, as its portable JSON value (see the README's "Typed values").
pub trait KeyPart: Sized {
    /// The portable value, as a bound table's column of this type travels.
    fn to_portable(&self) -> Value;
    /// Reads a portable value back; `None` when it is not a value of this type.
    fn from_portable(value: &Value) -> Option<Self>;
}

impl KeyPart for String {
    fn to_portable(&self) -> Value {
        Value::String(self.clone())
    }
    fn from_portable(value: &Value) -> Option<Self> {
        value.as_str().map(str::to_owned)
    }
}

impl KeyPart for Uuid {
    fn to_portable(&self) -> Value {
        Value::String(self.to_string())
    }
    fn from_portable(value: &Value) -> Option<Self> {
        value.as_str()?.parse().ok()
    }
}

impl KeyPart for bool {
    fn to_portable(&self) -> Value {
        Value::Bool(*self)
    }
    fn from_portable(value: &Value) -> Option<Self> {
        value.as_bool()
    }
}

/// `bigint` travels as a string (the server's default `number_mode`); a JSON integer is read too.
impl KeyPart for i64 {
    fn to_portable(&self) -> Value {
        Value::String(self.to_string())
    }
    fn from_portable(value: &Value) -> Option<Self> {
        value.as_i64().or_else(|| value.as_str()?.parse().ok())
    }
}

/// `smallint` and `integer` travel as JSON numbers.
macro_rules! number_key_part {
    ($($ty:ty),*) => {$(
        impl KeyPart for $ty {
            fn to_portable(&self) -> Value {
                Value::from(*self)
            }
            fn from_portable(value: &Value) -> Option<Self> {
                value.as_i64().and_then(|number| <$ty>::try_from(number).ok())
            }
        }
    )*};
}
number_key_part!(i16, i32);

/// A model's key, as the wire pk: one column's value as text (a string as itself, a number as its
/// digits), or for a composite key the JSON array of the columns' portable values (`[1,"a"]`, no
/// spaces), exactly as the server writes the pk of a bound table's row.
pub trait Key: Sized {
    /// The key's columns, as portable values.
    fn parts(&self) -> Vec<Value>;
    /// A key from the columns' portable values; `None` when they are not values of this key.
    fn from_parts(parts: &[Value]) -> Option<Self>;
    /// How many columns the key has.
    const ARITY: usize;

    /// The wire pk.
    fn to_pk(&self) -> String {
        match self.parts().as_slice() {
            [Value::String(text)] => text.clone(),
            [single] => single.to_string(),
            many => Value::Array(many.to_vec()).to_string(),
        }
    }

    /// A key from a wire pk; `None` when the pk is not one of this key.
    fn from_pk(pk: &str) -> Option<Self> {
        if Self::ARITY == 1 {
            return Self::from_parts(&[Value::String(pk.to_owned())]).or_else(|| Self::from_parts(&[serde_json::from_str(pk).ok()?]));
        }
        match serde_json::from_str::<Value>(pk).ok()? {
            Value::Array(parts) if parts.len() == Self::ARITY => Self::from_parts(&parts),
            _ => None,
        }
    }
}

macro_rules! single_key {
    ($($ty:ty),*) => {$(
        impl Key for $ty {
            const ARITY: usize = 1;
            fn parts(&self) -> Vec<Value> {
                vec![self.to_portable()]
            }
            fn from_parts(parts: &[Value]) -> Option<Self> {
                match parts {
                    [only] => <$ty>::from_portable(only),
                    _ => None,
                }
            }
        }
    )*};
}
single_key!(String, Uuid, bool, i16, i32, i64);

macro_rules! composite_key {
    ($arity:literal: $($part:ident $value:ident $index:tt),*) => {
        impl<$($part: KeyPart),*> Key for ($($part,)*) {
            const ARITY: usize = $arity;
            fn parts(&self) -> Vec<Value> {
                vec![$(self.$index.to_portable()),*]
            }
            fn from_parts(parts: &[Value]) -> Option<Self> {
                match parts {
                    [$($value),*] => Some(($($part::from_portable($value)?,)*)),
                    _ => None,
                }
            }
        }
    };
}
composite_key!(2: A a 0, B b 1);
composite_key!(3: A a 0, B b 1, C c 2);
composite_key!(4: A a 0, B b 1, C c 2, D d 3);

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// The server's `pk_text` (src/models.rs) over the key columns' portable values.
    fn server_pk_text(values: &[Value]) -> String {
        match values {
            [Value::String(text)] => text.clone(),
            [single] => single.to_string(),
            many => Value::Array(many.to_vec()).to_string(),
        }
    }

    #[test]
    fn keys_are_formatted_as_the_server_formats_bound_table_pks_and_read_back() {
        let id: Uuid = "7f1e8c3a-5b7d-4e2a-9c1f-2b3d4e5f6a7b".parse().unwrap();
        assert_eq!(id.to_pk(), "7f1e8c3a-5b7d-4e2a-9c1f-2b3d4e5f6a7b");
        assert_eq!(42i32.to_pk(), "42");
        assert_eq!(42i64.to_pk(), "42", "a bigint key is its digits, as the string it travels as");
        assert_eq!("a b".to_owned().to_pk(), "a b");
        assert_eq!((1i32, "x\"y".to_owned()).to_pk(), r#"[1,"x\"y"]"#);
        assert_eq!((7i64, 2i16, true).to_pk(), r#"["7",2,true]"#, "bigint parts are strings in the default number_mode");
        for (key, parts) in [((1i32, "é".to_owned()), json!([1, "é"])), ((-3, "".to_owned()), json!([-3, ""]))] {
            assert_eq!(key.to_pk(), server_pk_text(parts.as_array().unwrap()));
            assert_eq!(<(i32, String)>::from_pk(&key.to_pk()), Some(key));
        }
        assert_eq!(i32::from_pk("42"), Some(42));
        assert_eq!(String::from_pk("42"), Some("42".to_owned()));
        assert_eq!(i64::from_pk("9007199254740993"), Some(9_007_199_254_740_993));
        assert_eq!(<(i64, i32)>::from_pk("[7,2]"), Some((7, 2)), "a bigint part sent as a JSON number reads too");
        assert_eq!(i32::from_pk("x"), None);
        assert_eq!(<(i32, i32)>::from_pk("[1,2,3]"), None);
        assert_eq!(Uuid::from_pk("not a uuid"), None);
    }
}
