//! The deployment files (`envoy/envoy.yaml`, `docker-compose.yml`, `deploy/otel-collector.yaml`,
//! `Dockerfile`, `.dockerignore`) checked against each other and against the server itself, so
//! that a renamed route, port, variable or service fails here instead of in a deployment.
//! Plain tests: they parse files and start neither the server nor Docker.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use clap::Parser as _;
use crm_server::{
    cli::{Cli, Command},
    config::{Environment, Settings, is_known_variable},
};
use ipnet::IpNet;
use prost::Message as _;
use serde_yaml::{Mapping, Value};

const ENVOY: &str = "envoy/envoy.yaml";
const COMPOSE: &str = "docker-compose.yml";
const COLLECTOR: &str = "deploy/otel-collector.yaml";
const DOCKERFILE: &str = "Dockerfile";
const DOCKERIGNORE: &str = ".dockerignore";

/// `REQUEST_TIMEOUT_SECONDS`' default: Envoy must wait longer, so the server's deadline answers.
const SERVER_DEADLINE_SECONDS: f64 = 30.0;
/// What a `${VAR:?message}` (a variable the operator must set) stands for in these checks.
const REQUIRED_PLACEHOLDER: &str = "placeholder-0123456789abcdef0123456789abcdef";
const HCM: &str = "envoy.filters.network.http_connection_manager";
const UPSTREAM_HTTP_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

/// The REST routes of api.md, one concrete path each (the `{service}` of the legacy route is a
/// bot's name). `/metrics` is ours too, but private: see `PRIVATE_PATHS`.
const REST_PATHS: &[&str] = &[
    "/api/v1/bot1/application",
    "/webhooks/payme",
    "/webhooks/click/prepare",
    "/webhooks/click/complete",
    "/webhooks/uzum/check",
    "/webhooks/uzum/create",
    "/webhooks/uzum/confirm",
    "/webhooks/uzum/reverse",
    "/webhooks/uzum/status",
    "/healthz",
    "/readyz",
];
/// Served by every replica, but only to the internal network.
const PRIVATE_PATHS: &[&str] = &["/metrics"];

// ---- reading files ----------------------------------------------------------------------------

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn read(relative: &str) -> String {
    std::fs::read_to_string(repo_path(relative))
        .unwrap_or_else(|e| panic!("cannot read {relative}: {e}"))
}

/// A YAML file with its anchors expanded and its `<<` merge keys applied.
fn yaml(relative: &str) -> Value {
    let mut doc: Value = serde_yaml::from_str(&read(relative))
        .unwrap_or_else(|e| panic!("{relative} is not valid YAML: {e}"));
    resolve_merge_keys(&mut doc);
    doc
}

/// `<<: *anchor` as YAML defines it; nested merges (an anchor that merges another) included.
fn resolve_merge_keys(value: &mut Value) {
    match value {
        Value::Mapping(map) => {
            while let Some(merged) = map.remove("<<") {
                let sources = match merged {
                    Value::Sequence(list) => list,
                    one => vec![one],
                };
                for source in sources {
                    let Value::Mapping(source) = source else {
                        panic!("`<<` must merge mappings, got {source:?}");
                    };
                    for (key, value) in source {
                        map.entry(key).or_insert(value);
                    }
                }
            }
            map.values_mut().for_each(resolve_merge_keys);
        }
        Value::Sequence(list) => list.iter_mut().for_each(resolve_merge_keys),
        _ => {}
    }
}

fn string(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Null => String::new(),
        other => panic!("expected a scalar, got {other:?}"),
    }
}

fn mapping<'a>(value: &'a Value, what: &str) -> &'a Mapping {
    value
        .as_mapping()
        .unwrap_or_else(|| panic!("{what} must be a mapping, got {value:?}"))
}

fn sequence<'a>(value: &'a Value, what: &str) -> &'a [Value] {
    value
        .as_sequence()
        .unwrap_or_else(|| panic!("{what} must be a list, got {value:?}"))
}

/// Every string in a document, keys included.
fn all_strings(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::String(s) => out.push(s.clone()),
        Value::Mapping(map) => {
            for (key, value) in map {
                all_strings(key, out);
                all_strings(value, out);
            }
        }
        Value::Sequence(list) => list.iter().for_each(|v| all_strings(v, out)),
        Value::Tagged(tagged) => all_strings(&tagged.value, out),
        _ => {}
    }
}

/// Every value stored under `key`, anywhere in a document.
fn values_of<'a>(value: &'a Value, key: &str, out: &mut Vec<&'a Value>) {
    match value {
        Value::Mapping(map) => {
            for (k, v) in map {
                if k.as_str() == Some(key) {
                    out.push(v);
                }
                values_of(v, key, out);
            }
        }
        Value::Sequence(list) => list.iter().for_each(|v| values_of(v, key, out)),
        _ => {}
    }
}

/// A protobuf `Duration` in YAML form, such as `35s` or `0.5s`.
fn seconds(value: &Value, what: &str) -> f64 {
    value
        .as_str()
        .and_then(|s| s.strip_suffix('s'))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{what} must be a duration like \"35s\", got {value:?}"))
}

// ---- the server's own routes ------------------------------------------------------------------

struct GrpcMethod {
    /// `/package.Service/Method`, the HTTP/2 path.
    path: String,
    /// A long-lived server stream of our API (not a short bidirectional exchange).
    watch_stream: bool,
}

/// Every gRPC method the server serves, read from the descriptors it serves them with.
fn grpc_methods() -> Vec<GrpcMethod> {
    let sets = [
        crm_server::proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
    ];
    let mut methods = Vec::new();
    for encoded in sets {
        let set = prost_types::FileDescriptorSet::decode(encoded).expect("descriptor set");
        for file in set.file {
            let package = file.package();
            // Imports (google.protobuf, google.rpc) serve nothing.
            if !(package.starts_with("crm.") || package.starts_with("grpc.")) {
                continue;
            }
            for service in &file.service {
                for method in &service.method {
                    methods.push(GrpcMethod {
                        path: format!("/{package}.{}/{}", service.name(), method.name()),
                        watch_stream: package.starts_with("crm.")
                            && method.server_streaming()
                            && !method.client_streaming(),
                    });
                }
            }
        }
    }
    assert!(
        methods.iter().filter(|m| m.watch_stream).count() >= 2,
        "WatchApplications and WatchPayment are server streams"
    );
    methods
}

