//! `relay orgs|teams|keys ...`: the admin API from the command line. Talks HTTP to a running Relay's admin
//! listener (`--admin-url`, `$RELAY_ADMIN_URL`, else `server.admin_listen` from the config) with the admin
//! token (`$RELAY_ADMIN_TOKEN`, else `auth.admin_token`), so changes reach every edge at once.

use std::collections::HashMap;

use serde_json::{Map, Value, json};

use crate::config::Config;

pub const USAGE: &str = "  \
  orgs  create --name N [--id I] [limits]    orgs  list | show ID | disable ID | enable ID
  teams create --org O --name N [--id I] [limits]    teams list --org O | show ID | disable ID | enable ID
  keys  create --team T [--name N] [--models a,b] [--ips 10.0.0.0/8,...] [--regions eu,...] [--strategy S] [--zero-retention true] [--cache-ttl-secs N] [--expires-at-ms MS] [limits]
  keys  list [--team T] [--org O] | show ID | revoke ID | disable ID | enable ID
  limits: --rpm N --tpm N --max-concurrent N --budget-micros N --budget-period daily|monthly|total|prepaid
  (--admin-url URL, or $RELAY_ADMIN_URL; token from $RELAY_ADMIN_TOKEN or auth.admin_token)";

struct Request {
    method: reqwest::Method,
    path: String,
    body: Option<Value>,
}

fn flags(args: &[String]) -> Result<(Vec<String>, HashMap<String, String>), String> {
    let (mut positional, mut named) = (Vec::new(), HashMap::new());
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if let Some(name) = a.strip_prefix("--") {
            let v = it.next().ok_or_else(|| format!("--{name} needs a value"))?;
            named.insert(name.to_owned(), v.clone());
        } else {
            positional.push(a.clone());
        }
    }
    Ok((positional, named))
}

fn policy(named: &HashMap<String, String>, body: &mut Map<String, Value>) -> Result<(), String> {
    for (flag, field) in [
        ("rpm", "rpm"),
        ("tpm", "tpm"),
        ("max-concurrent", "max_concurrent"),
        ("budget-micros", "budget_micros"),
    ] {
        if let Some(v) = named.get(flag) {
            let n: i64 = v.parse().map_err(|_| format!("--{flag} must be an integer"))?;
            body.insert(field.into(), json!(n));
        }
    }
    if let Some(p) = named.get("budget-period") {
        body.insert("budget_period".into(), json!(p));
    }
    Ok(())
}

fn list(v: Option<&String>) -> Value {
    json!(
        v.map(|s| s.split(',').map(str::trim).filter(|s| !s.is_empty()).collect::<Vec<_>>())
            .unwrap_or_default()
    )
}

const LIMITS: [&str; 5] = ["rpm", "tpm", "max-concurrent", "budget-micros", "budget-period"];

/// The flags and positional arguments (after the verb) each command takes; anything else is an error,
/// never silently ignored.
fn accepted(kind: &str, verb: &str) -> Option<(Vec<&'static str>, usize)> {
    let with_limits = |mut v: Vec<&'static str>| {
        v.extend(LIMITS);
        v
    };
    Some(match (kind, verb) {
        (_, "show" | "disable" | "enable") | ("keys", "revoke") => (vec![], 1),
        ("orgs", "list") => (vec![], 0),
        ("teams", "list") => (vec!["org"], 0),
        ("keys", "list") => (vec!["team", "org"], 0),
        ("orgs", "create") => (with_limits(vec!["name", "id"]), 0),
        ("teams", "create") => (with_limits(vec!["org", "name", "id"]), 0),
        ("keys", "create") => (
            with_limits(vec![
                "team",
                "name",
                "models",
                "ips",
                "regions",
                "strategy",
                "zero-retention",
                "cache-ttl-secs",
                "expires-at-ms",
            ]),
            0,
        ),
        _ => return None,
    })
}

