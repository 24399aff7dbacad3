//! docker-compose.yml is what people put on a server, so it is read here as Compose reads it
//! (YAML, with its merge keys): only the proxy is published on all interfaces, Postgres and Redis
//! need passwords from the environment (documented in .env.example) and the apps use them, the
//! apps believe `X-Forwarded-For` from the proxy alone, and the proxy keeps `/admin` and
//! `/metrics` inside (Prometheus scrapes the instances on the compose network).

use std::net::IpAddr;

use ipnet::IpNet;
use nestling::config::Settings;
use serde_json::Value;

fn read(path: &str) -> String {
    let full = format!("{}/{path}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&full).unwrap_or_else(|err| panic!("{full}: {err}"))
}

/// A YAML file as JSON, merge keys (`<<: *app`) applied.
fn yaml(path: &str) -> Value {
    let mut value: serde_yaml_ng::Value = serde_yaml_ng::from_str(&read(path)).expect(path);
    value.apply_merge().expect(path);
    serde_json::to_value(value).expect(path)
}

fn services(compose: &Value) -> Vec<(&str, &Value)> {
    let services = compose["services"].as_object().expect("services");
    services
        .iter()
        .map(|(name, service)| (name.as_str(), service))
        .collect()
}

/// The instances of the app that serve HTTP: the services built from this repository that run
/// the image's command (the worker runs `nestling worker`).
fn apps(compose: &Value) -> Vec<(&str, &Value)> {
    let apps: Vec<_> = services(compose)
        .into_iter()
        .filter(|(_, service)| !service["build"].is_null() && service["command"].is_null())
        .collect();
    assert!(apps.len() >= 2, "two instances of the app");
    apps
}

fn env<'a>(service: &'a Value, name: &str, variable: &str) -> &'a str {
    service["environment"][variable]
        .as_str()
        .unwrap_or_else(|| panic!("{name}: no {variable} in its environment"))
}

/// The host address a published port listens on (`None`: every interface).
fn host_address(port: &Value) -> Option<String> {
    match port {
        Value::Object(long) => long.get("host_ip").and_then(Value::as_str).map(str::to_owned),
        Value::String(short) => {
            // [HOST:]HOST_PORT:CONTAINER_PORT[/PROTOCOL], HOST possibly [IPv6].
            if let Some(rest) = short.strip_prefix('[') {
                return rest.split_once(']').map(|(host, _)| host.to_owned());
            }
            let parts: Vec<&str> = short.split(':').collect();
            (parts.len() == 3).then(|| parts[0].to_owned())
        }
        // A bare container port: a random host port on every interface.
        _ => None,
    }
}

#[test]
fn only_the_proxy_is_published_on_all_interfaces() {
    let compose = yaml("docker-compose.yml");
    let mut proxy_ports = 0;
    for (name, service) in services(&compose) {
        assert_ne!(
            service["network_mode"], "host",
            "{name}: host networking publishes every port"
        );
        for port in service["ports"].as_array().into_iter().flatten() {
            let host = host_address(port);
            if name == "proxy" {
                proxy_ports += 1;
                continue;
            }
            let loopback = host
                .as_deref()
                .and_then(|host| host.parse::<IpAddr>().ok())
                .is_some_and(|ip| ip.is_loopback());
            assert!(
                loopback,
                "{name} publishes {port} on {}: only the proxy may be reachable from outside \
                 (bind it to 127.0.0.1, or publish nothing)",
                host.as_deref().unwrap_or("every interface")
            );
        }
    }
    assert!(proxy_ports > 0, "the proxy is the one way in");
}

