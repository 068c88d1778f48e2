use super::*;

#[test]
fn embedded_default_is_valid_and_matches_the_defaults() {
    let cfg = Config::embedded();
    assert_eq!(cfg.server.listen, DEFAULT_LISTEN.parse().expect("addr"));
    assert_eq!(cfg.upstream.address.to_string(), DEFAULT_UPSTREAM);
    assert_eq!(
        cfg.server.max_concurrent_streams,
        DEFAULT_MAX_CONCURRENT_STREAMS
    );
    assert_eq!(
        cfg.server.initial_stream_window,
        WindowSize(DEFAULT_STREAM_WINDOW)
    );
    assert_eq!(cfg.upstream.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
    // An empty file means the same as the embedded one.
    let empty = Config::from_toml_str("").expect("empty config");
    assert_eq!(format!("{empty:?}"), format!("{cfg:?}"));
}

#[test]
fn every_example_in_config_dir_loads() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("config/ exists") {
        let path = entry.expect("dir entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            Config::from_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            n += 1;
        }
    }
    assert!(n >= 1, "no example configs found in {}", dir.display());
}

fn invalid(text: &str) -> ConfigError {
    Config::from_toml_str(text).expect_err("config should be refused")
}

#[test]
fn an_out_of_range_value_names_its_key_line_and_column() {
    let err = invalid("[server]\nlisten = \"127.0.0.1:1\"\nmax_frame_size = 100\n");
    assert_eq!(err.key(), Some("server.max_frame_size"));
    assert_eq!(err.position(), Some((3, 18)));
    assert!(
        err.to_string()
            .starts_with("3:18: `server.max_frame_size`:"),
        "{err}"
    );
}

#[test]
fn a_groups_max_requests_is_at_least_one() {
    let group =
        "[upstream]\naddress = \"127.0.0.1:1\"\n[upstreams.b]\nendpoints = [\"127.0.0.1:2\"]\n";
    let err = invalid(&format!("{group}max_requests = 0\n"));
    assert_eq!(err.key(), Some("upstreams.b.max_requests"), "{err}");
    assert!(err.to_string().contains("at least 1"), "{err}");
    let config = Config::from_toml_str(&format!("{group}max_requests = 3\n")).expect("valid");
    assert_eq!(config.upstreams["b"].max_requests, Some(3));
    let config = Config::from_toml_str(group).expect("valid");
    assert_eq!(config.upstreams["b"].max_requests, None);
}

#[test]
fn an_unknown_key_is_refused_with_its_position() {
    let err = invalid("[upstream]\naddress = \"127.0.0.1:1\"\nadress = \"x\"\n");
    assert_eq!(err.position().map(|p| p.0), Some(3));
    assert!(err.to_string().contains("adress"), "{err}");
}

#[test]
fn bad_addresses_durations_and_sizes_are_refused() {
    for (text, key) in [
        ("[server]\nlisten = \"nowhere\"", "server.listen"),
        ("[upstream]\naddress = \"no-port\"", "upstream.address"),
        (
            "[upstream]\nconnect_timeout = \"5\"",
            "upstream.connect_timeout",
        ),
        (
            "[upstream]\nconnect_timeout = \"0s\"",
            "upstream.connect_timeout",
        ),
        (
            "[upstream]\nmax_connections = 0",
            "upstream.max_connections",
        ),
        (
            "[server]\ninitial_stream_window = \"4GiB\"",
            "server.initial_stream_window",
        ),
        (
            "[server]\nmax_header_list_size = \"12 parsecs\"",
            "server.max_header_list_size",
        ),
        ("[log]\nformat = \"xml\"", "log.format"),
    ] {
        let err = invalid(text);
        assert_eq!(err.key(), Some(key), "{text}: {err}");
        assert_eq!(err.position().map(|p| p.0), Some(2), "{text}: {err}");
    }
}

