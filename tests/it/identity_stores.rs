//! The identity rules, run against both SQL stores: the embedded SQLite file and a real PostgreSQL
//! server. Each case is written once and must hold for both.

use std::sync::Arc;

use wxgate::identity::postgres::PostgresStore;
use wxgate::identity::sqlite::SqliteStore;
use wxgate::identity::{IdentityStore, LoginIds, UserKey};

use crate::servers::TestDatabase;

fn ids<'a>(appid: &'a str, openid: &'a str, unionid: Option<&'a str>) -> LoginIds<'a> {
    LoginIds {
        appid,
        openid,
        unionid,
    }
}

/// Runs `case` against a fresh SQLite store and a fresh PostgreSQL database.
async fn both<F, Fut>(case: F)
where
    F: Fn(Arc<dyn IdentityStore>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let dir = tempfile::tempdir().unwrap();
    let sqlite = SqliteStore::open(&dir.path().join("ids.db")).await.unwrap();
    case(Arc::new(sqlite)).await;
    if let Some(db) = TestDatabase::create().await {
        let postgres = PostgresStore::open(&db.url).await.unwrap();
        case(Arc::new(postgres)).await;
    }
}

async fn openids(store: &dyn IdentityStore, user_id: &str) -> Vec<(String, String)> {
    let record = store.user(UserKey::UserId(user_id)).await.unwrap().unwrap();
    record
        .openids
        .into_iter()
        .map(|link| (link.appid, link.openid))
        .collect()
}

#[tokio::test]
async fn the_same_person_across_apps_is_one_user() {
    both(|store| async move {
        let first = store.resolve(ids("wxA", "oA", Some("U"))).await.unwrap();
        assert!(first.created);
        let again = store.resolve(ids("wxA", "oA", Some("U"))).await.unwrap();
        assert_eq!(
            (again.user_id.as_str(), again.created),
            (first.user_id.as_str(), false)
        );
        let other_app = store.resolve(ids("wxB", "oB", Some("U"))).await.unwrap();
        assert_eq!(
            (other_app.user_id.as_str(), other_app.created),
            (first.user_id.as_str(), false)
        );
        let someone_else = store.resolve(ids("wxA", "oC", Some("V"))).await.unwrap();
        assert!(someone_else.created && someone_else.user_id != first.user_id);
        assert_eq!(
            openids(&*store, &first.user_id).await,
            [("wxA".into(), "oA".into()), ("wxB".into(), "oB".into())]
        );
    })
    .await;
}

#[tokio::test]
async fn a_unionid_learned_later_is_linked_not_a_new_user() {
    both(|store| async move {
        let first = store.resolve(ids("wxA", "oA", None)).await.unwrap();
        let later = store.resolve(ids("wxA", "oA", Some("U"))).await.unwrap();
        assert_eq!(
            (later.user_id.as_str(), later.created),
            (first.user_id.as_str(), false)
        );
        let app = store.resolve(ids("wxB", "oB", Some("U"))).await.unwrap();
        assert_eq!(app.user_id, first.user_id);
        let record = store.user(UserKey::UnionId("U")).await.unwrap().unwrap();
        assert_eq!(record.user_id, first.user_id);
    })
    .await;
}