#[test]
fn redis_requires_a_password_from_the_environment_and_the_apps_send_it() {
    let compose = yaml("docker-compose.yml");
    let redis = &compose["services"]["redis"];
    let command: Vec<&str> = match &redis["command"] {
        Value::Array(items) => items.iter().filter_map(Value::as_str).collect(),
        Value::String(line) => line.split_whitespace().collect(),
        other => panic!("redis: command {other}"),
    };
    let password = command
        .iter()
        .position(|arg| *arg == "--requirepass")
        .and_then(|at| command.get(at + 1))
        .unwrap_or_else(|| panic!("redis runs without --requirepass: {command:?}"));
    assert!(
        password.starts_with("${REDIS_PASSWORD:?"),
        "the Redis password is required from the environment, not written here: {password}"
    );
    let healthcheck = redis["healthcheck"]["test"].to_string();
    let authenticates = redis["environment"]["REDISCLI_AUTH"]
        .as_str()
        .is_some_and(|auth| auth.starts_with("${REDIS_PASSWORD"))
        || healthcheck.contains("REDIS_PASSWORD");
    assert!(authenticates, "the health check must authenticate: {healthcheck}");
    for (name, app) in apps(&compose) {
        let url = env(app, name, "REDIS_URL");
        assert!(
            url.starts_with("redis://:${REDIS_PASSWORD") && url.ends_with("@redis:6379"),
            "{name}: REDIS_URL must carry the password: {url}"
        );
    }
}

#[test]
fn postgres_takes_its_password_from_the_environment_and_the_apps_send_it() {
    let compose = yaml("docker-compose.yml");
    let postgres = &compose["services"]["postgres"];
    let password = env(postgres, "postgres", "POSTGRES_PASSWORD");
    assert!(
        password.starts_with("${POSTGRES_PASSWORD:?"),
        "the Postgres password is required from the environment, not written here: {password}"
    );
    for (name, app) in apps(&compose) {
        let url = env(app, name, "DATABASE_URL");
        assert!(
            url.starts_with("postgres://postgres:${POSTGRES_PASSWORD") && url.contains("@postgres:5432/"),
            "{name}: DATABASE_URL must carry the password: {url}"
        );
    }
}

#[test]
fn the_apps_believe_x_forwarded_for_from_the_proxy_alone() {
    let compose = yaml("docker-compose.yml");
    let proxy = &compose["services"]["proxy"];
    let networks = proxy["networks"].as_object().expect("the proxy names its network");
    let (network, settings) = networks.iter().next().expect("one network");
    let address: IpAddr = settings["ipv4_address"]
        .as_str()
        .and_then(|address| address.parse().ok())
        .expect("the proxy has a fixed address, for TRUST_PROXY");
    let subnet: IpNet = compose["networks"][network]["ipam"]["config"][0]["subnet"]
        .as_str()
        .and_then(|subnet| subnet.parse().ok())
        .unwrap_or_else(|| panic!("network {network} has a fixed subnet"));
    assert!(subnet.contains(&address), "{address} is in {subnet}");
    for (name, app) in apps(&compose) {
        let on_network = match &app["networks"] {
            Value::Null => network == "default",
            Value::Array(names) => names.iter().any(|n| n == network.as_str()),
            Value::Object(names) => names.contains_key(network),
            other => panic!("{name}: networks {other}"),
        };
        assert!(on_network, "{name} is on the proxy's network {network}");
        let trust_proxy = env(app, name, "TRUST_PROXY").to_owned();
        let settings = Settings::from_lookup(|variable| (variable == "TRUST_PROXY").then(|| trust_proxy.clone()))
            .unwrap_or_else(|err| panic!("{name}: {err}"));
        assert_eq!(
            settings.rate_limit.trust_proxy,
            [IpNet::from(address)],
            "{name}: TRUST_PROXY is the proxy's address alone ({trust_proxy})"
        );
    }
}

