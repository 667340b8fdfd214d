//! End-to-end tests: real `relay` processes on port 0, a mock OpenAI upstream, and (for the distributed
//! mode) real NATS JetStream and Postgres from `NATS_URL` / `DATABASE_URL`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod balance;
mod batches;
mod breakers;
mod chaos;
mod client;
mod collector;
mod conversations;
mod distributed;
mod embedded;
mod endpoints;
mod gemini;
mod harness;
mod hostile;
mod limits;
mod observability;
mod prepaid;
mod response_cache;
mod responses_state;
mod routing;
mod rules;
mod scenario;
mod tls;

use relay_test_support::MockOpenAi;

/// Provider + model sections routing model `mock` to the mock upstream and `demo` to the demo provider.
pub fn upstream_sections(mock: &MockOpenAi) -> String {
    format!(
        r#"
[[adapter.providers]]
name = "mock"
kind = "openai"
base_url = "{}"
api_key = "mock-upstream-key"

[[adapter.providers]]
name = "demo"
kind = "demo"

[[routing.models]]
name = "mock"
deployments = [{{ provider = "mock", model = "gpt-mock-upstream" }}]

[[routing.models]]
name = "mock-cancel"
on_disconnect = "cancel"
deployments = [{{ provider = "mock", model = "gpt-mock-upstream" }}]

[[routing.models]]
name = "demo"
deployments = [{{ provider = "demo", model = "relay-demo-1" }}]
"#,
        mock.base_url
    )
}
