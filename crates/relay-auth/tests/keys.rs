//! Virtual-key lifecycle through the admin API and the auth service, on SQLite and (with DATABASE_URL)
//! Postgres: creation, authentication, hashing, revocation, disabling, expiry and IP allowlists.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use relay_auth::admin::Invalidate;
use relay_auth::store::{KeyStore, Level};
use relay_auth::{AuthConfig, AuthService};
use relay_core::contracts::Authenticator;
use relay_core::pb::auth::v1::{AuthenticateRequest, ScopeKind};
use relay_core::{ErrorCode, Secret};
use relay_db::Db;
use serde_json::{Value, json};
use tower::ServiceExt;

const TOKEN: &str = "admin-token-0123456789";
const PEPPER: &str = "pepper-for-tests-0123";

#[derive(Default)]
struct Seen(Mutex<Vec<String>>);

impl Invalidate for Seen {
    fn invalidate(&self, level: Level, id: &str) {
        self.0.lock().unwrap().push(format!("{level:?}:{id}"));
    }
}

struct Env {
    admin: axum::Router,
    auth: AuthService,
    seen: Arc<Seen>,
    db: Db,
}

fn env(db: Db) -> Env {
    let store = KeyStore::new(db.clone());
    let seen = Arc::new(Seen::default());
    let admin =
        relay_auth::admin::router(store.clone(), Some(Secret::new(TOKEN)), Secret::new(PEPPER), seen.clone())
            .unwrap();
    let cfg = AuthConfig { pepper: Secret::new(PEPPER), ..Default::default() };
    Env { admin, auth: AuthService::new(&cfg, Some(store)).unwrap(), seen, db }
}

