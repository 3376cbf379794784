//! `tags` on a publish (`POST /apps/{id}/events`, `batch_events`, wsify
//! `broadcast`, `POST /broadcast`; issue #13): checked here, matched
//! against subscription filters by the router.

use std::sync::Arc;

use pushmesh_core::filter::{Tags, TagsError};

/// The tags of a publish from their JSON text; `None` when absent, `null`
/// or `{}` (an untagged event).
pub fn parse(raw: Option<&str>) -> Result<Option<Arc<Tags>>, TagsError> {
    match raw {
        None | Some("null") => Ok(None),
        Some(text) => {
            let t = Tags::parse_json(text)?;
            Ok((!t.is_empty()).then(|| Arc::new(t)))
        }
    }
}

/// The 400 message for tags that are refused.
pub fn refusal(e: &TagsError) -> String {
    format!("invalid tags: {e}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_null_and_empty_tags_are_untagged() {
        assert_eq!(parse(None), Ok(None));
        assert_eq!(parse(Some("null")), Ok(None));
        assert_eq!(parse(Some("{}")), Ok(None));
        let t = parse(Some(r#"{"zone":"eu"}"#)).ok().flatten();
        assert_eq!(t.as_deref().and_then(|t| t.get("zone")), Some("eu"));
        assert_eq!(parse(Some(r#"{"zone":1}"#)), Err(TagsError::NotAnObject));
        assert!(refusal(&TagsError::TooMany).starts_with("invalid tags: "));
    }
}