#[tokio::test]
async fn an_openid_only_user_is_merged_into_the_unionid_user() {
    both(|store| async move {
        let orphan = store.resolve(ids("wxA", "oA", None)).await.unwrap();
        let person = store.resolve(ids("wxB", "oB", Some("U"))).await.unwrap();
        assert_ne!(orphan.user_id, person.user_id);
        let merged = store.resolve(ids("wxA", "oA", Some("U"))).await.unwrap();
        assert_eq!(merged.user_id, person.user_id);
        assert_eq!(merged.merged, std::slice::from_ref(&orphan.user_id));
        // The openid now resolves to the survivor even without the unionid, and the old user is
        // kept as a record pointing at it.
        assert_eq!(
            store.resolve(ids("wxA", "oA", None)).await.unwrap().user_id,
            person.user_id
        );
        let old = store
            .user(UserKey::UserId(&orphan.user_id))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(old.merged_into.as_deref(), Some(person.user_id.as_str()));
        let survivor = store
            .user(UserKey::UserId(&person.user_id))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(survivor.merged_from, std::slice::from_ref(&orphan.user_id));
        assert_eq!(
            openids(&*store, &person.user_id).await,
            [("wxA".into(), "oA".into()), ("wxB".into(), "oB".into())]
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_first_logins_of_one_person_make_one_user() {
    both(|store| async move {
        // Every connection open first, then all logins released at once.
        let start = Arc::new(tokio::sync::Barrier::new(40));
        let tasks: Vec<_> = (0..40)
            .map(|i| {
                let store = store.clone();
                let start = start.clone();
                tokio::spawn(async move {
                    store.ping().await.unwrap();
                    start.wait().await;
                    let (appid, openid) = [("wxA", "oA"), ("wxB", "oB"), ("wxC", "oC")][i % 3];
                    // Some logins carry the unionid, some (older app bindings) do not.
                    let unionid = (i % 4 != 3).then_some("U");
                    store
                        .resolve(ids(appid, openid, unionid))
                        .await
                        .unwrap()
                        .user_id
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        // Whatever the order, the person ends as one live user holding all three openids.
        let person = store.user(UserKey::UnionId("U")).await.unwrap().unwrap();
        assert_eq!(person.merged_into, None);
        assert_eq!(
            openids(&*store, &person.user_id).await,
            [
                ("wxA".into(), "oA".into()),
                ("wxB".into(), "oB".into()),
                ("wxC".into(), "oC".into())
            ]
        );
        for (appid, openid) in [("wxA", "oA"), ("wxB", "oB"), ("wxC", "oC")] {
            let again = store.resolve(ids(appid, openid, None)).await.unwrap();
            assert_eq!(again.user_id, person.user_id);
        }
    })
    .await;
}

#[tokio::test]
async fn a_phone_number_is_kept_and_returned_at_login() {
    both(|store| async move {
        let user = store.resolve(ids("wxA", "oA", Some("U"))).await.unwrap();
        let phone = wxgate::identity::Phone {
            phone_number: "+86 13580006666".into(),
            country_code: "86".into(),
            verified_at: 1_700_000_000,
        };
        store.set_phone(&user.user_id, &phone).await.unwrap();
        let again = store.resolve(ids("wxB", "oB", Some("U"))).await.unwrap();
        assert_eq!(again.phone.as_deref(), Some("+86 13580006666"));
        let record = store
            .user(UserKey::UserId(&user.user_id))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(record.phone, Some(phone));
        store.ping().await.unwrap();
    })
    .await;
}

/// One step of a random login history: person `person` logs in to app `app`, with or without the
/// unionid WeChat gives once the app is bound; or the last user verifies a phone number.
#[derive(Clone, Debug)]
enum Step {
    Login {
        app: u8,
        person: u8,
        with_unionid: bool,
    },
    Phone(u16),
}

fn step() -> impl proptest::strategy::Strategy<Value = Step> {
    use proptest::prelude::*;
    prop_oneof![
        6 => (0u8..3, 0u8..4, any::<bool>()).prop_map(|(app, person, with_unionid)| Step::Login {
            app,
            person,
            with_unionid
        }),
        1 => any::<u16>().prop_map(Step::Phone),
    ]
}

/// The in-memory cache of returning users' links (kept in front of SQLite) must never answer
/// differently from the store itself: the same random history of logins, link learning, merges
/// and phone numbers goes to a cached and an uncached store, and every answer must be the same up
/// to the naming of users.
#[test]
fn the_link_cache_answers_exactly_as_the_store() {
    use proptest::prelude::*;
    use std::collections::HashMap;
    use wxgate::identity::{Identities, Phone};

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let config = ProptestConfig {
        cases: 48,
        ..ProptestConfig::default()
    };
    proptest!(config, |(steps in proptest::collection::vec(step(), 1..40))| {
        runtime.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let cached = SqliteStore::open(&dir.path().join("cached.db")).await.unwrap();
            let plain = SqliteStore::open(&dir.path().join("plain.db")).await.unwrap();
            let cached = Identities::with_store(Arc::new(cached), true);
            let plain = Identities::with_store(Arc::new(plain), false);
            // cached user_id -> plain user_id, and back: the two stores name users differently.
            let mut names: HashMap<String, String> = HashMap::new();
            let mut back: HashMap<String, String> = HashMap::new();
            let mut last: Option<(String, String)> = None;
            for step in &steps {
                match *step {
                    Step::Login { app, person, with_unionid } => {
                        let appid = format!("wxapp{app}");
                        let openid = format!("o-{app}-{person}");
                        let unionid = format!("u-{person}");
                        let unionid = with_unionid.then_some(unionid.as_str());
                        let login = ids(&appid, &openid, unionid);
                        let a = cached.resolve(login).await.unwrap();
                        let b = plain.resolve(login).await.unwrap();
                        prop_assert_eq!(a.created, b.created, "{:?}", step);
                        prop_assert_eq!(a.merged.len(), b.merged.len(), "{:?}", step);
                        prop_assert_eq!(&a.phone, &b.phone, "{:?}", step);
                        let known = names.get(&a.user_id).cloned();
                        match known {
                            Some(named) => prop_assert_eq!(&named, &b.user_id, "{:?}", step),
                            None => {
                                prop_assert!(!back.contains_key(&b.user_id), "{:?}", step);
                                names.insert(a.user_id.clone(), b.user_id.clone());
                                back.insert(b.user_id.clone(), a.user_id.clone());
                            }
                        }
                        for (gone_a, gone_b) in a.merged.iter().zip(&b.merged) {
                            // Merged in either order: each cached name maps onto one of plain's.
                            let mapped = names.get(gone_a).cloned();
                            prop_assert!(
                                mapped.is_none_or(|m| b.merged.contains(&m)),
                                "{:?}: {} merged", step, gone_b
                            );
                        }
                        last = Some((a.user_id, b.user_id));
                    }
                    Step::Phone(number) => {
                        let Some((a, b)) = &last else { continue };
                        let phone = Phone {
                            phone_number: format!("1358000{number:04}"),
                            country_code: "86".into(),
                            verified_at: 1_700_000_000,
                        };
                        cached.set_phone(a, &phone).await.unwrap();
                        plain.set_phone(b, &phone).await.unwrap();
                    }
                }
            }
            Ok(())
        })?;
    });
}
