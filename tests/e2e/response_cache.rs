//! The response cache: a repeated request is answered from the cache, whole and streamed, with the same
//! bytes and without calling the upstream; it is booked as a cache hit (no cost); another org, and a
//! zero-retention key, never get a cached answer.

use relay_test_support::MockOpenAi;
use serde_json::{Value, json};

use crate::client;
use crate::harness::{KEY, RelayProc, auth_section, temp_dir};
use crate::responses_state::other_org_key;

const OTHER_KEY: &str = "sk-e2e-other-org-key";
const ZR_KEY: &str = "sk-e2e-zero-retention-key";
/// A key that opts in to the cache where its model group does not.
const CACHING_KEY: &str = "sk-e2e-caching-key";

struct Sent {
    cache: String,
    request_id: String,
    body: String,
}

async fn send(base: &str, key: &str, body: &Value) -> Sent {
    let r = client::http()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let header = |n: &str| r.headers().get(n).map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
    let (cache, request_id) = (header("x-relay-cache"), header("x-relay-request-id"));
    Sent { cache, request_id, body: r.text().await.unwrap() }
}

#[tokio::test]
async fn repeated_requests_are_answered_from_the_org_scoped_cache() {
    let mock = MockOpenAi::start().await;
    let dir = temp_dir("response-cache");
    let config = format!(
        "[server]\nservice_token = \"relay-test-service-token\"\nhttp_listen = \"127.0.0.1:0\"\ngrpc_listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [database]\nurl = \"sqlite://{}\"\n{}{}\
         [[adapter.providers]]\nname = \"mock\"\nkind = \"openai\"\nbase_url = \"{}\"\napi_key = \"k\"\n\
         [[routing.models]]\nname = \"cached\"\nresponse_cache_ttl_secs = 60\n\
         deployments = [{{ provider = \"mock\", model = \"gpt-mock-upstream\", price = {{ input_per_mtok_micros = 1000000, output_per_mtok_micros = 1000000 }} }}]\n\
         [[routing.models]]\nname = \"uncached\"\ndeployments = [{{ provider = \"mock\", model = \"gpt-mock-upstream\" }}]\n\
         [[auth.keys]]\nid = \"caching\"\nteam = \"team-e2e\"\norg = \"org-e2e\"\nhash = \"{}\"\nresponse_cache_ttl_secs = 60\n",
        dir.join("relay.db").display(),
        auth_section(),
        other_org_key(),
        mock.base_url,
        relay_auth::hash_key(&relay_core::Secret::new(crate::harness::PEPPER), CACHING_KEY),
    );
    let relay = RelayProc::start(&dir, "relay", &config).await;
    let base = relay.http();
    let billing = client::billing_client(&relay.grpc());

    // Whole answers: a miss, then a hit with the same bytes and no upstream call.
    let body = json!({"model": "cached", "messages": [{"role": "user", "content": "cache me please"}]});
    let first = send(&base, KEY, &body).await;
    assert_eq!(first.cache, "miss");
    let upstream = mock.chat_requests();
    // Same request, keys in another order.
    let reordered = json!({"messages": [{"content": "cache me please", "role": "user"}], "model": "cached"});
    let second = send(&base, KEY, &reordered).await;
    assert_eq!(second.cache, "hit");
    assert_eq!(second.body, first.body, "the cached answer is the first one, byte for byte");
    assert_eq!(mock.chat_requests(), upstream, "a hit calls no upstream");
    let hit = client::recorded_usage(&billing, &second.request_id).await;
    let miss = client::recorded_usage(&billing, &first.request_id).await;
    assert!(hit.cache_hit && !miss.cache_hit);
    assert_eq!(
        hit.usage.unwrap().output_tokens,
        miss.usage.unwrap().output_tokens,
        "the cached answer's usage, for reports"
    );
    assert!(miss.cost.unwrap().micros > 0);
    assert_eq!(hit.cost.unwrap().micros, 0, "a hit owes no provider anything");

    // Streams: cached separately, replayed as the same stream.
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let first_stream = send(&base, KEY, &streamed).await;
    assert_eq!(first_stream.cache, "miss", "a stream is not answered from a whole answer");
    let upstream = mock.chat_requests();
    let again = send(&base, KEY, &streamed).await;
    assert_eq!(again.cache, "hit");
    assert_eq!(again.body, first_stream.body);
    assert!(again.body.contains("data: [DONE]") && again.body.contains("please"), "{}", again.body);
    assert_eq!(mock.chat_requests(), upstream);

    // Another org with the very same request: its own miss, never the first org's answer.
    let other = send(&base, OTHER_KEY, &body).await;
    assert_eq!(other.cache, "miss");
    assert_eq!(mock.chat_requests(), upstream + 1);
    // A zero-retention key is never cached: both go upstream.
    for _ in 0..2 {
        assert_eq!(
            send(
                &base,
                ZR_KEY,
                &json!({"model": "cached", "messages": [{"role": "user", "content": "private"}]})
            )
            .await
            .cache,
            "miss"
        );
    }
    assert_eq!(mock.chat_requests(), upstream + 3);

    // A model group without a cache: a key that opts in gets hits; other keys never do.
    let plain = json!({"model": "uncached", "messages": [{"role": "user", "content": "per key"}]});
    assert_eq!(send(&base, KEY, &plain).await.cache, "");
    assert_eq!(send(&base, KEY, &plain).await.cache, "");
    assert_eq!(send(&base, CACHING_KEY, &plain).await.cache, "miss");
    let before = mock.chat_requests();
    assert_eq!(send(&base, CACHING_KEY, &plain).await.cache, "hit");
    assert_eq!(mock.chat_requests(), before);
    relay.stop().await;
}
