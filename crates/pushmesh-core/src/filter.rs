//! Tags on published events and filters on subscriptions (issue #13):
//! parsing (bounded, typed errors) and matching. The router groups
//! subscriptions by [`Selector`] (`router/filter.rs`), so a publish costs one
//! evaluation per distinct selector of the channel, not one per subscriber.
//!
//! - [`Tags`]: `{"zone":"eu","kind":"order"}` on a publish (string → string).
//! - [`Filter`]: `{"zone":"eu","kind":["order","refund"]}` on a subscribe. An
//!   event matches if, for every key of the filter, it has that tag with one
//!   of the listed values. An event without the key does not match.
//! - [`Selector`]: what a subscription receives: its filter, and on
//!   `#server-to-user-<id>` channels the connection's device and zone
//!   (a `device` / `zone` tag there targets one device or zone).

use std::fmt::Write as _;

use serde_json::Value;

/// At most this many tags on one event.
pub const MAX_TAGS: usize = 16;
/// A tag or filter key is at most this many bytes.
pub const MAX_KEY_BYTES: usize = 64;
/// A tag or filter value is at most this many bytes.
pub const MAX_VALUE_BYTES: usize = 256;
/// At most this many keys in one filter.
pub const MAX_FILTER_KEYS: usize = 16;
/// At most this many values for one key of a filter.
pub const MAX_FILTER_VALUES: usize = 64;
/// A filter's JSON text is at most this many bytes.
pub const MAX_FILTER_BYTES: usize = 4096;

/// The tag that targets one device of a user on `#server-to-user-<id>`.
pub const DEVICE_TAG: &str = "device";
/// The tag that targets one zone of a user on `#server-to-user-<id>`.
pub const ZONE_TAG: &str = "zone";

/// Why the `tags` of a publish are refused (the API answers 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TagsError {
    /// Not a JSON object of strings.
    #[error("tags must be a JSON object whose values are strings")]
    NotAnObject,
    /// Too many keys.
    #[error("tags may have at most {MAX_TAGS} keys")]
    TooMany,
    /// A key is empty or too long.
    #[error("a tag key must be 1 to {MAX_KEY_BYTES} bytes")]
    Key,
    /// A value is too long.
    #[error("a tag value must be at most {MAX_VALUE_BYTES} bytes")]
    Value,
}

/// Why a subscription's `filter` is refused (`InvalidFilter`, 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    /// Not a JSON object.
    #[error("filter must be a JSON object")]
    NotAnObject,
    /// The JSON text is too long.
    #[error("filter is larger than {MAX_FILTER_BYTES} bytes")]
    TooLarge,
    /// Too many keys.
    #[error("filter may have at most {MAX_FILTER_KEYS} keys")]
    TooManyKeys,
    /// A key is empty or too long.
    #[error("a filter key must be 1 to {MAX_KEY_BYTES} bytes")]
    Key,
    /// A value is neither a string nor a non-empty array of strings.
    #[error("filter values must be a string or a non-empty array of strings")]
    Value,
    /// A value is too long.
    #[error("a filter value must be at most {MAX_VALUE_BYTES} bytes")]
    ValueTooLong,
    /// Too many values for one key.
    #[error("a filter key may list at most {MAX_FILTER_VALUES} values")]
    TooManyValues,
    /// Filters are refused on cache channels (the cached event has no tags).
    #[error("filters are not supported on cache channels")]
    CacheChannel,
}

/// The tags of one event, sorted by key (a binary search per lookup).
/// Empty tags allocate nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Tags(Box<[(Box<str>, Box<str>)]>);

impl Tags {
    /// No tags (an untagged event), shared.
    pub fn none() -> &'static Tags {
        static NONE: std::sync::OnceLock<Tags> = std::sync::OnceLock::new();
        NONE.get_or_init(Tags::default)
    }

    /// Parses the JSON text of a `tags` object.
    pub fn parse_json(text: &str) -> Result<Self, TagsError> {
        let map: serde_json::Map<String, Value> =
            serde_json::from_str(text).map_err(|_| TagsError::NotAnObject)?;
        if map.len() > MAX_TAGS {
            return Err(TagsError::TooMany);
        }
        let mut pairs = Vec::with_capacity(map.len());
        for (k, v) in map {
            let Value::String(v) = v else {
                return Err(TagsError::NotAnObject);
            };
            pairs.push((k, v));
        }
        Self::from_pairs(pairs)
    }

    /// Tags from key/value pairs (a peer's frame), checked like a publish's.
    pub fn from_pairs(mut pairs: Vec<(String, String)>) -> Result<Self, TagsError> {
        if pairs.len() > MAX_TAGS {
            return Err(TagsError::TooMany);
        }
        for (k, v) in &pairs {
            if k.is_empty() || k.len() > MAX_KEY_BYTES {
                return Err(TagsError::Key);
            }
            if v.len() > MAX_VALUE_BYTES {
                return Err(TagsError::Value);
            }
        }
        pairs.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        pairs.dedup_by(|a, b| a.0 == b.0);
        Ok(Self(
            pairs
                .into_iter()
                .map(|(k, v)| (k.into_boxed_str(), v.into_boxed_str()))
                .collect(),
        ))
    }

    /// The value of a tag.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .binary_search_by(|(k, _)| (**k).cmp(key))
            .ok()
            .map(|i| &*self.0[i].1)
    }

    /// Whether the event has no tags.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The pairs, sorted by key.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (&**k, &**v))
    }

    /// The pairs as owned strings (for a peer frame).
    pub fn to_pairs(&self) -> Vec<(String, String)> {
        self.iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }
}