#[test]
fn sizes_and_durations_accept_units() {
    let cfg = Config::from_toml_str(
        "[server]\ninitial_stream_window = \"64KiB\"\nmax_header_list_size = 8192\n\
         [upstream]\naddress = \"app.local:8080\"\nconnect_timeout = \"250ms\"\n",
    )
    .expect("valid");
    assert_eq!(cfg.server.initial_stream_window, WindowSize(65_536));
    assert_eq!(cfg.server.max_header_list_size, ByteSize(8192));
    assert_eq!(cfg.upstream.address.host(), "app.local");
    assert_eq!(cfg.upstream.address.port(), 8080);
    assert_eq!(
        cfg.upstream.connect_timeout,
        std::time::Duration::from_millis(250)
    );
}

#[test]
fn routes_are_checked_against_the_groups_with_a_position() {
    let err = invalid(
        "[upstreams.billing]\nendpoints = [\"127.0.0.1:1\"]\n\n[[routes]]\nmethod = \"/a.B/*\"\nupstream = \"biling\"\n",
    );
    assert_eq!(err.key(), Some("routes[0].upstream"));
    assert_eq!(err.position(), Some((6, 12)));
    assert!(err.to_string().contains("biling"), "{err}");

    let err = invalid("[[routes]]\nmethod = \"/a.B/*\"\n");
    assert_eq!(err.key(), Some("routes[0]"));

    for (text, key) in [
        (
            "[[routes]]\nfield = { path = \"1..2\" }\nupstream = \"default\"",
            "routes[0].field.path",
        ),
        (
            "[[routes]]\nrefuse = { code = \"NOPE\" }",
            "routes[0].refuse.code",
        ),
        ("[routing]\nfallback = \"maybe\"", "routing.fallback"),
        (
            "[upstreams.x]\nendpoints = [\"nohost\"]",
            "upstreams.x.endpoints[0]",
        ),
    ] {
        let err = invalid(text);
        assert_eq!(err.key(), Some(key), "{text}: {err}");
    }
}

#[test]
fn checks_beyond_one_value_report_the_position_of_their_key() {
    let err = invalid("[server]\nlisten = \"127.0.0.1:1\"\n\n[[routes]]\nmethod = \"/a.B/*\"\n");
    assert_eq!(err.key(), Some("routes[0]"));
    assert_eq!(err.position().map(|p| p.0), Some(4), "{err}"); // its [[routes]] header

    let err = invalid("# groups\n\n[upstreams.empty]\nendpoints = []\n");
    assert_eq!(err.key(), Some("upstreams.empty.endpoints"));
    assert_eq!(err.position(), Some((4, 13)), "{err}");
}

#[test]
fn the_upstream_connection_window_covers_every_stream_window() {
    let cfg = Config::embedded();
    assert_eq!(
        u64::from(cfg.upstream.connection_window()),
        u64::from(DEFAULT_MAX_STREAMS_PER_CONNECTION) * u64::from(DEFAULT_UPSTREAM_STREAM_WINDOW)
    );
    let err = invalid(
        "[upstream]\nmax_streams_per_connection = 10\ninitial_connection_window = \"1MiB\"\n",
    );
    assert_eq!(err.key(), Some("upstream.initial_connection_window"));
    assert_eq!(err.position(), Some((3, 29)), "{err}");
    assert!(err.to_string().contains("stop reading"), "{err}");

    let err = invalid(
        "[upstream]\nmax_streams_per_connection = 1000\ninitial_stream_window = \"4MiB\"\n",
    );
    assert_eq!(err.key(), Some("upstream.initial_stream_window"));
    assert_eq!(err.position().map(|p| p.0), Some(3), "{err}");

    let ok = Config::from_toml_str(
        "[upstream]\nmax_streams_per_connection = 10\ninitial_stream_window = \"64KiB\"\n\
         initial_connection_window = \"1MiB\"\n",
    )
    .expect("1 MiB covers 10 x 64 KiB");
    assert_eq!(ok.upstream.connection_window(), 1 << 20);
}