/// The gRPC services we serve, by full name (what a gRPC health check may ask about).
fn grpc_services() -> BTreeSet<String> {
    grpc_methods()
        .iter()
        .map(|m| m.path[1..].split('/').next().expect("service").to_owned())
        .collect()
}

/// Every path Envoy must forward: all gRPC methods and the public REST routes.
fn public_paths() -> Vec<String> {
    grpc_methods()
        .into_iter()
        .map(|m| m.path)
        .chain(REST_PATHS.iter().map(|p| (*p).to_owned()))
        .collect()
}

// ---- Envoy ------------------------------------------------------------------------------------

fn envoy() -> Value {
    yaml(ENVOY)
}

/// The `typed_config` of every HTTP connection manager.
fn connection_managers(envoy: &Value) -> Vec<&Value> {
    let mut filters = Vec::new();
    values_of(envoy, "filters", &mut filters);
    let managers: Vec<&Value> = filters
        .into_iter()
        .flat_map(|list| sequence(list, "filters"))
        .filter(|f| f["name"].as_str() == Some(HCM))
        .map(|f| &f["typed_config"])
        .collect();
    assert!(!managers.is_empty(), "{ENVOY} has no {HCM}");
    managers
}

/// The checks assume what the config has: one listener manager, one virtual host for all domains.
fn virtual_host(envoy: &Value) -> &Value {
    let managers = connection_managers(envoy);
    assert_eq!(
        managers.len(),
        1,
        "one HTTP connection manager expected; extend these checks for more"
    );
    let hosts = sequence(
        &managers[0]["route_config"]["virtual_hosts"],
        "virtual_hosts",
    );
    assert_eq!(
        hosts.len(),
        1,
        "one virtual host expected; extend these checks for more"
    );
    let domains: Vec<String> = sequence(&hosts[0]["domains"], "domains")
        .iter()
        .map(string)
        .collect();
    assert_eq!(domains, ["*"], "the virtual host serves every domain");
    &hosts[0]
}

enum Matcher {
    Path(String),
    Prefix(String),
}

struct Route<'a> {
    matcher: Matcher,
    spec: &'a Value,
}

impl Route<'_> {
    fn matches(&self, path: &str) -> bool {
        match &self.matcher {
            Matcher::Path(exact) => path == exact,
            Matcher::Prefix(prefix) => path.starts_with(prefix.as_str()),
        }
    }

    fn name(&self) -> String {
        match &self.matcher {
            Matcher::Path(p) => format!("path {p}"),
            Matcher::Prefix(p) => format!("prefix {p}"),
        }
    }

    /// The `route` action, when the route forwards (rather than answering itself).
    fn forward(&self) -> Option<&Value> {
        self.spec.get("route")
    }

    fn cluster(&self) -> Option<&str> {
        self.forward().map(|action| {
            action["cluster"]
                .as_str()
                .unwrap_or_else(|| panic!("route {} must name one `cluster`", self.name()))
        })
    }

    /// The overall timeout; Envoy's default is 15 s.
    fn timeout(&self) -> f64 {
        self.forward()
            .and_then(|action| action.get("timeout"))
            .map_or(15.0, |t| seconds(t, &format!("timeout of {}", self.name())))
    }
}

/// The routes in Envoy's order (the first match wins). Only `path` and `prefix` matchers are
/// used: a `grpc: {}` or header matcher would silently skip gRPC-web or REST callers.
fn routes(envoy: &Value) -> Vec<Route<'_>> {
    sequence(&virtual_host(envoy)["routes"], "routes")
        .iter()
        .map(|spec| {
            let matcher = mapping(&spec["match"], "a route's match");
            let keys: Vec<String> = matcher.keys().map(string).collect();
            assert_eq!(
                keys.len(),
                1,
                "a route matches by `path` or `prefix` alone, got {keys:?}"
            );
            let matcher = match keys[0].as_str() {
                "path" => Matcher::Path(string(&spec["match"]["path"])),
                "prefix" => Matcher::Prefix(string(&spec["match"]["prefix"])),
                other => panic!("unsupported route matcher {other:?}: use path or prefix"),
            };
            assert!(
                spec.get("route").is_some() || spec.get("direct_response").is_some(),
                "a route forwards (`route`) or answers (`direct_response`): {spec:?}"
            );
            Route { matcher, spec }
        })
        .collect()
}

fn first_route<'a, 'r>(routes: &'r [Route<'a>], path: &str) -> Option<&'r Route<'a>> {
    routes.iter().find(|r| r.matches(path))
}

fn clusters(envoy: &Value) -> BTreeMap<String, &Value> {
    sequence(&envoy["static_resources"]["clusters"], "clusters")
        .iter()
        .map(|c| (string(&c["name"]), c))
        .collect()
}

/// `(host, port)` of every endpoint of a cluster.
fn endpoints(cluster: &Value) -> Vec<(String, u16)> {
    let mut addresses = Vec::new();
    values_of(
        &cluster["load_assignment"],
        "socket_address",
        &mut addresses,
    );
    addresses
        .into_iter()
        .map(|a| {
            let port = a["port_value"].as_u64().expect("port_value");
            (string(&a["address"]), u16::try_from(port).expect("a port"))
        })
        .collect()
}

// ---- docker compose ---------------------------------------------------------------------------

fn compose() -> Value {
    yaml(COMPOSE)
}

fn services(compose: &Value) -> &Mapping {
    mapping(&compose["services"], "services")
}

fn service<'a>(compose: &'a Value, name: &str) -> &'a Value {
    services(compose)
        .get(name)
        .unwrap_or_else(|| panic!("{COMPOSE} has no service {name:?}"))
}

fn has_service(compose: &Value, name: &str) -> bool {
    services(compose).contains_key(name)
}