#[test]
fn every_variable_compose_requires_is_documented_in_the_env_example() {
    let compose = read("docker-compose.yml");
    let example = read(".env.example");
    let required: Vec<&str> = compose
        .split("${")
        .skip(1)
        .filter_map(|rest| rest.split_once(":?").map(|(name, _)| name))
        .filter(|name| name.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
        .collect();
    assert!(required.contains(&"REDIS_PASSWORD") && required.contains(&"POSTGRES_PASSWORD"));
    for name in required {
        let documented = example
            .lines()
            .any(|line| line.trim_start_matches(['#', ' ']).starts_with(&format!("{name}=")));
        assert!(
            documented,
            "{name} is required by docker-compose.yml: say so in .env.example"
        );
    }
}

/// `location` blocks of an nginx configuration: (modifier and path, body).
fn locations(conf: &str) -> Vec<(String, String)> {
    let mut found = Vec::new();
    let mut rest = conf;
    while let Some(at) = rest.find("location ") {
        rest = &rest[at + "location ".len()..];
        let Some(open) = rest.find('{') else { break };
        let head = rest[..open].trim().to_owned();
        let mut depth = 0;
        let mut close = rest.len();
        for (i, c) in rest[open..].char_indices() {
            depth += match c {
                '{' => 1,
                '}' => -1,
                _ => 0,
            };
            if depth == 0 {
                close = open + i;
                break;
            }
        }
        found.push((head, rest[open + 1..close].to_owned()));
        rest = &rest[close..];
    }
    found
}

#[test]
fn the_proxy_keeps_admin_and_metrics_inside_where_prometheus_scrapes_every_instance() {
    let conf = read("docs/compose/nginx.conf");
    let conf: String = conf
        .lines()
        .map(|line| line.split('#').next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n");
    let locations = locations(&conf);
    for path in ["/admin", "/metrics"] {
        // `^~`: no regex location can take the request over.
        let refused = locations.iter().any(|(head, body)| {
            head == &format!("^~ {path}")
                && ["return 403", "return 404", "deny all"]
                    .iter()
                    .any(|refusal| body.contains(refusal))
        });
        assert!(
            refused,
            "nginx must refuse {path} (`location ^~ {path} {{ return 404; }}`): {locations:?}"
        );
    }
    // nginx is the edge: what a client wrote in X-Forwarded-For is dropped, not passed on.
    assert!(
        conf.contains("proxy_set_header X-Forwarded-For $remote_addr;"),
        "the proxy sets X-Forwarded-For to the address it got the request from"
    );

    // Inside, Prometheus scrapes each instance on its own port on the compose network.
    let compose = yaml("docker-compose.yml");
    let prometheus = yaml("docs/monitoring/prometheus.yml");
    let apps: Vec<&str> = apps(&compose).into_iter().map(|(name, _)| name).collect();
    let targets = &prometheus["scrape_configs"][0]["static_configs"][0]["targets"];
    let targets: Vec<&str> = targets.as_array().unwrap().iter().filter_map(Value::as_str).collect();
    for target in &targets {
        let (host, port) = target.split_once(':').unwrap();
        assert!(apps.contains(&host), "{target} is an instance of the app");
        assert_eq!(port, "8080", "{target}: the instance's own port, not a published one");
    }
    assert_eq!(targets.len(), apps.len(), "every instance is scraped");
}

#[test]
fn jobs_run_in_the_worker_service_and_not_in_the_web_instances() {
    let compose = yaml("docker-compose.yml");
    let worker = &compose["services"]["worker"];
    assert_eq!(worker["command"], serde_json::json!(["nestling", "worker"]));
    assert_eq!(
        worker["build"],
        serde_json::json!("."),
        "the same image as the instances"
    );
    assert!(worker["ports"].is_null(), "the worker publishes nothing");
    assert_ne!(env(worker, "worker", "JOBS_WORKERS"), "0");
    assert_eq!(
        env(worker, "worker", "APP_MIGRATE_ON_START"),
        "false",
        "the first instance migrates"
    );
    for (name, app) in apps(&compose) {
        assert_eq!(
            env(app, name, "JOBS_WORKERS"),
            "0",
            "{name} leaves the jobs to the worker"
        );
    }
}
