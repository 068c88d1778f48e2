//! The deployment files are well-formed YAML, and their timings fit the
//! drain: nothing is killed before sluice's drain can finish.

use std::time::Duration;

use yaml_rust2::{Yaml, YamlLoader};

fn load(path: &str) -> Vec<Yaml> {
    let text = std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn seconds(value: &str) -> u64 {
    value
        .strip_suffix('s')
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not a duration in seconds: {value}"))
}

#[test]
fn compose_gives_sluice_longer_than_its_drain_deadline() {
    let docs = load("docker-compose.yml");
    let sluice = &docs[0]["services"]["sluice"];
    assert_eq!(sluice["network_mode"].as_str(), Some("service:app"));
    let grace = seconds(
        sluice["stop_grace_period"]
            .as_str()
            .expect("stop_grace_period"),
    );
    let deadline = sluice::config::DEFAULT_DRAIN_DEADLINE.as_secs();
    assert!(
        grace > deadline,
        "stop_grace_period {grace}s <= drain deadline {deadline}s"
    );
    // The healthcheck is an exec-form command (no shell: the image has
    // dash, not bash) that `healthcheck_command_of_the_compose_file_…`
    // runs as it is.
    let test: Vec<&str> = sluice["healthcheck"]["test"]
        .as_vec()
        .expect("healthcheck test")
        .iter()
        .map(|v| v.as_str().expect("a string"))
        .collect();
    assert_eq!(test, ["CMD", "sluice", "health"]);
    // The application outlives the drain too.
    let app = seconds(
        docs[0]["services"]["app"]["stop_grace_period"]
            .as_str()
            .expect("app grace"),
    );
    assert!(app >= grace);
}

#[test]
fn kubernetes_manifest_fits_the_drain_and_its_config_is_valid() {
    let docs = load("deploy/kubernetes.yaml");
    let by_kind = |kind: &str| {
        docs.iter()
            .find(|d| d["kind"].as_str() == Some(kind))
            .unwrap_or_else(|| panic!("no {kind}"))
    };
    let config_text = by_kind("ConfigMap")["data"]["sluice.toml"]
        .as_str()
        .expect("sluice.toml in the ConfigMap");
    let config =
        sluice::Config::from_toml_str(config_text).expect("the embedded sluice config is valid");
    let drain = config.drain.pre_delay + config.drain.deadline;

    let pod = &by_kind("Deployment")["spec"]["template"]["spec"];
    let grace = Duration::from_secs(
        u64::try_from(
            pod["terminationGracePeriodSeconds"]
                .as_i64()
                .expect("grace period"),
        )
        .expect("positive"),
    );
    assert!(
        grace > drain,
        "terminationGracePeriodSeconds {grace:?} <= drain {drain:?}"
    );

    let containers = pod["containers"].as_vec().expect("containers");
    let find = |name: &str| {
        containers
            .iter()
            .find(|c| c["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("no container {name}"))
    };
    let sluice = find("sluice");
    assert_eq!(
        sluice["readinessProbe"]["httpGet"]["path"].as_str(),
        Some("/ready")
    );
    assert_eq!(
        sluice["livenessProbe"]["httpGet"]["path"].as_str(),
        Some("/live")
    );
    // The application keeps serving until sluice's drain is over.
    let pre_stop = find("app")["lifecycle"]["preStop"]["exec"]["command"]
        .as_vec()
        .expect("app preStop");
    let sleep = Duration::from_secs(
        pre_stop[1]
            .as_str()
            .and_then(|s| s.parse().ok())
            .expect("sleep seconds"),
    );
    assert!(sleep > drain && sleep < grace, "preStop sleep {sleep:?}");
    // The kubelet probes the pod IP: the admin port must not be loopback.
    match config.admin.listen {
        sluice::config::AdminListen::On(addr) => assert!(addr.ip().is_unspecified(), "{addr}"),
        sluice::config::AdminListen::Off => panic!("probes need the admin server"),
    }
}

/// Issue #18.1: the compose file's healthcheck, run exactly as Docker runs
/// it (`CMD`: the argument list, no shell), with the environment the file
/// gives sluice: it fails while nothing listens, passes while sluice
/// serves, and fails once sluice drains.
#[test]
fn the_compose_healthcheck_runs_as_written_and_tells_ready_from_not() {
    let docs = load("docker-compose.yml");
    let sluice = &docs[0]["services"]["sluice"];
    let test: Vec<String> = sluice["healthcheck"]["test"]
        .as_vec()
        .expect("healthcheck test")
        .iter()
        .map(|v| v.as_str().expect("a string").to_owned())
        .collect();
    assert_eq!(test[0], "CMD", "exec form: Docker runs it without a shell");
    let env = &sluice["environment"];
    let admin = env["SLUICE_ADMIN"].as_str().expect("SLUICE_ADMIN");
    assert_eq!(admin, "0.0.0.0:15090", "what the published port reaches");
    // The same address form on a port of this test's own.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let admin = format!("0.0.0.0:{port}");
    let bin = env!("CARGO_BIN_EXE_sluice");
    let healthcheck = || {
        let program = if test[1] == "sluice" { bin } else { &test[1] };
        std::process::Command::new(program)
            .args(&test[2..])
            .env("SLUICE_ADMIN", &admin)
            .output()
            .expect("run the healthcheck")
    };
    let out = healthcheck();
    assert_eq!(out.status.code(), Some(1), "nothing listens: {out:?}");

    let mut server = std::process::Command::new(bin)
        .args(["--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1"])
        .env("SLUICE_ADMIN", &admin)
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start sluice");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let out = healthcheck();
        if out.status.success() {
            assert!(
                String::from_utf8_lossy(&out.stdout).contains("ready"),
                "{out:?}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never healthy: {out:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Draining (SIGTERM; a long drain while a connection stays open):
    // not ready, so the healthcheck fails.
    let _client = std::net::TcpStream::connect(("127.0.0.1", port)).expect("an admin client");
    let status = std::process::Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let out = healthcheck();
    let _ = server.kill();
    let _ = server.wait();
    assert_ne!(out.status.code(), Some(0), "draining is not ready: {out:?}");
}

/// Issue #18.9: the image and the manifest run sluice as a production pod
/// should: a pinned image, pulled only when missing, no root, a read-only
/// root filesystem, no capabilities, resources set; the Dockerfile builds
/// from Cargo.lock as it is and runs as a non-root user.
#[test]
fn the_image_and_the_manifest_run_without_root_and_with_limits() {
    let docs = load("deploy/kubernetes.yaml");
    let pod = &docs
        .iter()
        .find(|d| d["kind"].as_str() == Some("Deployment"))
        .expect("a Deployment")["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    assert!(
        pod["securityContext"]["runAsUser"]
            .as_i64()
            .is_some_and(|u| u > 0)
    );
    for c in pod["containers"].as_vec().expect("containers") {
        let name = c["name"].as_str().expect("name");
        let image = c["image"].as_str().expect("image");
        assert!(
            !image.ends_with(":latest") && image.contains(':'),
            "{name}: {image}"
        );
        assert_eq!(
            c["imagePullPolicy"].as_str(),
            Some("IfNotPresent"),
            "{name}"
        );
        let sc = &c["securityContext"];
        assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true), "{name}");
        assert_eq!(
            sc["allowPrivilegeEscalation"].as_bool(),
            Some(false),
            "{name}"
        );
        assert_eq!(
            sc["capabilities"]["drop"][0].as_str(),
            Some("ALL"),
            "{name}"
        );
        assert!(
            c["resources"]["requests"]["cpu"].as_str().is_some(),
            "{name}"
        );
        assert!(
            c["resources"]["limits"]["memory"].as_str().is_some(),
            "{name}"
        );
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).expect("Dockerfile");
    let user = dockerfile
        .lines()
        .filter_map(|l| l.strip_prefix("USER "))
        .next_back()
        .expect("a USER line");
    let uid: u32 = user
        .split(':')
        .next()
        .and_then(|u| u.trim().parse().ok())
        .expect("a numeric uid");
    assert_ne!(uid, 0, "the image's user is root");
    assert!(
        dockerfile.matches("--locked").count() >= 2,
        "every cargo build is --locked"
    );
    let ignore = std::fs::read_to_string(root.join(".dockerignore")).expect(".dockerignore");
    assert!(ignore.lines().any(|l| l.trim() == "target/"), "{ignore}");
}

/// The metric families sluice's source registers, as Prometheus names
/// them: every name given to a registry or a scrape-time collector,
/// with its `sluice_` prefix (the process families have none) and the
/// sample suffixes of counters, histograms and infos.
fn exported_names() -> std::collections::BTreeSet<String> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/telemetry");
    let mut names = std::collections::BTreeSet::new();
    for file in ["metrics.rs", "collect.rs", "calls/mod.rs"] {
        let text = std::fs::read_to_string(root.join(file)).expect("telemetry source");
        for literal in text.split('"').skip(1).step_by(2) {
            if literal.is_empty()
                || !literal
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            {
                continue;
            }
            let base = if literal.starts_with("process_") {
                literal.to_owned()
            } else {
                format!("sluice_{literal}")
            };
            for suffix in ["", "_total", "_bucket", "_sum", "_count", "_info"] {
                names.insert(format!("{base}{suffix}"));
            }
        }
    }
    names
}

/// Issue #18.10: the Grafana dashboard parses, is a dashboard (panels
/// with Prometheus targets), and every expression names only metrics
/// sluice exports.
#[test]
fn the_grafana_dashboard_parses_and_names_only_exported_metrics() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/grafana/sluice.json");
    let text = std::fs::read_to_string(&path).expect("deploy/grafana/sluice.json");
    let dash: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    assert_eq!(dash["title"], "sluice");
    let panels = dash["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10, "{} panels", panels.len());
    let exported = exported_names();
    let mut named = std::collections::BTreeSet::new();
    for panel in panels {
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{}", panel["title"]);
        for target in targets {
            let expr = target["expr"].as_str().expect("a PromQL expression");
            let words = expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("sluice_") || w.starts_with("process_"));
            for metric in words {
                assert!(
                    exported.contains(metric),
                    "panel {:?} uses {metric}, which sluice does not export",
                    panel["title"]
                );
                named.insert(metric.to_owned());
            }
        }
    }
    // The panels the issue names are there.
    for needed in [
        "sluice_upstream_calls_total",
        "sluice_calls_total",
        "sluice_call_duration_seconds_bucket",
        "sluice_upstream_endpoints",
        "sluice_calls_in_flight",
        "sluice_drain_state",
        "sluice_tls_reloads_total",
        "sluice_hub_agents",
    ] {
        assert!(named.contains(needed), "no panel shows {needed}");
    }
}