/// The one service running an image whose name starts with `image`.
fn service_by_image<'a>(compose: &'a Value, image: &str) -> (String, &'a Value) {
    let found: Vec<(String, &Value)> = services(compose)
        .iter()
        .filter(|(_, s)| s["image"].as_str().is_some_and(|i| i.starts_with(image)))
        .map(|(name, s)| (string(name), s))
        .collect();
    assert_eq!(found.len(), 1, "one {image} service expected in {COMPOSE}");
    found.into_iter().next().expect("one")
}

/// A service's `command` as arguments (list form, or a string split on whitespace).
fn command(service: &Value) -> Option<Vec<String>> {
    match service.get("command")? {
        Value::Sequence(args) => Some(args.iter().map(string).collect()),
        Value::String(line) => Some(line.split_whitespace().map(str::to_owned).collect()),
        other => panic!("unexpected command {other:?}"),
    }
}

/// What `crm-server` does when started with `args` (the Dockerfile's ENTRYPOINT is the binary).
fn crm_command(args: &[String]) -> Command {
    let cli = Cli::try_parse_from(std::iter::once("crm-server".to_owned()).chain(args.to_vec()))
        .unwrap_or_else(|e| panic!("`crm-server {}` is not a command: {e}", args.join(" ")));
    cli.command.unwrap_or(Command::Serve)
}

/// Services built from the repository's Dockerfile: the replicas and the `migrate` one-shot.
fn crm_services(compose: &Value) -> Vec<(String, &Value)> {
    let found: Vec<(String, &Value)> = services(compose)
        .iter()
        .filter(|(_, s)| s.get("build").is_some())
        .map(|(name, s)| (string(name), s))
        .collect();
    for (name, s) in &found {
        let build = &s["build"];
        let (context, dockerfile) = match build {
            Value::String(context) => (context.clone(), "Dockerfile".to_owned()),
            _ => (
                string(&build["context"]),
                build
                    .get("dockerfile")
                    .map_or_else(|| "Dockerfile".to_owned(), string),
            ),
        };
        assert_eq!(context, ".", "{name} builds from the repository root");
        assert_eq!(
            dockerfile, DOCKERFILE,
            "{name} builds the repository's Dockerfile"
        );
    }
    found
}

/// The crm services that serve (Envoy's upstreams).
fn replicas(compose: &Value) -> Vec<(String, &Value)> {
    let replicas: Vec<_> = crm_services(compose)
        .into_iter()
        .filter(|(_, s)| matches!(crm_command(&command(s).unwrap_or_default()), Command::Serve))
        .collect();
    assert!(replicas.len() >= 2, "at least two crm-server replicas");
    replicas
}

/// A service's environment as written (values uninterpolated), map or list form.
fn environment(service: &Value) -> BTreeMap<String, String> {
    match service.get("environment") {
        None => BTreeMap::new(),
        Some(Value::Mapping(map)) => map.iter().map(|(k, v)| (string(k), string(v))).collect(),
        Some(Value::Sequence(list)) => list
            .iter()
            .map(|entry| {
                let entry = string(entry);
                match entry.split_once('=') {
                    Some((k, v)) => (k.to_owned(), v.to_owned()),
                    None => (entry, String::new()),
                }
            })
            .collect(),
        Some(other) => panic!("unexpected environment {other:?}"),
    }
}

/// Compose's interpolation: `${VAR:-default}` / `${VAR-default}` give the default,
/// `${VAR:?message}` / `${VAR?message}` a strong placeholder (the operator must set them),
/// `${VAR}` nothing (unset), `$$` a dollar sign.
fn interpolate(raw: &str) -> String {
    let mut out = String::new();
    let mut rest = raw;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(after) = after.strip_prefix('$') {
            out.push('$');
            rest = after;
            continue;
        }
        let body = after
            .strip_prefix('{')
            .unwrap_or_else(|| panic!("write ${{VAR}} rather than $VAR in {raw:?}"));
        let end = body
            .find('}')
            .unwrap_or_else(|| panic!("unclosed ${{ in {raw:?}"));
        let (expression, after) = (&body[..end], &body[end + 1..]);
        let name_end = expression
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(expression.len());
        let modifier = &expression[name_end..];
        assert!(name_end > 0, "empty variable name in {raw:?}");
        let modifier = modifier.strip_prefix(':').unwrap_or(modifier);
        if let Some(default) = modifier.strip_prefix('-') {
            out.push_str(default);
        } else if modifier.starts_with('?') {
            out.push_str(REQUIRED_PLACEHOLDER);
        } else {
            assert!(
                modifier.is_empty(),
                "unsupported ${{{expression}}} in {raw:?}"
            );
        }
        rest = after;
    }
    out.push_str(rest);
    out
}

/// The interpolated environment, as the server would see it.
fn effective_environment(service: &Value) -> HashMap<String, String> {
    environment(service)
        .into_iter()
        .map(|(k, v)| (k, interpolate(&v)))
        .collect()
}

/// The interpolated value of one variable, which must be set.
fn env_value(service_name: &str, service: &Value, variable: &str) -> String {
    effective_environment(service)
        .remove(variable)
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| panic!("{service_name} must set {variable}"))
}

fn listen_port(service_name: &str, service: &Value) -> u16 {
    let addr = env_value(service_name, service, "LISTEN_ADDR");
    addr.parse::<SocketAddr>()
        .unwrap_or_else(|e| panic!("{service_name}: LISTEN_ADDR {addr:?}: {e}"))
        .port()
}

/// `(source, target)` of every volume of a service, `./` stripped from relative sources.
fn mounts(service: &Value) -> Vec<(String, String)> {
    let Some(volumes) = service.get("volumes") else {
        return Vec::new();
    };
    sequence(volumes, "volumes")
        .iter()
        .map(|v| {
            let (source, target) = match v {
                Value::String(short) => {
                    let parts: Vec<&str> = short.split(':').collect();
                    assert!(parts.len() >= 2, "volume {short:?} has no target");
                    (parts[0].to_owned(), parts[1].to_owned())
                }
                long => (string(&long["source"]), string(&long["target"])),
            };
            let source = source.strip_prefix("./").unwrap_or(&source).to_owned();
            (source, target)
        })
        .collect()
}