/// A subscription filter in canonical form: keys sorted, each key's values
/// sorted and deduplicated, so equal filters compare (and hash) equal.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Filter(Box<[(Box<str>, Values)]>);

/// One key's accepted values, sorted.
type Values = Box<[Box<str>]>;

impl Filter {
    /// Parses a filter's JSON text; `None` for `{}` (which matches every
    /// event, like no filter at all).
    pub fn parse(text: &str) -> Result<Option<Self>, FilterError> {
        if text.len() > MAX_FILTER_BYTES {
            return Err(FilterError::TooLarge);
        }
        let map: serde_json::Map<String, Value> =
            serde_json::from_str(text).map_err(|_| FilterError::NotAnObject)?;
        if map.len() > MAX_FILTER_KEYS {
            return Err(FilterError::TooManyKeys);
        }
        let mut keys = Vec::with_capacity(map.len());
        for (k, v) in map {
            if k.is_empty() || k.len() > MAX_KEY_BYTES {
                return Err(FilterError::Key);
            }
            let mut values: Vec<Box<str>> = match v {
                Value::String(s) => vec![s.into_boxed_str()],
                Value::Array(a) if !a.is_empty() => {
                    if a.len() > MAX_FILTER_VALUES {
                        return Err(FilterError::TooManyValues);
                    }
                    let mut out = Vec::with_capacity(a.len());
                    for x in a {
                        let Value::String(s) = x else {
                            return Err(FilterError::Value);
                        };
                        out.push(s.into_boxed_str());
                    }
                    out
                }
                _ => return Err(FilterError::Value),
            };
            if values.iter().any(|v| v.len() > MAX_VALUE_BYTES) {
                return Err(FilterError::ValueTooLong);
            }
            values.sort_unstable();
            values.dedup();
            keys.push((k.into_boxed_str(), values.into_boxed_slice()));
        }
        if keys.is_empty() {
            return Ok(None);
        }
        keys.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        Ok(Some(Self(keys.into_boxed_slice())))
    }

    /// Whether an event with these tags reaches a subscription with this filter.
    pub fn matches(&self, tags: &Tags) -> bool {
        self.0.iter().all(|(k, values)| {
            tags.get(k)
                .is_some_and(|v| values.binary_search_by(|x| (**x).cmp(v)).is_ok())
        })
    }

    /// The canonical JSON text (every value an array): equal filters give
    /// equal text. What the cluster's interest carries.
    pub fn canonical(&self) -> String {
        let mut s = String::from("{");
        for (i, (k, values)) in self.0.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            json_str(&mut s, k);
            s.push_str(":[");
            for (j, v) in values.iter().enumerate() {
                if j > 0 {
                    s.push(',');
                }
                json_str(&mut s, v);
            }
            s.push(']');
        }
        s.push('}');
        s
    }
}

fn json_str(out: &mut String, s: &str) {
    // serde_json escapes exactly as JSON needs; writing to a String cannot fail.
    match serde_json::to_string(s) {
        Ok(q) => out.push_str(&q),
        Err(_) => {
            let _ = write!(out, "\"\"");
        }
    }
}

/// The device and zone of a connection (from identity headers set by a
/// trusted load balancer).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Target {
    /// Device.
    pub device: Option<Box<str>>,
    /// Zone.
    pub zone: Option<Box<str>>,
}

/// What one subscription receives; subscriptions with equal selectors on a
/// channel are grouped and evaluated once per publish.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Selector {
    /// The subscriber's filter.
    pub filter: Option<Filter>,
    /// On `#server-to-user-<id>`: the connection's device and zone; an
    /// event tagged `device` (`zone`) reaches it only if they are equal.
    pub target: Option<Target>,
}

impl Selector {
    /// Whether an event with these tags reaches the subscription.
    pub fn matches(&self, tags: &Tags) -> bool {
        self.filter.as_ref().is_none_or(|f| f.matches(tags))
            && self.target.as_ref().is_none_or(|t| {
                tags.get(DEVICE_TAG)
                    .is_none_or(|d| t.device.as_deref() == Some(d))
                    && tags
                        .get(ZONE_TAG)
                        .is_none_or(|z| t.zone.as_deref() == Some(z))
            })
    }

    /// The filter a peer may be told about: only plain filters (targets are
    /// decided where the connection is).
    pub fn advertised(&self) -> Option<&Filter> {
        match self.target {
            None => self.filter.as_ref(),
            Some(_) => None,
        }
    }
}

#[cfg(test)]
mod tests;
