//! Test support: the keys a `Raw*` struct accepts, read through serde (every field name of every
//! nested struct, as dotted paths; arrays of tables add no segment), so the tests can check
//! [`super::GATEWAY_KEYS`] and [`super::AGENT_KEYS`] against the parsers' own fields. A serde
//! Deserializer that records keys; it never reads a file.

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

/// toml's `Spanned<T>` deserializes as a struct of this name whose `value` field is the T.
const SPANNED: &str = "$__serde_spanned_private_Spanned";

#[derive(Debug)]
pub struct Error(String);
impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for Error {}
impl de::Error for Error {
    fn custom<T: std::fmt::Display>(msg: T) -> Self {
        Error(msg.to_string())
    }
}

/// Collects the leaf keys of `T`.
pub fn keys<'de, T: serde::Deserialize<'de>>() -> Vec<String> {
    let mut out = Vec::new();
    T::deserialize(Tracer {
        path: String::new(),
        out: &mut out,
    })
    .expect("tracing a Raw struct");
    out.sort();
    out.dedup();
    out
}

struct Tracer<'a> {
    path: String,
    out: &'a mut Vec<String>,
}

impl Tracer<'_> {
    fn leaf(self) {
        if !self.path.is_empty() {
            self.out.push(self.path);
        }
    }
}

macro_rules! leaf {
    ($($method:ident => $visit:ident($value:expr)),* $(,)?) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
            self.leaf();
            visitor.$visit($value)
        }
    )*};
}

impl<'de> Deserializer<'de> for Tracer<'_> {
    type Error = Error;

    leaf! {
        deserialize_bool => visit_bool(true),
        deserialize_u64 => visit_u64(4096),
        deserialize_u32 => visit_u64(1),
        deserialize_u16 => visit_u64(1),
        deserialize_i64 => visit_i64(1),
        deserialize_str => visit_str("x"),
        deserialize_string => visit_str("x"),
    }

    /// A string, which untagged enums (a string or a list) take; a key whose visitor
    /// expects "a count ..." (`pool`: a count or a table) gets a number.
    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.leaf();
        struct Expecting<'v, V>(&'v V);
        impl<'de, V: Visitor<'de>> std::fmt::Display for Expecting<'_, V> {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                self.0.expecting(f)
            }
        }
        if Expecting(&visitor).to_string().starts_with("a count") {
            visitor.visit_u64(1)
        } else {
            visitor.visit_str("x")
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_some(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_seq(OneElement(Some(self)))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        visitor.visit_map(Fields {
            spanned: name == SPANNED,
            fields: fields.iter(),
            next: None,
            path: self.path,
            out: self.out,
        })
    }

    serde::forward_to_deserialize_any! {
        i8 i16 i32 i128 u8 u128 f32 f64 char bytes byte_buf unit unit_struct
        newtype_struct tuple tuple_struct map enum identifier ignored_any
    }
}

struct OneElement<'a>(Option<Tracer<'a>>);

impl<'de> SeqAccess<'de> for OneElement<'_> {
    type Error = Error;
    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Error> {
        match self.0.take() {
            Some(t) => seed.deserialize(t).map(Some),
            None => Ok(None),
        }
    }
}

struct Fields<'a> {
    spanned: bool,
    fields: std::slice::Iter<'static, &'static str>,
    next: Option<&'static str>,
    path: String,
    out: &'a mut Vec<String>,
}

impl<'de> MapAccess<'de> for Fields<'_> {
    type Error = Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Error> {
        let Some(field) = self.fields.next() else {
            return Ok(None);
        };
        self.next = Some(field);
        seed.deserialize(de::value::BorrowedStrDeserializer::<Error>::new(field))
            .map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
        let field = self.next.take().expect("a key came first");
        if self.spanned {
            // start and end are byte offsets; the value is the real field, at this path.
            if field.ends_with("value") {
                return seed.deserialize(Tracer {
                    path: self.path.clone(),
                    out: self.out,
                });
            }
            return seed.deserialize(de::value::U64Deserializer::<Error>::new(0));
        }
        let path = if self.path.is_empty() {
            field.to_string()
        } else {
            format!("{}.{field}", self.path)
        };
        seed.deserialize(Tracer {
            path,
            out: self.out,
        })
    }
}