/// Container ports a service publishes on the host.
fn published_ports(service: &Value) -> Vec<u16> {
    let Some(ports) = service.get("ports") else {
        return Vec::new();
    };
    sequence(ports, "ports")
        .iter()
        .map(|p| {
            let container = match p {
                Value::Mapping(_) => string(&p["target"]),
                short => {
                    let short = string(short);
                    let last = short.rsplit(':').next().expect("a port").to_owned();
                    last.split('/').next().expect("a port").to_owned()
                }
            };
            container
                .parse()
                .unwrap_or_else(|e| panic!("port {p:?}: {e}"))
        })
        .collect()
}

/// `depends_on` in its long form: service name to condition.
fn dependencies(service_name: &str, service: &Value) -> BTreeMap<String, String> {
    let Some(depends_on) = service.get("depends_on") else {
        return BTreeMap::new();
    };
    mapping(
        depends_on,
        &format!("{service_name}'s depends_on (long form, with conditions)"),
    )
    .iter()
    .map(|(dep, spec)| {
        let condition = spec
            .get("condition")
            .map(string)
            .unwrap_or_else(|| panic!("{service_name} must say which condition of {dep:?}"));
        (string(dep), condition)
    })
    .collect()
}

fn has_healthcheck(service: &Value) -> bool {
    service.get("healthcheck").is_some_and(|h| {
        h.get("disable").and_then(Value::as_bool) != Some(true)
            && h.get("test").is_some_and(|t| {
                let words: Vec<String> = match t {
                    Value::Sequence(list) => list.iter().map(string).collect(),
                    other => vec![string(other)],
                };
                !words.is_empty() && words[0] != "NONE"
            })
    })
}

/// `host:port` of a URL such as `redis://redis:6379` or `http://otel-collector:4317`.
fn url_host_port(url: &str, default_port: u16) -> (String, u16) {
    let parsed = reqwest::Url::parse(url).unwrap_or_else(|e| panic!("{url:?}: {e}"));
    let host = parsed
        .host_str()
        .unwrap_or_else(|| panic!("{url:?} names no host"))
        .to_owned();
    (host, parsed.port().unwrap_or(default_port))
}

/// The user-defined network Envoy is on, and Envoy's static address there.
fn envoy_network(compose: &Value) -> (String, IpAddr) {
    let (name, envoy) = service_by_image(compose, "envoyproxy/envoy");
    let networks = mapping(
        &envoy["networks"],
        &format!("{name}'s networks (with a static ipv4_address)"),
    );
    let static_addresses: Vec<(String, IpAddr)> = networks
        .iter()
        .filter_map(|(network, spec)| {
            let address = spec.get("ipv4_address")?;
            Some((
                string(network),
                string(address).parse().expect("an IPv4 address"),
            ))
        })
        .collect();
    assert_eq!(
        static_addresses.len(),
        1,
        "{name} needs one static ipv4_address, for TRUSTED_PROXIES to name"
    );
    static_addresses.into_iter().next().expect("one")
}

fn ipam_ranges(compose: &Value, network: &str, key: &str) -> Vec<IpNet> {
    let configs = sequence(
        &compose["networks"][network]["ipam"]["config"],
        &format!("networks.{network}.ipam.config"),
    );
    configs
        .iter()
        .filter_map(|c| c.get(key))
        .map(|r| string(r).parse().expect("a CIDR"))
        .collect()
}

// ---- Dockerfile -------------------------------------------------------------------------------

struct Stage {
    image: String,
    name: Option<String>,
    /// `(INSTRUCTION, arguments)`, continuation lines joined.
    instructions: Vec<(String, String)>,
}

fn dockerfile_stages() -> Vec<Stage> {
    let text = read(DOCKERFILE);
    let mut logical = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                logical.push(std::mem::take(&mut current));
            }
        }
    }
    let mut stages: Vec<Stage> = Vec::new();
    for line in logical {
        let (keyword, args) = line.split_once(char::is_whitespace).unwrap_or((&line, ""));
        let (keyword, args) = (keyword.to_ascii_uppercase(), args.trim().to_owned());
        if keyword == "FROM" {
            let words: Vec<&str> = args
                .split_whitespace()
                .filter(|w| !w.starts_with("--"))
                .collect();
            let name = match words.as_slice() {
                [_, as_, name] if as_.eq_ignore_ascii_case("as") => Some((*name).to_owned()),
                _ => None,
            };
            stages.push(Stage {
                image: words[0].to_owned(),
                name,
                instructions: Vec::new(),
            });
        } else {
            stages
                .last_mut()
                .unwrap_or_else(|| panic!("{DOCKERFILE}: {keyword} before any FROM"))
                .instructions
                .push((keyword, args));
        }
    }
    stages
}

impl Stage {
    fn all(&self, keyword: &str) -> Vec<&str> {
        self.instructions
            .iter()
            .filter(|(k, _)| k == keyword)
            .map(|(_, args)| args.as_str())
            .collect()
    }

    /// The last `ENTRYPOINT` or `CMD`, in exec (JSON) form.
    fn exec_form(&self, keyword: &str) -> Vec<String> {
        let args = self
            .all(keyword)
            .last()
            .copied()
            .unwrap_or_else(|| panic!("the final stage needs {keyword}"));
        serde_json::from_str(args)
            .unwrap_or_else(|e| panic!("{keyword} must use the exec form [\"...\"]: {e}"))
    }
}

/// `(major, minor)` of a version such as `1.95` or `1.95.0`.
fn major_minor(version: &str) -> (u32, u32) {
    let mut parts = version.split('.').map(|p| {
        p.parse::<u32>()
            .unwrap_or_else(|e| panic!("version {version:?}: {e}"))
    });
    (parts.next().expect("major"), parts.next().expect("minor"))
}

// ---- the tests --------------------------------------------------------------------------------

