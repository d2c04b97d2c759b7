//! The store's identity: drawn once with the schema, kept across restarts
//! and re-applications, different for every new store.

use mts_storage::store::Store;
use mts_testkit::TarantoolProcess;

#[tokio::test]
async fn a_store_keeps_its_identity_and_a_new_one_gets_its_own() {
    let mut tarantool = TarantoolProcess::start();
    let store = Store::connect(&tarantool.config()).await.unwrap();
    let identity = store.identity();
    assert_eq!(identity.store_id.len(), 36, "a UUID: {identity:?}");
    assert!(identity.created_ns > 0);

    // Applied again, as a service with another schema version would.
    let (_version,): (u64,) = tarantool
        .admin_client()
        .await
        .eval(mts_storage::store::SCHEMA_LUA, ())
        .await
        .unwrap();
    assert_eq!(store.read_identity().await.unwrap(), identity);
    tarantool.restart();
    let again = Store::connect(&tarantool.config()).await.unwrap();
    assert_eq!(again.identity(), identity, "kept across a restart");

    let other = TarantoolProcess::start();
    let fresh = Store::connect(&other.config()).await.unwrap();
    assert_ne!(fresh.identity().store_id, identity.store_id);
    assert!(fresh.identity().created_ns >= identity.created_ns);
}