#[test]
fn tls_settings_that_cannot_work_are_refused_with_their_key() {
    let tls = "[server.tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\n";
    let e = invalid(&format!(
        "[server]\nlisten = \"127.0.0.1:1\"\n{tls}listen = \"127.0.0.1:1\"\n"
    ));
    assert!(e.to_string().contains("server.tls.listen"), "{e}");
    let e = invalid("[upstream]\ntls = { cert = \"c.pem\" }\n");
    assert!(e.to_string().contains("both `cert` and `key`"), "{e}");
    let e = invalid("[upstream]\ntls = { server_name = \"not a name!\" }\n");
    assert!(e.to_string().contains("upstream.tls.server_name"), "{e}");
    let e = invalid(
        "[upstreams.app]\nendpoints = [\"unix:/run/app.sock\"]\ntls = { ca = \"ca.pem\" }\n",
    );
    assert!(e.to_string().contains("server_name"), "{e}");
    let e = invalid(&format!(
        "{tls}client_auth = {{ ca = \"ca.pem\", roles = \"subject\" }}\n"
    ));
    assert!(e.to_string().contains("oid:1.2.3"), "{e}");
    let e = invalid(&format!(
        "{tls}client_auth = {{ ca = \"ca.pem\", mode = \"maybe\" }}\n"
    ));
    assert!(e.to_string().contains("server.tls.client_auth.mode"), "{e}");
    let e = invalid("[[routes]]\nupstream = \"default\"\nenrich = { client_id = \"x-id\" }\n");
    assert!(e.to_string().contains("client_id"), "{e}");
    let e = invalid(&format!(
        "{tls}client_auth = {{ ca = \"ca.pem\" }}\n[enrich]\nclient_id = \"bad key\"\n"
    ));
    assert!(e.to_string().contains("enrich.client_id"), "{e}");
}

#[test]
fn the_client_id_key_defaults_on_with_client_auth_and_paths_follow_the_file() {
    let tls = "[server.tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\n";
    let plain = Config::from_toml_str(tls).expect("tls");
    assert_eq!(plain.client_id_key(), None);
    let mut mtls = Config::from_toml_str(&format!("{tls}client_auth = {{ ca = \"ca.pem\" }}\n"))
        .expect("mtls");
    assert_eq!(mtls.client_id_key(), Some(DEFAULT_CLIENT_ID_KEY));
    let off = Config::from_toml_str(&format!(
        "{tls}client_auth = {{ ca = \"ca.pem\" }}\n[enrich]\nclient_id = \"\"\n"
    ))
    .expect("off");
    assert_eq!(off.client_id_key(), None);
    mtls.resolve_paths(std::path::Path::new("/etc/sluice"));
    let t = mtls.server.tls.as_ref().expect("tls");
    assert_eq!(t.cert, std::path::Path::new("/etc/sluice/c.pem"));
    assert_eq!(
        t.client_auth.as_ref().expect("auth").ca,
        std::path::Path::new("/etc/sluice/ca.pem")
    );
    let group = Config::from_toml_str(
        "[upstream]\nmax_connections = 9\n[upstreams.far]\nendpoints = [\"10.0.0.1:443\"]\nmax_connections = 2\ntls = { server_name = \"far.example\" }\n",
    )
    .expect("group");
    let settings = group.group_upstream(&group.upstreams["far"]);
    assert_eq!(settings.max_connections, 2);
    assert_eq!(
        settings.tls.and_then(|t| t.server_name).as_deref(),
        Some("far.example")
    );
    assert!(
        group.upstream.tls.is_none(),
        "the default group stays plaintext"
    );
}

/// The keys serde accepts in the table at `prefix` (a TOML fragment
/// that opens it), read from the error an unknown key gets.
fn accepted_keys(prefix: &str) -> Vec<String> {
    let text = format!("{prefix}\nzz_not_a_key = 1\n");
    let err = Config::from_toml_str(&text)
        .expect_err("an unknown key")
        .to_string();
    let list = err
        .split("expected one of ")
        .nth(1)
        .or_else(|| err.split("expected ").nth(1))
        .unwrap_or_else(|| panic!("{prefix}: {err}"));
    list.split(", ")
        .flat_map(|k| k.split(" or "))
        .map(|k| k.trim().trim_matches('`').to_owned())
        .filter(|k| !k.is_empty())
        .collect()
}

