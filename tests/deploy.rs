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
    let probe = sluice["healthcheck"]["test"][1]
        .as_str()
        .expect("healthcheck command");
    assert!(probe.contains("/ready"), "{probe}");
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
