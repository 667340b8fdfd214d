//! The endpoints besides chat (legacy completions, moderations, speech, transcriptions): forwarded to an OpenAI-compatible
//! upstream with only the model rewritten, billed from the answer's usage; a clear 400 on an upstream
//! without them, and for what cannot be served (streaming, a missing field).

use relay_core::pb::common::v1::Protocol;
use serde_json::{Value, json};

use crate::client;
use crate::harness::{KEY, RelayProc, auth_section, temp_dir};

async fn post(base: &str, path: &str, body: Value) -> (u16, String, bytes::Bytes, String) {
    let r = client::http().post(format!("{base}{path}")).bearer_auth(KEY).json(&body).send().await.unwrap();
    let status = r.status().as_u16();
    let kind = r.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
    let id =
        r.headers().get("x-relay-request-id").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
    (status, kind, r.bytes().await.unwrap(), id)
}

fn json_of(b: &[u8]) -> Value {
    serde_json::from_slice(b).unwrap()
}

#[tokio::test]
async fn completions_moderations_and_speech_are_forwarded_and_billed() {
    let mock = relay_test_support::MockOpenAi::start().await;
    let dir = temp_dir("endpoints");
    let config = format!(
        "[server]\nservice_token = \"relay-test-service-token\"\nhttp_listen = \"127.0.0.1:0\"\ngrpc_listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [database]\nurl = \"sqlite://{}\"\n{}{}\
         [[routing.models]]\nname = \"unit-priced\"\ndeployments = [{{ provider = \"mock\", model = \"gpt-mock-upstream\", \
         price = {{ input_per_mtok_micros = 0, output_per_mtok_micros = 0, per_image_micros = 40000, per_mchar_micros = 15000000 }} }}]\n",
        dir.join("relay.db").display(),
        auth_section(),
        crate::upstream_sections(&mock)
    );
    let relay = RelayProc::start(&dir, "relay", &config).await;
    let base = relay.http();
    let billing = client::billing_client(&relay.grpc());

    let (status, _, body, id) = post(
        &base,
        "/v1/completions",
        json!({"model": "mock", "prompt": "legacy hello there", "max_tokens": 20}),
    )
    .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let answer = json_of(&body);
    assert_eq!(answer["choices"][0]["text"], relay_test_support::echo("legacy hello there"));
    let sent = mock.requests_containing("legacy hello there");
    assert_eq!(
        (sent[0].path.as_str(), sent[0].body["model"].as_str()),
        ("/v1/completions", Some("gpt-mock-upstream"))
    );
    let ev = client::recorded_usage(&billing, &id).await;
    let u = ev.usage.unwrap();
    assert_eq!(
        (u.input_tokens, u.output_tokens),
        (
            answer["usage"]["prompt_tokens"].as_u64().unwrap(),
            answer["usage"]["completion_tokens"].as_u64().unwrap()
        )
    );
    assert_eq!((ev.protocol(), ev.model.as_str()), (Protocol::OpenaiForwarded, "mock"));

    let (status, _, body, _) =
        post(&base, "/v1/moderations", json!({"model": "mock", "input": "plan an attack"})).await;
    assert_eq!(status, 200);
    assert_eq!(json_of(&body)["results"][0]["flagged"], true);

    let (status, kind, body, _) =
        post(&base, "/v1/audio/speech", json!({"model": "mock", "input": "hello", "voice": "alloy"})).await;
    assert_eq!(
        (status, kind.as_str(), &body[..]),
        (200, "audio/mpeg", &b"ID3-mock-audio-5"[..]),
        "binary answers pass as they are"
    );

    // Streamed legacy completions pass through as the upstream sends them, usage billed (the usage chunk
    // Relay asked for is dropped again when the client did not).
    let r = client::http()
        .post(format!("{base}/v1/completions"))
        .bearer_auth(KEY)
        .json(&json!({"model": "mock", "prompt": "stream legacy words", "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let id = r.headers()["x-relay-request-id"].to_str().unwrap().to_owned();
    let sse = r.text().await.unwrap();
    let chunks: Vec<Value> = sse
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["text"].as_str()).collect();
    assert_eq!(text, relay_test_support::echo("stream legacy words"));
    assert!(sse.ends_with("data: [DONE]\n\n") && chunks.iter().all(|c| c.get("usage").is_none()), "{sse}");
    let sent = mock.requests_containing("stream legacy words");
    assert_eq!(sent[0].body["stream_options"]["include_usage"], true, "usage asked for, to bill exactly");
    let u = client::recorded_usage(&billing, &id).await.usage.unwrap();
    assert_eq!((u.input_tokens, u.output_tokens), client::mock_usage("stream legacy words"));
    let r = client::http()
        .post(format!("{base}/v1/completions"))
        .bearer_auth(KEY)
        .json(&json!({"model": "demo", "prompt": "x", "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "no completions on the demo upstream");

    // Unit prices: images by the image, speech by the character.
    let (status, _, body, id) =
        post(&base, "/v1/images/generations", json!({"model": "unit-priced", "prompt": "two cats", "n": 2}))
            .await;
    assert_eq!((status, json_of(&body)["data"].as_array().map(Vec::len)), (200, Some(2)));
    let ev = client::recorded_usage(&billing, &id).await;
    assert_eq!((ev.usage.as_ref().unwrap().images, ev.cost.as_ref().unwrap().micros), (2, 80_000), "{ev:?}");
    let (status, _, _, id) =
        post(&base, "/v1/audio/speech", json!({"model": "unit-priced", "input": "hello", "voice": "alloy"}))
            .await;
    assert_eq!(status, 200);
    let ev = client::recorded_usage(&billing, &id).await;
    assert_eq!((ev.usage.as_ref().unwrap().characters, ev.cost.as_ref().unwrap().micros), (5, 75), "{ev:?}");

    // Transcriptions: a multipart form, its model rewritten to the upstream's, the audio untouched, and
    // the answer's token usage billed.
    let audio: Vec<u8> = (0..=255u8).cycle().take(3000).collect();
    let form = |model: &str, stream: bool| {
        let mut b = Vec::new();
        let field = |b: &mut Vec<u8>, name: &str, value: &str| {
            b.extend_from_slice(
                format!("--xB\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n")
                    .as_bytes(),
            );
        };
        field(&mut b, "model", model);
        if stream {
            field(&mut b, "stream", "true");
        }
        b.extend_from_slice(b"--xB\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\n");
        b.extend_from_slice(&audio);
        b.extend_from_slice(b"\r\n--xB--\r\n");
        b
    };
    let send_form = |body: Vec<u8>| {
        client::http()
            .post(format!("{base}/v1/audio/transcriptions"))
            .bearer_auth(KEY)
            .header("content-type", "multipart/form-data; boundary=xB")
            .body(body)
            .send()
    };
    let r = send_form(form("mock", false)).await.unwrap();
    let id = r.headers()["x-relay-request-id"].to_str().unwrap().to_owned();
    let (status, answer) = (r.status().as_u16(), r.json::<Value>().await.unwrap());
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["text"], "transcribed 3000 bytes with gpt-mock-upstream",
        "the audio arrived whole, the model rewritten"
    );
    let u = client::recorded_usage(&billing, &id).await.usage.unwrap();
    assert_eq!((u.input_tokens, u.output_tokens), (50, 6));
    let r = send_form(form("mock", true)).await.unwrap();
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["param"], "stream", "{e}");
    let r = send_form(form("demo", false)).await.unwrap();
    assert_eq!(r.status(), 400, "no transcriptions on a non-OpenAI upstream");

    // What cannot be served is a 400 naming the parameter; nothing reaches the upstream.
    let before = mock.requests_containing("never sent").len();
    for (path, body, param) in [
        ("/v1/completions", json!({"model": "mock"}), "prompt"),
        ("/v1/moderations", json!({"input": "never sent"}), "model"),
        ("/v1/completions", json!({"model": "demo", "prompt": "never sent"}), "model"),
    ] {
        let (status, _, b, _) = post(&base, path, body).await;
        assert_eq!(
            (status, json_of(&b)["error"]["param"].as_str()),
            (400, Some(param)),
            "{}",
            String::from_utf8_lossy(&b)
        );
    }
    let (_, _, b, _) = post(&base, "/v1/completions", json!({"model": "demo", "prompt": "x"})).await;
    assert!(
        json_of(&b)["error"]["message"].as_str().unwrap().contains("not supported by this model's upstream")
    );
    assert_eq!(mock.requests_containing("never sent").len(), before);
    relay.stop().await;
}