/// The keys `default.toml` names under each table header, commented out
/// or not (`# key = …` documents a key with no default value).
fn documented(text: &str) -> std::collections::BTreeMap<String, Vec<String>> {
    let mut out: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    let mut table = String::new();
    for line in text.lines() {
        let line = line.trim().trim_start_matches('#').trim();
        if let Some(header) = line.strip_prefix('[') {
            table = header.trim_matches(|c| c == '[' || c == ']').to_owned();
            continue;
        }
        if let Some((key, _)) = line.split_once('=') {
            let key = key.trim();
            if !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                out.entry(table.clone()).or_default().push(key.to_owned());
            }
        }
    }
    out
}

/// Issue #18.8: `config/default.toml` says it spells out every key; every
/// key each table accepts appears in it, under its table (the tables
/// are found from the config types themselves, so a new key must be
/// documented there too).
#[test]
fn the_default_config_spells_out_every_key() {
    let tables = [
        ("", ""),
        ("server", "[server]"),
        ("server.tls", "[server.tls]\ncert = \"c\"\nkey = \"k\""),
        (
            "server.tls.client_auth",
            "[server.tls]\ncert = \"c\"\nkey = \"k\"\n[server.tls.client_auth]\nca = \"a\"",
        ),
        ("upstream", "[upstream]"),
        ("upstream.tls", "[upstream.tls]"),
        (
            "upstreams.NAME",
            "[upstreams.n]\nendpoints = [\"127.0.0.1:1\"]",
        ),
        (
            "upstreams.NAME.health_check",
            "[upstreams.n]\nendpoints = [\"127.0.0.1:1\"]\n[upstreams.n.health_check]",
        ),
        (
            "upstreams.NAME.outlier_detection",
            "[upstreams.n]\nendpoints = [\"127.0.0.1:1\"]\n[upstreams.n.outlier_detection]",
        ),
        ("routes", "[[routes]]\nupstream = \"default\""),
        ("routing", "[routing]"),
        ("retry", "[retry]"),
        ("fanout", "[fanout]"),
        ("enrich", "[enrich]"),
        ("tls", "[tls]"),
        ("tunnel", "[tunnel]"),
        (
            "tunnel.hub",
            "[tunnel.hub]\nlisten = \"127.0.0.1:0\"\nname = \"h\"",
        ),
        (
            "tunnel.agent",
            "[tunnel.agent]\nhubs = [\"127.0.0.1:1\"]\nid = \"a\"",
        ),
        ("runtime", "[runtime]"),
        ("log", "[log]"),
        ("drain", "[drain]"),
        ("admin", "[admin]"),
        ("trace", "[trace]"),
    ];
    let documented = documented(DEFAULT_TOML);
    let mut missing = Vec::new();
    for (table, prefix) in tables {
        let have = documented.get(table).cloned().unwrap_or_default();
        for key in accepted_keys(prefix) {
            // A top-level key is a table of its own, documented by its header.
            let present = if table.is_empty() {
                documented.contains_key(&key)
                    || documented.keys().any(|t| t.starts_with(&format!("{key}.")))
            } else {
                // A key that is a table is documented by its header.
                have.contains(&key) || documented.contains_key(&format!("{table}.{key}"))
            };
            if !present {
                missing.push(format!("{table}.{key}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "config/default.toml does not document: {missing:?}"
    );
}

#[test]
fn a_field_condition_takes_one_test() {
    let text = "[[routes]]\nfield = { path = \"1\", equals = \"a\", prefix = \"b\" }\nupstream = \"default\"\n";
    let e = Config::from_toml_str(text).expect_err("two conditions");
    let message = e.to_string();
    assert!(message.contains("routes[0].field"), "{message}");
    assert!(message.contains("one of `equals`"), "{message}");
}