#[test]
fn envoy_routes_point_at_defined_clusters() {
    let envoy = envoy();
    let clusters = clusters(&envoy);
    let routes = routes(&envoy);
    assert!(!routes.is_empty(), "{ENVOY} routes nothing");
    for route in &routes {
        if let Some(cluster) = route.cluster() {
            assert!(
                clusters.contains_key(cluster),
                "route {} sends to cluster {cluster:?}, which {ENVOY} does not define",
                route.name()
            );
        }
    }
}

#[test]
fn envoy_routes_only_our_routes_and_all_of_them() {
    let envoy = envoy();
    let routes = routes(&envoy);
    let ours: Vec<String> = public_paths()
        .into_iter()
        .chain(PRIVATE_PATHS.iter().map(|p| (*p).to_owned()))
        .collect();
    for route in &routes {
        assert!(
            ours.iter().any(|path| route.matches(path)),
            "route {} matches no route of the server (gRPC methods, {REST_PATHS:?})",
            route.name()
        );
    }
    for path in public_paths() {
        let route =
            first_route(&routes, &path).unwrap_or_else(|| panic!("{ENVOY} does not route {path}"));
        assert!(
            route.cluster().is_some(),
            "{path} is answered by Envoy ({}) instead of the server",
            route.name()
        );
    }
}

#[test]
fn envoy_keeps_metrics_private() {
    let envoy = envoy();
    let routes = routes(&envoy);
    for path in PRIVATE_PATHS {
        if let Some(route) = first_route(&routes, path) {
            assert!(
                route.forward().is_none(),
                "{path} must not be reachable through Envoy, but route {} forwards it",
                route.name()
            );
        }
    }
}

#[test]
fn envoy_timeouts_suit_streams_unary_calls_and_webhooks() {
    let envoy = envoy();
    let routes = routes(&envoy);
    let route_of = |path: &str| {
        first_route(&routes, path).unwrap_or_else(|| panic!("{ENVOY} does not route {path}"))
    };
    for method in grpc_methods() {
        let route = route_of(&method.path);
        if method.watch_stream {
            assert_eq!(
                route.timeout(),
                0.0,
                "{} is a long-lived stream: route {} needs `timeout: 0s`",
                method.path,
                route.name()
            );
            let idle = route
                .forward()
                .and_then(|a| a.get("idle_timeout"))
                .unwrap_or_else(|| {
                    panic!(
                        "{}: a stream without a timeout needs an idle_timeout",
                        method.path
                    )
                });
            assert!(
                seconds(idle, "idle_timeout") > 0.0,
                "{}: idle_timeout",
                method.path
            );
        } else {
            assert!(
                route.timeout() > SERVER_DEADLINE_SECONDS,
                "{}: Envoy's timeout ({} s, route {}) must exceed the server's deadline \
                 ({SERVER_DEADLINE_SECONDS} s), so clients get the server's DEADLINE_EXCEEDED",
                method.path,
                route.timeout(),
                route.name()
            );
        }
    }
    let legacy = route_of("/api/v1/bot1/application");
    assert!(
        legacy.timeout() > SERVER_DEADLINE_SECONDS,
        "the legacy route's timeout must exceed the server's deadline"
    );
    for path in REST_PATHS.iter().filter(|p| p.starts_with("/webhooks/")) {
        let route = route_of(path);
        let timeout = route.timeout();
        assert!(
            timeout > 0.0 && timeout <= SERVER_DEADLINE_SECONDS,
            "{path}: providers wait a bounded time, got {timeout} s"
        );
        assert!(
            route
                .forward()
                .and_then(|a| a.get("retry_policy"))
                .is_none(),
            "{path}: Envoy must not retry webhooks (providers retry themselves)"
        );
    }
}

#[test]
fn envoy_leaves_grpc_web_cors_and_rate_limits_to_the_server() {
    let envoy = envoy();
    let mut strings = Vec::new();
    all_strings(&envoy, &mut strings);
    // gRPC-web is translated by the server (tonic-web); CORS and quotas are the server's.
    for forbidden in [
        "grpc_web",
        "grpc_http1",
        "ratelimit",
        "rate_limit",
        "envoy.filters.http.cors",
        "local_reply_config",
    ] {
        let hits: Vec<&String> = strings.iter().filter(|s| s.contains(forbidden)).collect();
        assert!(
            hits.is_empty(),
            "{ENVOY} must not use {forbidden}: {hits:?}"
        );
    }
    for manager in connection_managers(&envoy) {
        let filters: Vec<String> = sequence(&manager["http_filters"], "http_filters")
            .iter()
            .map(|f| string(&f["name"]))
            .collect();
        assert_eq!(
            filters,
            ["envoy.filters.http.router"],
            "the router alone: another filter could rewrite gRPC statuses or headers"
        );
    }
    // RESOURCE_EXHAUSTED and UNAVAILABLE answers reach the client as they are: Envoy retries
    // only requests that never reached a replica.
    let mut policies = Vec::new();
    values_of(&envoy, "retry_on", &mut policies);
    for policy in policies {
        for condition in string(policy).split(',') {
            assert!(
                ["connect-failure", "refused-stream", "reset-before-request"]
                    .contains(&condition.trim()),
                "retry_on {condition:?} could repeat a request the server has seen"
            );
        }
    }
}

#[test]
fn envoy_upstream_is_http2_and_health_checked_over_grpc() {
    let envoy = envoy();
    let served = grpc_services();
    for (name, cluster) in clusters(&envoy) {
        let http2 = &cluster["typed_extension_protocol_options"][UPSTREAM_HTTP_OPTIONS]["explicit_http_config"]
            ["http2_protocol_options"];
        assert!(
            http2.is_mapping(),
            "cluster {name}: upstream must be HTTP/2 (explicit_http_config.http2_protocol_options)"
        );
        assert_eq!(
            cluster["type"].as_str(),
            Some("STRICT_DNS"),
            "cluster {name}: replicas are found by their compose names"
        );
        let checks = sequence(&cluster["health_checks"], "health_checks");
        assert!(!checks.is_empty(), "cluster {name}: no active health check");
        for check in checks {
            let grpc = check.get("grpc_health_check").unwrap_or_else(|| {
                panic!("cluster {name}: health checks use grpc_health_check, got {check:?}")
            });
            let service = grpc.get("service_name").map(string).unwrap_or_default();
            assert!(
                service.is_empty() || served.contains(&service),
                "cluster {name}: health check asks about {service:?}, which is not served"
            );
        }
    }
}