fn request(kind: &str, args: &[String]) -> Result<Request, String> {
    let (pos, named) = flags(args)?;
    let verb = pos.first().map(String::as_str).ok_or("missing action")?;
    let (known, positional) =
        accepted(kind, verb).ok_or_else(|| format!("unknown command: {kind} {verb}"))?;
    let mut unknown: Vec<String> =
        named.keys().filter(|f| !known.contains(&f.as_str())).map(|f| format!("--{f}")).collect();
    unknown.sort();
    if !unknown.is_empty() {
        return Err(format!("{kind} {verb}: unknown option {}", unknown.join(", ")));
    }
    if pos.len() > 1 + positional {
        return Err(format!("{kind} {verb}: unexpected argument `{}`", pos[1 + positional]));
    }
    let id = || pos.get(1).cloned().ok_or_else(|| format!("{kind} {verb} needs an id"));
    let need = |name: &str| named.get(name).cloned().ok_or_else(|| format!("{kind} {verb} needs --{name}"));
    let get = |path: String| Request { method: reqwest::Method::GET, path, body: None };
    let post = |path: String, body: Option<Value>| Request { method: reqwest::Method::POST, path, body };
    let base = match kind {
        "orgs" => "/admin/v1/orgs",
        "teams" => "/admin/v1/teams",
        _ => "/admin/v1/keys",
    };
    Ok(match (kind, verb) {
        (_, "show") => get(format!("{base}/{}", id()?)),
        (_, "disable" | "enable") => post(format!("{base}/{}/{verb}", id()?), None),
        ("keys", "revoke") => post(format!("{base}/{}/revoke", id()?), None),
        ("orgs", "list") => get(base.into()),
        ("teams", "list") => get(format!("/admin/v1/orgs/{}/teams", need("org")?)),
        ("keys", "list") => {
            let mut q = Vec::new();
            for f in ["team", "org"] {
                if let Some(v) = named.get(f) {
                    q.push(format!("{f}_id={v}"));
                }
            }
            get(if q.is_empty() { base.into() } else { format!("{base}?{}", q.join("&")) })
        }
        ("orgs" | "teams", "create") => {
            let mut body = Map::new();
            body.insert("name".into(), json!(need("name")?));
            if let Some(i) = named.get("id") {
                body.insert("id".into(), json!(i));
            }
            policy(&named, &mut body)?;
            let path = if kind == "orgs" {
                base.to_owned()
            } else {
                format!("/admin/v1/orgs/{}/teams", need("org")?)
            };
            post(path, Some(Value::Object(body)))
        }
        ("keys", "create") => {
            let mut body = Map::new();
            body.insert("team_id".into(), json!(need("team")?));
            body.insert("name".into(), json!(named.get("name").cloned().unwrap_or_default()));
            body.insert("allowed_models".into(), list(named.get("models")));
            body.insert("ip_allowlist".into(), list(named.get("ips")));
            body.insert("allowed_regions".into(), list(named.get("regions")));
            if let Some(s) = named.get("strategy") {
                body.insert("routing_strategy".into(), json!(s));
            }
            if let Some(z) = named.get("zero-retention") {
                let z = z.parse::<bool>().map_err(|_| "--zero-retention must be true or false")?;
                body.insert("zero_retention".into(), json!(z));
            }
            if let Some(t) = named.get("cache-ttl-secs") {
                let t = t.parse::<u32>().map_err(|_| "--cache-ttl-secs must be a whole number of seconds")?;
                body.insert("response_cache_ttl_secs".into(), json!(t));
            }
            if let Some(e) = named.get("expires-at-ms") {
                body.insert(
                    "expires_at_ms".into(),
                    json!(e.parse::<i64>().map_err(|_| "--expires-at-ms must be an integer")?),
                );
            }
            policy(&named, &mut body)?;
            post(base.into(), Some(Value::Object(body)))
        }
        _ => return Err(format!("unknown command: {kind} {verb}")),
    })
}

/// Runs `relay <kind> ...`; returns the exit code.
pub fn run(
    kind: &str,
    args: &[String],
    cfg: &Config,
    env: &HashMap<String, String>,
    admin_url: Option<String>,
) -> i32 {
    let req = match request(kind, args) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("relay: {e}\n{USAGE}");
            return crate::cli::EXIT_CONFIG;
        }
    };
    let url = admin_url
        .or_else(|| env.get("RELAY_ADMIN_URL").cloned())
        .unwrap_or_else(|| format!("http://{}", cfg.server.admin_listen));
    let token = env
        .get("RELAY_ADMIN_TOKEN")
        .cloned()
        .or_else(|| cfg.auth.admin_token.as_ref().map(|t| t.expose().to_owned()));
    let Some(token) = token else {
        eprintln!("relay: no admin token: set RELAY_ADMIN_TOKEN or auth.admin_token");
        return crate::cli::EXIT_CONFIG;
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let outcome = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
        .and_then(|rt| {
            rt.block_on(async {
                let mut b = reqwest::Client::new()
                    .request(req.method, format!("{}{}", url.trim_end_matches('/'), req.path))
                    .bearer_auth(token);
                if let Some(body) = req.body {
                    b = b.json(&body);
                }
                let resp = b.send().await.map_err(|e| format!("cannot reach the admin API at {url}: {e}"))?;
                let status = resp.status();
                let text = resp.text().await.unwrap_or_default();
                Ok::<_, String>((status, text))
            })
        });
    match outcome {
        Ok((status, text)) => {
            let pretty = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| serde_json::to_string_pretty(&v).ok())
                .unwrap_or(text);
            if status.is_success() {
                println!("{pretty}");
                0
            } else {
                eprintln!("relay: admin API answered {status}:\n{pretty}");
                1
            }
        }
        Err(e) => {
            eprintln!("relay: {e}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn commands_become_admin_requests() {
        let r = request("keys", &args("create --team t1 --models gpt-4o*,o3 --rpm 60 --budget-micros 5000000 --budget-period monthly")).unwrap();
        assert_eq!((r.method, r.path.as_str()), (reqwest::Method::POST, "/admin/v1/keys"));
        let b = r.body.unwrap();
        assert_eq!(b["team_id"], "t1");
        assert_eq!(b["allowed_models"], json!(["gpt-4o*", "o3"]));
        assert_eq!((b["rpm"].as_i64(), b["budget_micros"].as_i64()), (Some(60), Some(5_000_000)));
        assert_eq!(request("keys", &args("revoke abc")).unwrap().path, "/admin/v1/keys/abc/revoke");
        assert_eq!(
            request("teams", &args("create --org o1 --name eng")).unwrap().path,
            "/admin/v1/orgs/o1/teams"
        );
        assert_eq!(request("keys", &args("list --team t1")).unwrap().path, "/admin/v1/keys?team_id=t1");
        assert!(request("keys", &args("create --name x")).is_err(), "team is required");
        assert!(request("orgs", &args("explode x")).is_err());
        assert!(request("keys", &args("create --team t --rpm many")).is_err());
        // A mistyped option is an error, never silently dropped (a key created without its budget).
        let e = request("keys", &args("create --team t --budget 5000000")).err().unwrap();
        assert!(e.contains("unknown option --budget"), "{e}");
        assert!(request("orgs", &args("list --team t")).is_err());
        assert!(request("keys", &args("show a b")).is_err(), "one id only");
    }
}