async fn call(e: &Env, method: &str, path: &str, body: Option<Value>, token: &str) -> (StatusCode, Value) {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .body(body.map_or_else(Body::empty, |b| Body::from(b.to_string())))
        .unwrap();
    let resp = e.admin.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

async fn auth(
    e: &Env,
    key: &str,
    ip: &str,
) -> Result<relay_core::pb::auth::v1::Principal, relay_core::RelayError> {
    e.auth
        .authenticate(AuthenticateRequest { api_key: key.into(), client_ip: ip.into() })
        .await
        .map(|r| r.principal.unwrap())
}

async fn lifecycle(e: Env) {
    // The admin API needs its token.
    assert_eq!(call(&e, "GET", "/admin/v1/orgs", None, "wrong").await.0, StatusCode::UNAUTHORIZED);
    let (s, org) = call(
        &e,
        "POST",
        "/admin/v1/orgs",
        Some(json!({"name": "Acme", "id": "acme", "budget_micros": 9000000, "budget_period": "monthly"})),
        TOKEN,
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{org}");
    let (s, team) =
        call(&e, "POST", "/admin/v1/orgs/acme/teams", Some(json!({"name": "ml", "tpm": 50000})), TOKEN).await;
    assert_eq!(s, StatusCode::CREATED, "{team}");
    let team_id = team["id"].as_str().unwrap().to_owned();
    assert_eq!(
        call(&e, "POST", "/admin/v1/orgs/nope/teams", Some(json!({"name": "x"})), TOKEN).await.0,
        StatusCode::NOT_FOUND
    );
    let (s, bad) =
        call(&e, "POST", "/admin/v1/keys", Some(json!({"team_id": team_id, "rpm": -1})), TOKEN).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}");
    let (s, bad) = call(
        &e,
        "POST",
        "/admin/v1/keys",
        Some(json!({"team_id": team_id, "name": "x", "allowed_regions": ["EU West"]})),
        TOKEN,
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}");

    let (s, created) = call(
        &e,
        "POST",
        "/admin/v1/keys",
        Some(json!({"team_id": team_id, "name": "ci", "rpm": 60,
        "allowed_models": ["gpt-4o*"], "ip_allowlist": ["10.0.0.0/8"], "allowed_regions": ["eu"],
        "metadata": {"owner": "ci"}})),
        TOKEN,
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{created}");
    let key = created["key"].as_str().unwrap().to_owned();
    let id = created["id"].as_str().unwrap().to_owned();
    assert!(key.starts_with(&format!("rk_{id}_")));

    // Shown once: reading the key back never returns the secret.
    let (_, shown) = call(&e, "GET", &format!("/admin/v1/keys/{id}"), None, TOKEN).await;
    assert!(shown.get("key").is_none() && !shown.to_string().contains(&key[key.len() - 20..]));
    let (_, listed) = call(&e, "GET", "/admin/v1/keys?org_id=acme", None, TOKEN).await;
    assert_eq!(listed["data"].as_array().unwrap().len(), 1);

    // The database holds the HMAC only.
    let secret = key.rsplit('_').next().unwrap();
    assert!(!dump(&e.db).await.contains(secret), "secret stored in the database");

    // Authentication: the principal carries every scope's policy.
    let p = auth(&e, &key, "10.1.2.3").await.unwrap();
    assert_eq!(
        (p.key_id.as_str(), p.team_id.as_str(), p.org_id.as_str()),
        (id.as_str(), team_id.as_str(), "acme")
    );
    let kinds: Vec<i32> = p.scopes.iter().map(|s| s.kind).collect();
    assert_eq!(kinds, [ScopeKind::Key as i32, ScopeKind::Team as i32, ScopeKind::Org as i32]);
    assert_eq!(p.scopes[0].limits.unwrap().requests_per_minute, 60);
    assert_eq!(p.scopes[1].limits.unwrap().tokens_per_minute, 50000);
    assert_eq!(p.scopes[2].budget.clone().unwrap().limit.unwrap().micros, 9_000_000);
    assert_eq!(p.metadata["owner"], "ci");
    assert_eq!(p.allowed_regions, ["eu"], "residency travels with the principal");

    // Wrong secret, wrong address, unknown id: refused, and the key never echoed.
    for (k, ip, code) in [
        (format!("rk_{id}_wrongsecret"), "10.1.2.3", ErrorCode::Unauthenticated),
        (key.clone(), "192.168.0.1", ErrorCode::PermissionDenied),
        ("rk_unknownid000_secret".to_owned(), "10.1.2.3", ErrorCode::Unauthenticated),
    ] {
        let err = auth(&e, &k, ip).await.unwrap_err();
        assert_eq!(err.code, code, "{k}");
        assert!(!err.message.contains(&k));
    }

    // Disabling the team locks its keys out; enabling lets them back in; both are announced.
    assert_eq!(
        call(&e, "POST", &format!("/admin/v1/teams/{team_id}/disable"), None, TOKEN).await.0,
        StatusCode::OK
    );
    assert_eq!(auth(&e, &key, "10.1.2.3").await.unwrap_err().code, ErrorCode::Unauthenticated);
    assert_eq!(
        call(&e, "POST", &format!("/admin/v1/teams/{team_id}/enable"), None, TOKEN).await.0,
        StatusCode::OK
    );
    assert!(auth(&e, &key, "10.1.2.3").await.is_ok());

    // Revocation is final.
    assert_eq!(call(&e, "POST", &format!("/admin/v1/keys/{id}/revoke"), None, TOKEN).await.0, StatusCode::OK);
    let err = auth(&e, &key, "10.1.2.3").await.unwrap_err();
    assert!(err.message.contains("revoked"), "{err:?}");
    assert_eq!(call(&e, "POST", &format!("/admin/v1/keys/{id}/enable"), None, TOKEN).await.0, StatusCode::OK);
    assert!(auth(&e, &key, "10.1.2.3").await.is_err(), "a revoked key stays revoked");
    assert_eq!(*e.seen.0.lock().unwrap(), [format!("Team:{team_id}"), format!("Key:{id}")]);

    // Expired keys are refused.
    let (_, old) =
        call(&e, "POST", "/admin/v1/keys", Some(json!({"team_id": team_id, "expires_at_ms": 1000})), TOKEN)
            .await;
    let err = auth(&e, old["key"].as_str().unwrap(), "").await.unwrap_err();
    assert!(err.message.contains("expired"));
}

/// Every text and blob column of the key tables, for a secret search.
async fn dump(db: &Db) -> String {
    use sqlx::Row;
    let sql = "SELECT id || name || allowed_models || ip_allowlist || metadata, secret_hash FROM api_keys";
    let rows: Vec<(String, Vec<u8>)> = match db {
        Db::Postgres(p) => {
            sqlx::query(sql).fetch_all(p).await.unwrap().iter().map(|r| (r.get(0), r.get(1))).collect()
        }
        Db::Sqlite(p) => {
            sqlx::query(sql).fetch_all(p).await.unwrap().iter().map(|r| (r.get(0), r.get(1))).collect()
        }
    };
    rows.iter().map(|(t, b)| format!("{t}{}", String::from_utf8_lossy(b))).collect()
}

#[tokio::test]
async fn key_lifecycle_on_sqlite() {
    let db = Db::connect("sqlite::memory:").await.unwrap();
    db.migrate().await.unwrap();
    lifecycle(env(db)).await;
}

#[tokio::test]
async fn key_lifecycle_on_postgres() {
    let Some(url) = relay_test_support::env_service("DATABASE_URL") else { return };
    lifecycle(env(relay_test_support::fresh_postgres(&url).await)).await;
}

#[tokio::test]
async fn openapi_document_lists_every_route() {
    let db = Db::connect("sqlite::memory:").await.unwrap();
    db.migrate().await.unwrap();
    let e = env(db);
    let (s, doc) = call(&e, "GET", "/admin/v1/openapi.json", None, "").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(doc["openapi"], "3.1.0");
    assert!(doc["paths"]["/admin/v1/keys/{id}/{action}"].is_object());
    assert!(
        relay_auth::admin::router(KeyStore::new(e.db.clone()), None, Secret::new(PEPPER), e.seen.clone())
            .is_none(),
        "no token, no API"
    );
}
