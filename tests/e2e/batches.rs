//! Files and Batches: an upload, a batch Relay runs itself against the routed upstream (output and error
//! files, usage at batch prices), a cancel, and tenant isolation: another org's key can never read, list,
//! delete, cancel or reference the files and batches, whatever ids it sends.

use std::time::Duration;

use relay_test_support::MockOpenAi;
use serde_json::{Value, json};

use crate::client;
use crate::harness::{KEY, RelayProc, auth_section, temp_dir};
use crate::responses_state::{OTHER_KEY, ZR_KEY, other_org_key};

const BOUNDARY: &str = "relay-e2e-boundary";

async fn upload(base: &str, key: &str, purpose: &str, name: &str, content: &str) -> (u16, Value) {
    let body = format!(
        "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n{purpose}\r\n\
         --{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\nContent-Type: application/jsonl\r\n\r\n{content}\r\n--{BOUNDARY}--\r\n"
    );
    let r = client::http()
        .post(format!("{base}/v1/files"))
        .bearer_auth(key)
        .header("content-type", format!("multipart/form-data; boundary={BOUNDARY}"))
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn get(base: &str, key: &str, path: &str) -> (u16, Value) {
    client::send_json(reqwest::Method::GET, base, key, path, None).await
}

async fn post(base: &str, key: &str, path: &str, body: Value) -> (u16, Value) {
    client::send_json(reqwest::Method::POST, base, key, path, Some(body)).await
}

fn jsonl(lines: &[(String, &str, &str)]) -> String {
    lines
        .iter()
        .map(|(id, model, text)| {
            json!({"custom_id": id, "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": model, "messages": [{"role": "user", "content": text}]}})
            .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

async fn settled(base: &str, id: &str, statuses: &[&str]) -> Value {
    for _ in 0..300 {
        let (status, b) = get(base, KEY, &format!("/v1/batches/{id}")).await;
        assert_eq!(status, 200, "{b}");
        if statuses.contains(&b["status"].as_str().unwrap_or_default()) {
            return b;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("batch {id} never reached {statuses:?}");
}

fn lines_of(text: &str) -> Vec<Value> {
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[tokio::test]
async fn batches_run_billed_at_batch_prices_and_stay_in_their_org() {
    let mock = MockOpenAi::start().await;
    let dir = temp_dir("batches");
    let config = format!(
        "[server]\nservice_token = \"relay-test-service-token\"\nhttp_listen = \"127.0.0.1:0\"\ngrpc_listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [database]\nurl = \"sqlite://{}\"\n{}{}{}\
         [[routing.models]]\nname = \"priced\"\ndeployments = [{{ provider = \"mock\", model = \"gpt-mock-upstream\", \
         price = {{ input_per_mtok_micros = 1000000, output_per_mtok_micros = 1000000 }} }}]\n",
        dir.join("relay.db").display(),
        auth_section(),
        other_org_key(),
        crate::upstream_sections(&mock)
    );
    let relay = RelayProc::start(&dir, "relay", &config).await;
    let base = relay.http();
    let billing = client::billing_client(&relay.grpc());

    // Upload: a bad batch file is refused at once; a good one is listed for its org only.
    let (status, e) = upload(&base, KEY, "batch", "bad.jsonl", "{\"custom_id\": 1}").await;
    assert_eq!(status, 400, "{e}");
    let mut lines: Vec<(String, &str, &str)> =
        (0..3).map(|i| (format!("req-{i}"), "priced", ["alpha one", "beta two", "gamma three"][i])).collect();
    lines.push(("req-missing".into(), "no-such-model", "lost"));
    let (status, file) = upload(&base, KEY, "batch", "in.jsonl", &jsonl(&lines)).await;
    assert_eq!(status, 200, "{file}");
    let file_id = file["id"].as_str().unwrap().to_owned();
    assert_eq!((file["object"].as_str(), file["purpose"].as_str()), (Some("file"), Some("batch")));
    let (_, listed) = get(&base, KEY, "/v1/files").await;
    assert!(listed["data"].as_array().unwrap().iter().any(|f| f["id"] == file_id.as_str()), "{listed}");
    let (status, content) =
        client::send(reqwest::Method::GET, &base, KEY, &format!("/v1/files/{file_id}/content"), None).await;
    assert_eq!((status, content), (200, jsonl(&lines)));

    // The batch runs: three answers in the output file, the unknown model's 404 in the error file.
    let create = json!({"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h",
        "metadata": {"job": "nightly"}});
    let (status, batch) = post(&base, KEY, "/v1/batches", create.clone()).await;
    assert_eq!(status, 200, "{batch}");
    let batch_id = batch["id"].as_str().unwrap().to_owned();
    assert_eq!(
        (batch["status"].as_str(), batch["request_counts"]["total"].as_u64()),
        (Some("in_progress"), Some(4))
    );
    let done = settled(&base, &batch_id, &["completed"]).await;
    assert_eq!(done["request_counts"], json!({"total": 4, "completed": 3, "failed": 1}), "{done}");
    assert_eq!(done["metadata"]["job"], "nightly");
    let (_, out) = client::send(
        reqwest::Method::GET,
        &base,
        KEY,
        &format!("/v1/files/{}/content", done["output_file_id"].as_str().unwrap()),
        None,
    )
    .await;
    let out = lines_of(&out);
    assert_eq!(out.len(), 3);
    for line in &out {
        let i: usize = line["custom_id"].as_str().unwrap()[4..].parse().unwrap();
        assert_eq!(line["response"]["status_code"], 200);
        let text = lines[i].2;
        assert_eq!(
            line["response"]["body"]["choices"][0]["message"]["content"],
            relay_test_support::echo(text)
        );
        // Billed at batch prices: half the deployment's price, rounded up.
        let ev = client::recorded_usage(&billing, line["response"]["request_id"].as_str().unwrap()).await;
        assert_eq!(ev.batch_id, batch_id);
        let (prompt, completion) = client::mock_usage(text);
        assert_eq!(ev.cost.as_ref().unwrap().micros, ((prompt + completion) as i64 + 1) / 2, "{ev:?}");
    }
    let (_, errors) = client::send(
        reqwest::Method::GET,
        &base,
        KEY,
        &format!("/v1/files/{}/content", done["error_file_id"].as_str().unwrap()),
        None,
    )
    .await;
    let errors = lines_of(&errors);
    assert_eq!((errors.len(), errors[0]["custom_id"].as_str()), (1, Some("req-missing")));
    assert_eq!(errors[0]["response"]["status_code"], 404);
    assert!(mock.requests_containing("lost").is_empty());

    // A cancel stops a batch between lines; what was answered is kept.
    let slow: Vec<(String, &str, &str)> =
        (0..8).map(|i| (format!("slow-{i}"), "priced", "wait [[mock delay_ms=1500]]")).collect();
    let (_, slow_file) = upload(&base, KEY, "batch", "slow.jsonl", &jsonl(&slow)).await;
    let (_, slow_batch) = post(&base, KEY, "/v1/batches", json!({"input_file_id": slow_file["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"})).await;
    let slow_id = slow_batch["id"].as_str().unwrap().to_owned();
    let (status, cancelling) = post(&base, KEY, &format!("/v1/batches/{slow_id}/cancel"), json!({})).await;
    assert_eq!((status, cancelling["status"].as_str()), (200, Some("cancelling")), "{cancelling}");
    let cancelled = settled(&base, &slow_id, &["cancelled"]).await;
    assert!(cancelled["request_counts"]["completed"].as_u64().unwrap() < 8, "{cancelled}");
    assert_eq!(
        post(&base, KEY, &format!("/v1/batches/{slow_id}/cancel"), json!({})).await.0,
        400,
        "already cancelled"
    );

    // Another org: nothing of ours exists for it, whatever it asks.
    let ours = [
        format!("/v1/files/{file_id}"),
        format!("/v1/files/{file_id}/content"),
        format!("/v1/batches/{batch_id}"),
    ];
    for path in &ours {
        assert_eq!(get(&base, OTHER_KEY, path).await.0, 404, "GET {path}");
    }
    assert_eq!(client::send(reqwest::Method::DELETE, &base, OTHER_KEY, &ours[0], None).await.0, 404);
    assert_eq!(post(&base, OTHER_KEY, &format!("/v1/batches/{batch_id}/cancel"), json!({})).await.0, 404);
    let (status, e) = post(&base, OTHER_KEY, "/v1/batches", create).await;
    assert_eq!((status, e["error"]["param"].as_str()), (400, Some("input_file_id")), "{e}");
    let (_, files) = get(&base, OTHER_KEY, "/v1/files").await;
    assert_eq!(files["data"], json!([]), "{files}");
    let (_, batches) = get(&base, OTHER_KEY, "/v1/batches").await;
    assert_eq!(batches["data"], json!([]), "{batches}");
    let (_, mine) = get(&base, KEY, "/v1/batches").await;
    assert_eq!(mine["data"].as_array().unwrap().len(), 2, "{mine}");

    // Zero-retention keys keep nothing; the owner can delete.
    assert_eq!(upload(&base, ZR_KEY, "batch", "z.jsonl", &jsonl(&lines)).await.0, 400);
    let (status, _) = client::send(reqwest::Method::DELETE, &base, KEY, &ours[0], None).await;
    assert_eq!(status, 200);
    assert_eq!(get(&base, KEY, &ours[0]).await.0, 404);
    relay.stop().await;
}