#[test]
fn envoy_endpoints_are_the_compose_replicas_on_their_listen_port() {
    let envoy = envoy();
    let compose = compose();
    let replicas = replicas(&compose);
    for (name, cluster) in clusters(&envoy) {
        let endpoints = endpoints(cluster);
        assert!(endpoints.len() >= 2, "cluster {name}: two replicas or more");
        for (host, port) in &endpoints {
            assert!(
                has_service(&compose, host),
                "cluster {name}: endpoint {host} is not a service of {COMPOSE}"
            );
            let (_, replica) = replicas
                .iter()
                .find(|(r, _)| r == host)
                .unwrap_or_else(|| panic!("cluster {name}: {host} is not a crm-server replica"));
            assert_eq!(
                *port,
                listen_port(host, replica),
                "cluster {name}: {host}'s port must be the one of its LISTEN_ADDR"
            );
        }
        for (replica, _) in &replicas {
            assert!(
                endpoints.iter().any(|(host, _)| host == replica),
                "replica {replica} gets no traffic: add it to cluster {name}"
            );
        }
    }
}

#[test]
fn envoy_tls_files_and_config_are_mounted_by_compose() {
    let envoy = envoy();
    let compose = compose();
    let (name, service) = service_by_image(&compose, "envoyproxy/envoy");
    let mounts = mounts(service);

    let mut files = Vec::new();
    values_of(&envoy, "filename", &mut files);
    assert!(
        files.len() >= 2,
        "{ENVOY} loads a certificate chain and a private key"
    );
    for file in files.iter().map(|f| string(f)) {
        let (source, _) = mounts
            .iter()
            .find(|(_, target)| Path::new(&file).starts_with(target))
            .unwrap_or_else(|| panic!("{file} is in no folder that {COMPOSE} mounts into {name}"));
        assert!(
            repo_path(source).join("README.md").is_file(),
            "{source}/README.md tells users which files to put there"
        );
    }

    let args = command(service).unwrap_or_default();
    let config_path = args
        .iter()
        .position(|a| a == "-c" || a == "--config-path")
        .map_or("/etc/envoy/envoy.yaml", |i| args[i + 1].as_str());
    assert!(
        mounts
            .iter()
            .any(|(source, target)| source == ENVOY && target == config_path),
        "{name} must load {ENVOY}, mounted at {config_path}"
    );

    let mut alpn = Vec::new();
    values_of(&envoy, "alpn_protocols", &mut alpn);
    let alpn: Vec<String> = alpn
        .iter()
        .flat_map(|list| sequence(list, "alpn_protocols"))
        .map(string)
        .collect();
    for protocol in ["h2", "http/1.1"] {
        assert!(
            alpn.iter().any(|p| p == protocol),
            "ALPN must offer {protocol}"
        );
    }

    let published = published_ports(service);
    for listener in sequence(&envoy["static_resources"]["listeners"], "listeners") {
        let port = listener["address"]["socket_address"]["port_value"]
            .as_u64()
            .expect("port_value");
        assert!(
            published.iter().any(|p| u64::from(*p) == port),
            "{name} must publish its listener port {port}"
        );
    }
}

#[test]
fn envoy_passes_request_ids_and_trace_context_through() {
    let envoy = envoy();
    for manager in connection_managers(&envoy) {
        assert_eq!(manager["generate_request_id"].as_bool(), Some(true));
        assert_eq!(
            manager["preserve_external_request_id"].as_bool(),
            Some(true),
            "a caller's x-request-id reaches the server unchanged"
        );
        if let Some(extension) = manager.get("request_id_extension") {
            assert_eq!(
                extension["typed_config"]["pack_trace_reason"].as_bool(),
                Some(false),
                "Envoy must not rewrite x-request-id"
            );
        }
        assert!(
            manager.get("tracing").is_none(),
            "Envoy tracing would rewrite traceparent; the server continues the caller's trace"
        );
        let mut formats = Vec::new();
        values_of(&manager["access_log"], "json_format", &mut formats);
        assert!(!formats.is_empty(), "access logs are JSON");
        let mut fields = Vec::new();
        formats.iter().for_each(|f| all_strings(f, &mut fields));
        for needed in [
            "%REQ(X-REQUEST-ID)%",
            "%REQ(TRACEPARENT)%",
            "%GRPC_STATUS",
            "%RESPONSE_CODE%",
            "%UPSTREAM_HOST%",
        ] {
            assert!(
                fields.iter().any(|f| f.starts_with(needed)),
                "the access log must record {needed}"
            );
        }
    }
}

