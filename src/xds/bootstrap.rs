//! gRPC's xDS bootstrap (gRFC A27): which control plane to ask, with which
//! credentials, and the node sluice announces. One file serves sluice and
//! the proxyless gRPC clients beside it.

use std::{collections::HashMap, path::PathBuf};

use envoy_types::pb::{
    envoy::config::core::v3::{Locality, Node, node::UserAgentVersionType},
    google::protobuf::{ListValue, NullValue, Struct, Value, value::Kind},
};
use serde::Deserialize;

use crate::config::XdsConfig;

/// The variable naming the bootstrap file, as gRPC reads it.
pub(crate) const BOOTSTRAP_ENV: &str = "GRPC_XDS_BOOTSTRAP";
/// The variable holding the bootstrap JSON itself.
pub(crate) const BOOTSTRAP_CONFIG_ENV: &str = "GRPC_XDS_BOOTSTRAP_CONFIG";

/// A bootstrap, read and checked.
#[derive(Clone, Debug)]
pub struct Bootstrap {
    /// Where it came from (a path or a variable), for logs and `/config`.
    pub(crate) origin: String,
    /// The control plane's `host:port`.
    pub(crate) server_uri: String,
    /// Whether the channel to it uses TLS (`channel_creds` type `tls`)
    /// rather than plaintext (`insecure`).
    pub(crate) tls: bool,
    /// The node sent in the first request of each stream.
    pub(crate) node: Node,
    /// `certificate_providers` of plugin `file_watcher`, by instance name
    /// (gRFC A29): the files a cluster's TLS names by instance.
    pub(crate) certificates: HashMap<String, FileWatcher>,
}

/// A `file_watcher` certificate provider's files.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct FileWatcher {
    pub(crate) certificate_file: Option<PathBuf>,
    pub(crate) private_key_file: Option<PathBuf>,
    pub(crate) ca_certificate_file: Option<PathBuf>,
}

/// Why a bootstrap cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("xDS bootstrap {origin}: {message}")]
pub struct BootstrapError {
    origin: String,
    message: String,
}

#[derive(Deserialize)]
struct Raw {
    xds_servers: Vec<RawServer>,
    #[serde(default)]
    node: Option<RawNode>,
    #[serde(default)]
    certificate_providers: HashMap<String, RawProvider>,
}

#[derive(Deserialize)]
struct RawServer {
    server_uri: String,
    #[serde(default)]
    channel_creds: Vec<RawCreds>,
    #[serde(default)]
    #[allow(dead_code)]
    server_features: Vec<String>,
}

#[derive(Deserialize)]
struct RawCreds {
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Deserialize, Default)]
struct RawNode {
    #[serde(default)]
    id: String,
    #[serde(default)]
    cluster: String,
    #[serde(default)]
    locality: Option<RawLocality>,
    #[serde(default)]
    metadata: Option<serde_json::Map<String, serde_json::Value>>,
}

#[derive(Deserialize, Default)]
struct RawLocality {
    #[serde(default)]
    region: String,
    #[serde(default)]
    zone: String,
    #[serde(default)]
    sub_zone: String,
}

#[derive(Deserialize)]
struct RawProvider {
    plugin_name: String,
    #[serde(default)]
    config: serde_json::Value,
}

impl Bootstrap {
    /// The bootstrap sluice runs with: `config.bootstrap` (which
    /// `--xds-bootstrap` sets), else the file `GRPC_XDS_BOOTSTRAP` names,
    /// else the JSON in `GRPC_XDS_BOOTSTRAP_CONFIG`; `None` when none is
    /// given (xDS is off).
    ///
    /// # Errors
    ///
    /// The bootstrap named cannot be read or used.
    pub fn find(config: &XdsConfig) -> Result<Option<Self>, BootstrapError> {
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let path = config
            .bootstrap
            .clone()
            .or_else(|| env(BOOTSTRAP_ENV).map(PathBuf::from));
        if let Some(path) = path {
            let origin = path.display().to_string();
            let text = std::fs::read_to_string(&path).map_err(|e| BootstrapError {
                origin: origin.clone(),
                message: format!("cannot read it: {e}"),
            })?;
            return Self::parse(&text, origin).map(Some);
        }
        match env(BOOTSTRAP_CONFIG_ENV) {
            Some(text) => Self::parse(&text, BOOTSTRAP_CONFIG_ENV.to_owned()).map(Some),
            None => Ok(None),
        }
    }

