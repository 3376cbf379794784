use super::*;

fn tags(json: &str) -> Tags {
    Tags::parse_json(json).unwrap_or_else(|e| panic!("{json}: {e}"))
}

fn filter(json: &str) -> Filter {
    match Filter::parse(json) {
        Ok(Some(f)) => f,
        other => panic!("{json}: {other:?}"),
    }
}

#[test]
fn a_string_value_matches_that_tag_only() {
    let f = filter(r#"{"zone":"eu"}"#);
    assert!(f.matches(&tags(r#"{"zone":"eu"}"#)));
    assert!(f.matches(&tags(r#"{"zone":"eu","kind":"order"}"#)));
    assert!(!f.matches(&tags(r#"{"zone":"us"}"#)));
    // A missing tag does not match; no tags at all neither.
    assert!(!f.matches(&tags(r#"{"kind":"order"}"#)));
    assert!(!f.matches(&Tags::default()));
}

#[test]
fn an_array_matches_any_of_its_values_and_every_key_must_match() {
    let f = filter(r#"{"zone":"eu","kind":["order","refund"]}"#);
    assert!(f.matches(&tags(r#"{"zone":"eu","kind":"refund"}"#)));
    assert!(f.matches(&tags(r#"{"zone":"eu","kind":"order"}"#)));
    assert!(!f.matches(&tags(r#"{"zone":"eu","kind":"quote"}"#)));
    assert!(!f.matches(&tags(r#"{"zone":"us","kind":"order"}"#)));
    assert!(!f.matches(&tags(r#"{"zone":"eu"}"#)));
}

#[test]
fn equal_filters_are_equal_whatever_the_order_and_form() {
    let a = filter(r#"{"kind":["refund","order","order"],"zone":"eu"}"#);
    let b = filter(r#"{"zone":["eu"],"kind":["order","refund"]}"#);
    assert_eq!(a, b);
    assert_eq!(
        a.canonical(),
        r#"{"kind":["order","refund"],"zone":["eu"]}"#
    );
    // The canonical text parses back to the same filter (the cluster's interest).
    assert_eq!(filter(&a.canonical()), a);
    let odd = filter(r#"{"k\"ey":"v\\al\u00e9"}"#);
    assert_eq!(filter(&odd.canonical()), odd);
}

/// A JSON object of `n` keys `k0`, `k1`, … each with the value `"v"`.
fn object_of(n: usize) -> String {
    let entries: Vec<String> = (0..n).map(|i| format!(r#""k{i}":"v""#)).collect();
    format!("{{{}}}", entries.join(","))
}

#[test]
fn an_empty_filter_is_no_filter() {
    assert_eq!(Filter::parse("{}"), Ok(None));
}

#[test]
fn invalid_filters_are_refused_with_a_reason() {
    let long_key = format!(r#"{{"{}":"v"}}"#, "k".repeat(MAX_KEY_BYTES + 1));
    let long_value = format!(r#"{{"k":"{}"}}"#, "v".repeat(MAX_VALUE_BYTES + 1));
    let many_keys = object_of(MAX_FILTER_KEYS + 1);
    let many_values = format!(
        r#"{{"k":[{}]}}"#,
        (0..=MAX_FILTER_VALUES)
            .map(|i| format!(r#""v{i}""#))
            .collect::<Vec<_>>()
            .join(",")
    );
    let cases: Vec<(&str, FilterError)> = vec![
        ("[]", FilterError::NotAnObject),
        ("\"zone\"", FilterError::NotAnObject),
        ("{", FilterError::NotAnObject),
        (r#"{"zone":1}"#, FilterError::Value),
        (r#"{"zone":[]}"#, FilterError::Value),
        (r#"{"zone":["eu",2]}"#, FilterError::Value),
        (r#"{"zone":{"a":"b"}}"#, FilterError::Value),
        (r#"{"":"eu"}"#, FilterError::Key),
        (&long_key, FilterError::Key),
        (&long_value, FilterError::ValueTooLong),
        (&many_keys, FilterError::TooManyKeys),
        (&many_values, FilterError::TooManyValues),
    ];
    for (text, want) in cases {
        assert_eq!(Filter::parse(text), Err(want), "{text}");
    }
    let huge = format!(r#"{{"k":"{}"}}"#, "v".repeat(MAX_FILTER_BYTES));
    assert_eq!(Filter::parse(&huge), Err(FilterError::TooLarge));
}

#[test]
fn tags_are_bounded_and_strings_only() {
    let many = object_of(MAX_TAGS + 1);
    assert_eq!(Tags::parse_json(&many), Err(TagsError::TooMany));
    assert_eq!(Tags::parse_json(r#"{"a":1}"#), Err(TagsError::NotAnObject));
    assert_eq!(Tags::parse_json("[]"), Err(TagsError::NotAnObject));
    assert_eq!(Tags::parse_json(r#"{"":"x"}"#), Err(TagsError::Key));
    let long = format!(r#"{{"k":"{}"}}"#, "v".repeat(MAX_VALUE_BYTES + 1));
    assert_eq!(Tags::parse_json(&long), Err(TagsError::Value));
    let t = tags(r#"{"b":"2","a":"1"}"#);
    assert_eq!(t.get("a"), Some("1"));
    assert_eq!(t.get("b"), Some("2"));
    assert_eq!(t.get("c"), None);
    // Through a peer frame and back.
    assert_eq!(Tags::from_pairs(t.to_pairs()), Ok(t));
}

#[test]
fn a_target_takes_untargeted_events_and_its_own_device_and_zone() {
    let phone = Selector {
        filter: None,
        target: Some(Target {
            device: Some("phone".into()),
            zone: Some("eu".into()),
        }),
    };
    let anonymous = Selector {
        filter: None,
        target: Some(Target::default()),
    };
    assert!(phone.matches(&Tags::default()));
    assert!(phone.matches(&tags(r#"{"device":"phone"}"#)));
    assert!(phone.matches(&tags(r#"{"device":"phone","zone":"eu"}"#)));
    assert!(!phone.matches(&tags(r#"{"device":"laptop"}"#)));
    assert!(!phone.matches(&tags(r#"{"device":"phone","zone":"us"}"#)));
    assert!(anonymous.matches(&tags(r#"{"other":"x"}"#)));
    assert!(!anonymous.matches(&tags(r#"{"device":"phone"}"#)));
    // A target is never advertised to peers; a plain filter is.
    assert_eq!(phone.advertised(), None);
    let f = Selector {
        filter: Some(filter(r#"{"zone":"eu"}"#)),
        target: None,
    };
    assert!(f.advertised().is_some());
}