#[test]
fn trusted_proxies_name_envoy_and_nothing_else() {
    let envoy = envoy();
    for manager in connection_managers(&envoy) {
        assert_eq!(
            manager["use_remote_address"].as_bool(),
            Some(true),
            "Envoy must append the real client address to X-Forwarded-For"
        );
        assert_eq!(
            manager["xff_num_trusted_hops"].as_u64(),
            Some(0),
            "Envoy is the first hop: it trusts no incoming X-Forwarded-For"
        );
    }

    let compose = compose();
    let (network, envoy_address) = envoy_network(&compose);
    let subnets = ipam_ranges(&compose, &network, "subnet");
    let dynamic = ipam_ranges(&compose, &network, "ip_range");
    assert!(
        subnets.iter().any(|s| s.contains(&envoy_address)),
        "Envoy's {envoy_address} must be inside network {network}'s subnet"
    );
    assert!(
        !dynamic.is_empty() && dynamic.iter().all(|r| !r.contains(&envoy_address)),
        "network {network} needs an ip_range for dynamic addresses that excludes Envoy's \
         {envoy_address}, or another container could take it"
    );
    let other_static: Vec<IpAddr> = services(&compose)
        .values()
        .filter_map(|s| s.get("networks")?.as_mapping())
        .flat_map(|networks| networks.values())
        .filter_map(|spec| spec.get("ipv4_address"))
        .map(|a| string(a).parse().expect("an IPv4 address"))
        .filter(|a| *a != envoy_address)
        .collect();

    for (name, replica) in crm_services(&compose) {
        let raw = env_value(&name, replica, "TRUSTED_PROXIES");
        let trusted: Vec<IpNet> = raw
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse()
                    .unwrap_or_else(|e| panic!("{name}: TRUSTED_PROXIES {s:?}: {e}"))
            })
            .collect();
        assert!(
            trusted.iter().any(|net| net.contains(&envoy_address)),
            "{name}: TRUSTED_PROXIES ({raw}) must contain Envoy's {envoy_address}"
        );
        for net in &trusted {
            assert!(
                net.contains(&envoy_address),
                "{name}: {net} in TRUSTED_PROXIES is not Envoy"
            );
            for range in &dynamic {
                assert!(
                    !net.contains(&range.network()) && !range.contains(&net.network()),
                    "{name}: {net} overlaps the dynamic addresses {range}: any container \
                     there could forge X-Forwarded-For"
                );
            }
            for address in &other_static {
                assert!(
                    !net.contains(address),
                    "{name}: {net} also trusts {address}, which is not Envoy"
                );
            }
        }

        let networks: Vec<String> = match replica.get("networks") {
            Some(Value::Sequence(list)) => list.iter().map(string).collect(),
            Some(Value::Mapping(map)) => map.keys().map(string).collect(),
            _ => Vec::new(),
        };
        assert!(
            networks.contains(&network),
            "{name} must be on Envoy's network {network}"
        );
        assert!(
            published_ports(replica).is_empty(),
            "{name} publishes ports: clients must come through Envoy"
        );
    }
}

#[test]
fn server_environment_uses_known_names_and_is_valid_for_production() {
    let compose = compose();
    for (name, server) in crm_services(&compose) {
        let written = environment(server);
        for variable in written.keys() {
            assert!(
                is_known_variable(variable),
                "{name} sets {variable}, which crm-server does not read (see api.md)"
            );
        }
        let settings = Settings::from_vars(&effective_environment(server))
            .unwrap_or_else(|e| panic!("{name}'s environment is refused by the server: {e}"));
        assert_eq!(
            settings.environment,
            Environment::Production,
            "{name} runs in production"
        );
        assert!(
            settings.listen_addr.ip().is_unspecified(),
            "{name}: LISTEN_ADDR {} must listen on every interface, or Envoy cannot reach it",
            settings.listen_addr
        );
        assert!(
            written
                .get("SECRET_KEY")
                .is_some_and(|v| v.contains(":?") || v.contains("${SECRET_KEY?")),
            "{name}: SECRET_KEY must come from ${{SECRET_KEY:?...}}, never a value in the file"
        );
    }
}

#[test]
fn replicas_share_the_compose_postgres_and_redis() {
    let compose = compose();
    let (postgres, _) = service_by_image(&compose, "postgres");
    let (redis, _) = service_by_image(&compose, "redis");
    let mut database_urls = BTreeSet::new();
    let mut redis_urls = BTreeSet::new();
    for (name, server) in crm_services(&compose) {
        assert_eq!(
            env_value(&name, server, "RATE_LIMIT_BACKEND"),
            "redis",
            "{name}: replicas enforce one quota only through Redis"
        );
        let redis_url = env_value(&name, server, "REDIS_URL");
        let (host, _) = url_host_port(&redis_url, 6379);
        assert_eq!(
            host, redis,
            "{name}: REDIS_URL must point at the {redis} service"
        );
        redis_urls.insert(redis_url);

        let database_url = env_value(&name, server, "DATABASE_URL");
        assert!(
            database_url.starts_with("postgres://") || database_url.starts_with("postgresql://"),
            "{name}: DATABASE_URL must be PostgreSQL"
        );
        let (host, _) = url_host_port(&database_url, 5432);
        assert_eq!(
            host, postgres,
            "{name}: DATABASE_URL must point at {postgres}"
        );
        database_urls.insert(database_url);
    }
    assert_eq!(redis_urls.len(), 1, "every replica uses the same Redis");
    assert_eq!(
        database_urls.len(),
        1,
        "every replica uses the same database"
    );
}

#[test]
fn traces_go_to_the_compose_collector() {
    let compose = compose();
    for (name, server) in replicas(&compose) {
        let endpoint = env_value(&name, server, "OTEL_EXPORTER_OTLP_ENDPOINT");
        env_value(&name, server, "OTEL_SERVICE_NAME");
        let protocol = effective_environment(server)
            .remove("OTEL_EXPORTER_OTLP_PROTOCOL")
            .unwrap_or_default();
        assert!(
            protocol.is_empty() || protocol == "grpc",
            "{name}: the collector is configured for OTLP over gRPC"
        );
        let (host, port) = url_host_port(&endpoint, 4317);
        let collector = service(&compose, &host);
        let (_, target) = mounts(collector)
            .into_iter()
            .find(|(source, _)| source == COLLECTOR)
            .unwrap_or_else(|| panic!("{host} must mount {COLLECTOR}"));
        if let Some(args) = command(collector) {
            assert!(
                args.iter().any(|a| a.contains(&target)),
                "{host} must be started with --config={target}"
            );
        }

        let config = yaml(COLLECTOR);
        let listen = string(&config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]);
        let listen: SocketAddr = listen
            .parse()
            .unwrap_or_else(|e| panic!("{COLLECTOR}: otlp grpc endpoint {listen:?}: {e}"));
        assert_eq!(
            listen.port(),
            port,
            "{name} sends to port {port}, the collector's OTLP/gRPC receiver listens on {listen}"
        );
        assert!(
            listen.ip().is_unspecified(),
            "{COLLECTOR}: the receiver must listen beyond localhost"
        );
        let pipeline = &config["service"]["pipelines"]["traces"];
        let receivers: Vec<String> = sequence(&pipeline["receivers"], "receivers")
            .iter()
            .map(string)
            .collect();
        assert!(
            receivers.iter().any(|r| r == "otlp"),
            "{COLLECTOR}: the traces pipeline receives otlp"
        );
        for exporter in sequence(&pipeline["exporters"], "exporters") {
            assert!(
                config["exporters"].get(string(exporter)).is_some(),
                "{COLLECTOR}: exporter {exporter:?} is not configured"
            );
        }
    }
}

