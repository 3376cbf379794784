use proptest::prelude::*;

use super::*;

fn app(key: &str, tag: &str) -> Option<AdminApp> {
    Some(AdminApp {
        key: key.into(),
        secret: format!("secret-{tag}"),
        previous_secret: None,
        settings: format!("{{\"tag\":\"{tag}\"}}"),
    })
}

fn view(r: &AppRegistry) -> Vec<(String, AdminApp)> {
    r.live()
        .into_iter()
        .map(|(id, a)| (id.to_owned(), a.clone()))
        .collect()
}

#[test]
fn the_last_writer_wins_ties_by_node_id() {
    let (mut a, mut b) = (AppRegistry::new("a"), AppRegistry::new("b"));
    let base = a.write(1_000, "x", app("k", "base"));
    b.merge(vec![base]);
    // A partition: both change x at the same wall-clock ms.
    let from_a = a.write(2_000, "x", app("k", "from-a"));
    let from_b = b.write(2_000, "x", app("k", "from-b"));
    assert_eq!(from_a.stamp, from_b.stamp);
    a.merge(vec![from_b]);
    b.merge(vec![from_a]);
    assert_eq!(view(&a), view(&b));
    assert_eq!(
        a.get("x").map(|x| x.settings.as_str()),
        Some("{\"tag\":\"from-b\"}")
    );
    // A later write wins whatever its node.
    let later = a.write(1_500, "x", app("k", "later"));
    assert!(later.stamp > from_a_stamp(&b), "the clock never goes back");
    b.merge(vec![later]);
    assert_eq!(
        b.get("x").map(|x| x.settings.as_str()),
        Some("{\"tag\":\"later\"}")
    );
}

fn from_a_stamp(r: &AppRegistry) -> Hlc {
    r.records().map(|r| r.stamp).max().unwrap_or_default()
}

#[test]
fn a_delete_is_a_record_and_an_old_write_does_not_bring_the_app_back() {
    let (mut a, mut b) = (AppRegistry::new("a"), AppRegistry::new("b"));
    let made = a.write(1, "x", app("k", "1"));
    let gone = a.write(2, "x", None);
    assert!(b.merge(vec![gone]).len() == 1);
    assert!(b.merge(vec![made]).is_empty(), "older than the tombstone");
    assert!(b.get("x").is_none() && view(&b).is_empty());
    assert_eq!(
        b.check_new("x", "k"),
        Ok(()),
        "a deleted app's id and key are free"
    );
}

#[test]
fn ids_and_keys_are_unique_and_config_apps_win() {
    let mut a = AppRegistry::new("a");
    a.set_config_apps([("cfg", "cfg-key")]);
    assert_eq!(
        a.check_new("cfg", "z"),
        Err(RegistryError::IdTaken("cfg".into()))
    );
    assert_eq!(
        a.check_new("n", "cfg-key"),
        Err(RegistryError::KeyTaken("cfg-key".into()))
    );
    a.write(1, "n", app("k", "1"));
    assert_eq!(
        a.check_new("n", "z"),
        Err(RegistryError::IdTaken("n".into()))
    );
    assert_eq!(
        a.check_new("m", "k"),
        Err(RegistryError::KeyTaken("k".into()))
    );
    assert_eq!(a.check_key("n", "k"), Ok(()), "an app keeps its own key");
    // Two sides of a partition made two apps with one key: the first written keeps it.
    let mut b = AppRegistry::new("b");
    let later = b.write(5, "second", app("k", "2"));
    a.merge(vec![later]);
    assert_eq!(view(&a).len(), 1);
    assert_eq!(a.key_conflicts(), vec!["second"]);
}

#[test]
fn grace_periods_end_in_order() {
    let mut a = AppRegistry::new("a");
    let mut x = app("k", "1").expect("an app");
    x.previous_secret = Some(("old".into(), 5_000));
    a.write(1, "x", Some(x.clone()));
    x.previous_secret = Some(("old".into(), 3_000));
    a.write(
        2,
        "y",
        Some(AdminApp {
            key: "k2".into(),
            ..x
        }),
    );
    assert_eq!(a.next_expiry(0), Some(3_000));
    assert_eq!(a.next_expiry(3_000), Some(5_000));
    assert_eq!(a.next_expiry(5_000), None);
}

/// One write of a schedule: which node, which id, delete or not, when.
fn op() -> impl Strategy<Value = (usize, u8, bool, u64, u8)> {
    (0..3usize, 0..4u8, any::<bool>(), 0..50u64, 0..3u8)
}

proptest! {
    /// Whatever the writes and whatever order the nodes see each other's
    /// records in (some twice), once every node has every record they
    /// hold the same apps.
    #[test]
    fn every_order_of_delivery_converges(
        ops in proptest::collection::vec(op(), 1..40),
        seed in any::<u64>(),
    ) {
        let mut nodes: Vec<AppRegistry> = ["n1", "n2", "n3"].iter().map(|n| AppRegistry::new(n)).collect();
        let mut sent: Vec<AppRecord> = Vec::new();
        for (i, (node, id, delete, ms, key)) in ops.into_iter().enumerate() {
            let id = format!("app{id}");
            let a = if delete { None } else { app(&format!("key{key}"), &i.to_string()) };
            sent.push(nodes[node].write(ms, &id, a));
        }
        let mut rng = seed;
        for n in &mut nodes {
            let mut order = sent.clone();
            // A seeded shuffle, with some records twice.
            for i in (1..order.len()).rev() {
                rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                order.swap(i, (rng >> 33) as usize % (i + 1));
            }
            let again = order.iter().take(order.len() / 2).cloned().collect::<Vec<_>>();
            order.extend(again);
            n.merge(order);
        }
        let first = view(&nodes[0]);
        for n in &nodes[1..] {
            prop_assert_eq!(&view(n), &first);
            prop_assert_eq!(n.key_conflicts(), nodes[0].key_conflicts());
        }
        let keys: HashSet<_> = first.iter().map(|(_, a)| a.key.clone()).collect();
        prop_assert_eq!(keys.len(), first.len(), "one app per key");
    }
}