    /// Reads bootstrap JSON; `origin` says where it came from.
    ///
    /// # Errors
    ///
    /// It is not JSON, names no server, or offers no credentials sluice
    /// can use.
    pub fn parse(text: &str, origin: String) -> Result<Self, BootstrapError> {
        let fail = |message: String| BootstrapError {
            origin: origin.clone(),
            message,
        };
        let raw: Raw = serde_json::from_str(text).map_err(|e| fail(e.to_string()))?;
        // gRPC uses the first server; so does sluice.
        let server = raw
            .xds_servers
            .into_iter()
            .next()
            .ok_or_else(|| fail("xds_servers is empty".to_owned()))?;
        if server.server_uri.trim().is_empty() {
            return Err(fail("xds_servers[0].server_uri is empty".to_owned()));
        }
        // The first credentials sluice supports, as gRPC picks them.
        let tls = server
            .channel_creds
            .iter()
            .find_map(|c| match c.kind.as_str() {
                "insecure" => Some(false),
                "tls" => Some(true),
                _ => None,
            })
            .ok_or_else(|| {
                fail(format!(
                    "xds_servers[0].channel_creds offers no type sluice supports ({:?}); use \"insecure\" or \"tls\"",
                    server.channel_creds.iter().map(|c| c.kind.as_str()).collect::<Vec<_>>()
                ))
            })?;
        let mut certificates = HashMap::new();
        for (name, provider) in raw.certificate_providers {
            if provider.plugin_name != "file_watcher" {
                continue;
            }
            let file = |key: &str| {
                provider
                    .config
                    .get(key)
                    .and_then(|v| v.as_str())
                    .map(PathBuf::from)
            };
            certificates.insert(
                name,
                FileWatcher {
                    certificate_file: file("certificate_file"),
                    private_key_file: file("private_key_file"),
                    ca_certificate_file: file("ca_certificate_file"),
                },
            );
        }
        let node = raw.node.unwrap_or_default();
        Ok(Self {
            origin,
            server_uri: server
                .server_uri
                .trim_start_matches("dns:///")
                .trim_start_matches("dns:")
                .to_owned(),
            tls,
            certificates,
            node: Node {
                id: node.id,
                cluster: node.cluster,
                locality: node.locality.map(|l| Locality {
                    region: l.region,
                    zone: l.zone,
                    sub_zone: l.sub_zone,
                }),
                metadata: node.metadata.map(to_struct),
                user_agent_name: "sluice".to_owned(),
                user_agent_version_type: Some(UserAgentVersionType::UserAgentVersion(
                    env!("CARGO_PKG_VERSION").to_owned(),
                )),
                client_features: vec![
                    "envoy.lb.does_not_support_overprovisioning".to_owned(),
                    "xds.config.resource-in-sotw".to_owned(),
                ],
                ..Node::default()
            },
        })
    }

    /// Where it came from.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The control plane's address.
    pub fn server_uri(&self) -> &str {
        &self.server_uri
    }
}

/// JSON as a `google.protobuf.Struct`.
fn to_struct(map: serde_json::Map<String, serde_json::Value>) -> Struct {
    Struct {
        fields: map.into_iter().map(|(k, v)| (k, to_value(v))).collect(),
    }
}

fn to_value(v: serde_json::Value) -> Value {
    use serde_json::Value as J;
    let kind = match v {
        J::Null => Kind::NullValue(NullValue::NullValue as i32),
        J::Bool(b) => Kind::BoolValue(b),
        J::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        J::String(s) => Kind::StringValue(s),
        J::Array(a) => Kind::ListValue(ListValue {
            values: a.into_iter().map(to_value).collect(),
        }),
        J::Object(o) => Kind::StructValue(to_struct(o)),
    };
    Value { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grpc_bootstrap_gives_the_server_its_credentials_and_the_node() {
        let b = Bootstrap::parse(
            r#"{
              "xds_servers": [{"server_uri": "dns:///cp.example:18000",
                "channel_creds": [{"type": "google_default"}, {"type": "tls"}],
                "server_features": ["xds_v3"]}],
              "node": {"id": "sidecar-1", "cluster": "c", "locality": {"zone": "z1"},
                "metadata": {"team": "a", "n": 2}},
              "certificate_providers": {"mesh": {"plugin_name": "file_watcher",
                "config": {"certificate_file": "/c.pem", "private_key_file": "/k.pem",
                  "ca_certificate_file": "/ca.pem"}}}
            }"#,
            "test".to_owned(),
        )
        .expect("valid");
        assert_eq!(b.server_uri, "cp.example:18000");
        assert!(b.tls, "the first supported credentials: tls");
        assert_eq!(b.node.id, "sidecar-1");
        assert_eq!(
            b.node.locality.as_ref().map(|l| l.zone.as_str()),
            Some("z1")
        );
        assert_eq!(b.node.metadata.as_ref().map(|m| m.fields.len()), Some(2));
        assert_eq!(
            b.certificates["mesh"].ca_certificate_file,
            Some(PathBuf::from("/ca.pem"))
        );
    }

    #[test]
    fn a_bootstrap_without_usable_servers_or_credentials_is_refused() {
        for (text, says) in [
            ("{", "EOF"),
            (r#"{"xds_servers": []}"#, "xds_servers is empty"),
            (
                r#"{"xds_servers": [{"server_uri": "a:1", "channel_creds": [{"type": "google_default"}]}]}"#,
                "no type sluice supports",
            ),
        ] {
            let e = Bootstrap::parse(text, "test".to_owned()).expect_err(text);
            assert!(e.to_string().contains(says), "{e}");
        }
    }
}