/// The service `variable` (a URL) points at is a dependency that must be healthy first.
fn assert_waits_for_healthy(
    name: &str,
    dependencies: &BTreeMap<String, String>,
    server: &Value,
    variable: &str,
) {
    let (host, _) = url_host_port(&env_value(name, server, variable), 0);
    assert_eq!(
        dependencies.get(&host).map(String::as_str),
        Some("service_healthy"),
        "{name} must wait for {host} ({variable}) to be healthy"
    );
}

#[test]
fn servers_start_only_after_what_they_depend_on() {
    let compose = compose();
    for (name, server) in crm_services(&compose) {
        let dependencies = dependencies(&name, server);
        for (dependency, condition) in &dependencies {
            let target = service(&compose, dependency);
            match condition.as_str() {
                "service_healthy" => assert!(
                    has_healthcheck(target),
                    "{name} waits for {dependency} to be healthy, which has no healthcheck"
                ),
                "service_completed_successfully" => {
                    let args = command(target).unwrap_or_default();
                    assert!(
                        matches!(crm_command(&args), Command::Migrate),
                        "{name} waits for {dependency} to complete: only `migrate` does"
                    );
                    assert_eq!(
                        target["restart"].as_str(),
                        Some("no"),
                        "{dependency} is a one-shot"
                    );
                }
                other => panic!("{name} must not start on {dependency} merely {other}"),
            }
        }
        assert_waits_for_healthy(&name, &dependencies, server, "DATABASE_URL");
    }
    for (name, replica) in replicas(&compose) {
        // `migrate` needs only the database; serving replicas need Redis too.
        assert_waits_for_healthy(&name, &dependencies(&name, replica), replica, "REDIS_URL");
        assert!(
            dependencies(&name, replica)
                .values()
                .any(|c| c == "service_completed_successfully"),
            "{name} must wait for the one-shot `migrate`, so replicas never race on migrations"
        );
        assert!(has_healthcheck(replica), "{name} needs a healthcheck");
        let probe = format!(":{}/readyz", listen_port(&name, replica));
        let mut test = Vec::new();
        all_strings(&replica["healthcheck"]["test"], &mut test);
        assert!(
            test.iter().any(|t| t.contains(&probe)),
            "{name}'s healthcheck must probe {probe} (its LISTEN_ADDR port), got {test:?}"
        );
    }
}

#[test]
fn dockerfile_builds_crm_server_in_stages() {
    let stages = dockerfile_stages();
    assert!(
        stages.len() >= 2,
        "{DOCKERFILE}: a build stage and a runtime stage"
    );
    let builder = stages
        .iter()
        .find(|s| {
            s.all("RUN")
                .iter()
                .any(|r| r.contains("cargo build") && r.contains("--bin crm-server"))
        })
        .expect("a stage runs `cargo build ... --bin crm-server`");
    let build = builder
        .all("RUN")
        .into_iter()
        .find(|r| r.contains("cargo build"))
        .expect("cargo build");
    for flag in ["--release", "--locked"] {
        assert!(build.contains(flag), "cargo build needs {flag}");
    }

    // The builder's Rust is at least the crate's rust-version; both stages share a Debian
    // release, so the binary finds the glibc it was linked against.
    let tag = builder
        .image
        .strip_prefix("rust:")
        .expect("the builder is a rust image");
    let (version, release) = tag.split_once('-').expect("a tag like 1.95-bookworm");
    let manifest = read("Cargo.toml");
    let required = manifest
        .lines()
        .find_map(|l| l.trim().strip_prefix("rust-version = "))
        .expect("Cargo.toml has rust-version")
        .trim_matches('"');
    assert!(
        major_minor(version) >= major_minor(required),
        "the builder's Rust {version} is older than rust-version {required}"
    );
    let runtime = stages.last().expect("a final stage");
    assert!(
        runtime.image.starts_with(&format!("debian:{release}")),
        "the runtime ({}) must be Debian {release}, like the builder",
        runtime.image
    );

    let builder_name = builder.name.as_deref().expect("the build stage is named");
    assert!(
        runtime
            .all("COPY")
            .iter()
            .any(|c| c.contains(&format!("--from={builder_name}")) && c.contains("crm-server")),
        "the runtime copies crm-server from {builder_name}"
    );
    let user = runtime.all("USER");
    let user = user.last().expect("the runtime sets USER");
    assert!(
        !["root", "0"].contains(&user.split(':').next().unwrap_or_default()),
        "the server must not run as root"
    );
    assert_eq!(runtime.exec_form("ENTRYPOINT"), ["crm-server"]);
    assert!(
        matches!(crm_command(&runtime.exec_form("CMD")), Command::Serve),
        "the default CMD serves"
    );

    let exposed: Vec<u16> = runtime
        .all("EXPOSE")
        .iter()
        .flat_map(|e| e.split_whitespace())
        .map(|p| p.split('/').next().unwrap_or(p).parse().expect("a port"))
        .collect();
    let compose = compose();
    for (name, replica) in replicas(&compose) {
        let port = listen_port(&name, replica);
        assert!(
            exposed.contains(&port),
            "{DOCKERFILE} must EXPOSE {port}, the port of {name}'s LISTEN_ADDR"
        );
    }
}

#[test]
fn dockerignore_keeps_build_output_and_secrets_out() {
    let patterns: Vec<String> = read(DOCKERIGNORE)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_end_matches('/').to_owned())
        .collect();
    for needed in ["target", "data", ".env", "web/node_modules", "envoy/certs"] {
        assert!(
            patterns.iter().any(|p| p == needed),
            "{DOCKERIGNORE} must exclude {needed}"
        );
    }
}
