//! The tunnel handshake: an HTTP/1.1 Upgrade to `sluice-tunnel`, with the
//! agent's id, identifiers, protocol versions and token in the request,
//! and the chosen version, the hub's name, group and generation, the id of
//! the hub process (its instance: a hub restarted in place, or a replica,
//! keeps its name) and the hubs it knows in the 101 answer. After it the roles reverse: the hub is
//! the HTTP/2 client on the connection, the agent serves it.
//!
//! Heads are read a byte at a time (a head is a few hundred bytes, read
//! once per tunnel), so nothing of what follows the head is read early and
//! the HTTP/2 bytes after it stay on the connection. A head is at most
//! [`MAX_HEAD`] bytes, and the whole handshake is bounded by the caller's
//! deadline.

use std::fmt::Write as _;

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    time::{Instant, timeout_at},
};

use super::tracker::HubInfo;

/// The Upgrade token.
pub(crate) const UPGRADE: &str = "sluice-tunnel/1";
/// The protocol versions this build speaks, newest last.
pub(crate) const VERSIONS: &[u32] = &[1];
/// Longest request or response head accepted.
pub(crate) const MAX_HEAD: usize = 8 * 1024;
/// Headers parsed at most.
const MAX_HEADERS: usize = 32;

/// What identifies an agent besides its id (konnectivity's identifiers):
/// what `dest-host` and `default-route` choose agents by.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Identifiers {
    pub(crate) host: Vec<String>,
    pub(crate) ipv4: Vec<String>,
    pub(crate) ipv6: Vec<String>,
    pub(crate) default_route: bool,
}

/// The agent's side of the handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct AgentHello {
    pub(crate) id: String,
    pub(crate) identifiers: Identifiers,
    pub(crate) versions: Vec<u32>,
    pub(crate) token: Option<String>,
    /// Only asking which hubs exist (no tunnel): the hub answers 204 with
    /// its gossip and closes.
    pub(crate) discover: bool,
}

/// The hub's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct HubHello {
    pub(crate) version: u32,
    pub(crate) hub: HubInfo,
    /// The id of the hub process that answered (empty from a hub that
    /// gives none: one instance per name).
    pub(crate) instance: String,
    pub(crate) hubs: Vec<HubInfo>,
    /// The secret the hub's control requests on this tunnel carry (so a
    /// client of the hub, whose calls the tunnel also carries, cannot
    /// send one).
    pub(crate) control_key: String,
}

/// The path of the hub's control request on a tunnel: "I am draining,
/// dial elsewhere".
pub(crate) const REHOME_PATH: &str = "/sluice.tunnel.v1.Hub/Rehome";
/// The header that carries the tunnel's control key.
pub(crate) const CONTROL_KEY: &str = "sluice-control-key";
/// The header that names the hub process (in the handshake answers and
/// the re-home request).
pub(crate) const INSTANCE: &str = "sluice-hub-instance";

/// A fresh random key: 128 bits from the system's secure random source
/// (ring's, through rustls).
pub(crate) fn control_key() -> String {
    let mut bytes = [0u8; 16];
    if rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut bytes)
        .is_err()
    {
        // No randomness (never on Linux): no control key, so the agent
        // accepts no control request on this tunnel.
        return String::new();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `given` is `key`, in constant time.
pub(crate) fn key_matches(key: &str, given: &str) -> bool {
    same(key, given)
}

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HandshakeError {
    #[error("no handshake within the handshake timeout")]
    TimedOut,
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed handshake: {0}")]
    Malformed(String),
    /// The hub said no, with its reason.
    #[error("the hub refused the tunnel ({status}): {reason}")]
    Refused { status: u16, reason: String },
}

/// Reads one HTTP/1.1 head (through the blank line), byte by byte.
async fn read_head<T: AsyncRead + Unpin>(io: &mut T) -> Result<Vec<u8>, HandshakeError> {
    let mut head = Vec::with_capacity(512);
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_HEAD {
            return Err(HandshakeError::Malformed(format!(
                "head longer than {MAX_HEAD} bytes"
            )));
        }
        let byte = io.read_u8().await?;
        head.push(byte);
    }
    Ok(head)
}

fn header<'h>(headers: &'h [httparse::Header<'_>], name: &str) -> Option<&'h str> {
    headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .and_then(|h| std::str::from_utf8(h.value).ok())
        .map(str::trim)
}

fn versions(text: &str) -> Vec<u32> {
    text.split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect()
}

/// The highest version both sides speak.
pub(crate) fn negotiate(theirs: &[u32]) -> Option<u32> {
    VERSIONS.iter().rev().find(|v| theirs.contains(v)).copied()
}

/// Whether `text` is safe in a header and a name (the config's rule).
pub(crate) fn is_token(text: &str) -> bool {
    crate::config::is_tunnel_name(text)
}

fn hub_field(h: &HubInfo) -> String {
    format!("{};{};{}", h.name, h.group, h.generation)
}

fn parse_hub(text: &str) -> Option<HubInfo> {
    let mut parts = text.trim().split(';');
    let (name, group, generation) = (parts.next()?, parts.next()?, parts.next()?);
    let generation = generation.trim().parse().ok()?;
    (is_token(name) && is_token(group) && parts.next().is_none()).then(|| HubInfo {
        name: name.to_owned(),
        group: group.to_owned(),
        generation,
    })
}

// === the agent's side ===

impl AgentHello {
    fn encode(&self, host: &str) -> String {
        let mut ids = Vec::new();
        for (key, values) in [
            ("host", &self.identifiers.host),
            ("ipv4", &self.identifiers.ipv4),
            ("ipv6", &self.identifiers.ipv6),
        ] {
            for v in values {
                ids.push(format!(
                    "{key}={}",
                    percent_encoding::utf8_percent_encode(v, percent_encoding::NON_ALPHANUMERIC)
                ));
            }
        }
        if self.identifiers.default_route {
            ids.push("default-route=true".to_owned());
        }
        let versions: Vec<String> = self.versions.iter().map(u32::to_string).collect();
        let mut req = format!(
            "GET /sluice-tunnel HTTP/1.1\r\nhost: {host}\r\nconnection: upgrade\r\nupgrade: {UPGRADE}\r\n\
             sluice-agent-id: {}\r\nsluice-agent-identifiers: {}\r\nsluice-versions: {}\r\n",
            self.id,
            ids.join("&"),
            versions.join(","),
        );
        if let Some(token) = &self.token {
            let _ = write!(req, "authorization: Bearer {token}\r\n");
        }
        if self.discover {
            req.push_str("sluice-discover: true\r\n");
        }
        req.push_str("\r\n");
        req
    }
}

/// The agent's handshake on `io` (to the hub at `host`), by `deadline`.
pub(crate) async fn agent<T>(
    io: &mut T,
    hello: &AgentHello,
    host: &str,
    deadline: Instant,
) -> Result<HubHello, HandshakeError>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    timeout_at(deadline, async {
        io.write_all(hello.encode(host).as_bytes()).await?;
        io.flush().await?;
        let head = read_head(io).await?;
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut res = httparse::Response::new(&mut headers);
        match res.parse(&head) {
            Ok(httparse::Status::Complete(_)) => {}
            _ => return Err(HandshakeError::Malformed("not an HTTP/1.1 response".into())),
        }
        let status = res.code.unwrap_or(0);
        let expected = if hello.discover { 204 } else { 101 };
        if status != expected {
            let reason = header(res.headers, "sluice-refusal")
                .unwrap_or(res.reason.unwrap_or("no reason given"))
                .to_owned();
            return Err(HandshakeError::Refused { status, reason });
        }
        let version = header(res.headers, "sluice-version")
            .and_then(|v| v.parse().ok())
            .filter(|v| hello.versions.contains(v) || hello.discover)
            .ok_or_else(|| HandshakeError::Malformed("no version this agent speaks".into()))?;
        let hub = header(res.headers, "sluice-hub")
            .and_then(parse_hub)
            .ok_or_else(|| HandshakeError::Malformed("no sluice-hub".into()))?;
        let hubs = header(res.headers, "sluice-hubs")
            .map(|h| h.split(',').filter_map(parse_hub).collect())
            .unwrap_or_default();
        let control_key = header(res.headers, CONTROL_KEY)
            .unwrap_or_default()
            .to_owned();
        let instance = header(res.headers, INSTANCE)
            .filter(|i| is_token(i))
            .unwrap_or_default()
            .to_owned();
        Ok(HubHello {
            version,
            hub,
            instance,
            hubs,
            control_key,
        })
    })
    .await
    .map_err(|_| HandshakeError::TimedOut)?
}

// === the hub's side ===

/// What a hub accepts.
#[derive(Clone, Debug)]
pub(crate) struct HubPolicy {
    pub(crate) me: HubInfo,
    /// This process's id, given in every answer.
    pub(crate) instance: String,
    pub(crate) hubs: Vec<HubInfo>,
    /// Accepted tokens; empty: none needed.
    pub(crate) tokens: Vec<String>,
}

/// Constant-time equality, so a token cannot be guessed byte by byte.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// The hub's handshake on `io`, by `deadline`: the agent's hello, then 101
/// or a refusal with its reason (and `Err`).
pub(crate) async fn hub<T>(
    io: &mut T,
    policy: &HubPolicy,
    control_key: &str,
    certified: Option<&sluice_layers::identity::PeerIdentity>,
    deadline: Instant,
) -> Result<(AgentHello, u32), HandshakeError>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    timeout_at(deadline, async {
        let head = read_head(io).await?;
        let hello = match parse_agent(&head, policy).and_then(|hello| bound(hello, certified)) {
            Ok(hello) => hello,
            Err((status, reason)) => {
                refuse(io, status, &reason).await?;
                return Err(HandshakeError::Refused { status, reason });
            }
        };
        let Some(version) = negotiate(&hello.versions) else {
            let reason = format!(
                "no common protocol version: the agent speaks {:?}, this hub {VERSIONS:?}",
                hello.versions
            );
            refuse(io, 426, &reason).await?;
            return Err(HandshakeError::Refused {
                status: 426,
                reason,
            });
        };
        let hubs: Vec<String> = policy.hubs.iter().map(hub_field).collect();
        let res = if hello.discover {
            format!(
                "HTTP/1.1 204 No Content\r\nsluice-version: {version}\r\nsluice-hub: {}\r\n\
                 {INSTANCE}: {}\r\nsluice-hubs: {}\r\nconnection: close\r\n\r\n",
                hub_field(&policy.me),
                policy.instance,
                hubs.join(", ")
            )
        } else {
            format!(
                "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: {UPGRADE}\r\n\
                 sluice-version: {version}\r\nsluice-hub: {}\r\n{INSTANCE}: {}\r\nsluice-hubs: {}\r\n\
                 {CONTROL_KEY}: {control_key}\r\n\r\n",
                hub_field(&policy.me),
                policy.instance,
                hubs.join(", ")
            )
        };
        io.write_all(res.as_bytes()).await?;
        io.flush().await?;
        Ok((hello, version))
    })
    .await
    .map_err(|_| HandshakeError::TimedOut)?
}

/// With a verified agent certificate, the id the agent claims must be one
/// of the certificate's names (its id, URI or DNS SANs, or CN): an agent
/// cannot take another's calls by claiming its id.
fn bound(
    hello: AgentHello,
    certified: Option<&sluice_layers::identity::PeerIdentity>,
) -> Result<AgentHello, (u16, String)> {
    let Some(identity) = certified else {
        return Ok(hello);
    };
    let p = identity.parts();
    let names = std::iter::once(identity.id())
        .chain(p.uris.iter().map(String::as_str))
        .chain(p.dns_names.iter().map(String::as_str))
        .chain(p.common_name.as_deref());
    if names.into_iter().any(|n| n == hello.id) {
        Ok(hello)
    } else {
        Err((
            403,
            "the agent id is not a name of the agent's certificate".to_owned(),
        ))
    }
}

fn parse_agent(head: &[u8], policy: &HubPolicy) -> Result<AgentHello, (u16, String)> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err((400, "not an HTTP/1.1 request".into())),
    }
    let upgrade = header(req.headers, "upgrade").unwrap_or("");
    if !upgrade.eq_ignore_ascii_case(UPGRADE) {
        return Err((400, format!("expected `upgrade: {UPGRADE}`")));
    }
    // The token first: nothing more is said to a peer without one.
    if !policy.tokens.is_empty() {
        let given = header(req.headers, "authorization")
            .and_then(|a| a.strip_prefix("Bearer "))
            .unwrap_or("");
        if !policy.tokens.iter().any(|t| same(t, given)) {
            return Err((401, "bad or missing token".into()));
        }
    }
    let id = header(req.headers, "sluice-agent-id")
        .filter(|id| is_token(id))
        .ok_or((400, "missing or malformed sluice-agent-id".to_owned()))?
        .to_owned();
    let mut identifiers = Identifiers::default();
    for pair in header(req.headers, "sluice-agent-identifiers")
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_encoding::percent_decode_str(value)
            .decode_utf8_lossy()
            .into_owned();
        // Unknown keys are ignored (konnectivity: binary skew fails open).
        match key {
            "host" => identifiers.host.push(value),
            "ipv4" => identifiers.ipv4.push(value),
            "ipv6" => identifiers.ipv6.push(value),
            "default-route" => identifiers.default_route = value == "true",
            _ => {}
        }
    }
    Ok(AgentHello {
        id,
        identifiers,
        versions: versions(header(req.headers, "sluice-versions").unwrap_or("")),
        token: None,
        discover: header(req.headers, "sluice-discover") == Some("true"),
    })
}

async fn refuse<T: AsyncWrite + Unpin>(
    io: &mut T,
    status: u16,
    reason: &str,
) -> std::io::Result<()> {
    let phrase = match status {
        401 => "Unauthorized",
        403 => "Forbidden",
        426 => "Upgrade Required",
        _ => "Bad Request",
    };
    let versions: Vec<String> = VERSIONS.iter().map(u32::to_string).collect();
    let res = format!(
        "HTTP/1.1 {status} {phrase}\r\nsluice-refusal: {reason}\r\nsluice-versions: {}\r\n\
         content-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{reason}\n",
        versions.join(","),
        reason.len() + 1
    );
    io.write_all(res.as_bytes()).await?;
    io.shutdown().await
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn policy(tokens: &[&str]) -> HubPolicy {
        HubPolicy {
            me: HubInfo {
                name: "hub-1".into(),
                group: "hubs".into(),
                generation: 2,
            },
            instance: "p1d".into(),
            hubs: vec![HubInfo {
                name: "hub-2".into(),
                group: "hubs".into(),
                generation: 2,
            }],
            tokens: tokens.iter().map(|t| (*t).to_owned()).collect(),
        }
    }

    fn hello(versions: &[u32], token: Option<&str>) -> AgentHello {
        AgentHello {
            id: "node-1".into(),
            identifiers: Identifiers {
                host: vec!["node-1.local".into()],
                ipv4: vec!["10.0.0.5".into()],
                ipv6: vec![],
                default_route: true,
            },
            versions: versions.to_vec(),
            token: token.map(str::to_owned),
            discover: false,
        }
    }

    async fn run(
        hello: AgentHello,
        policy: HubPolicy,
    ) -> (
        Result<HubHello, HandshakeError>,
        Result<(AgentHello, u32), HandshakeError>,
    ) {
        let (mut a, mut h) = tokio::io::duplex(4096);
        let deadline = Instant::now() + Duration::from_secs(5);
        let agent = async { agent(&mut a, &hello, "hub", deadline).await };
        let hub = async { hub(&mut h, &policy, "k3y", None, deadline).await };
        tokio::join!(agent, hub)
    }

    #[tokio::test]
    async fn the_highest_common_version_and_what_each_side_says_arrive() {
        let (agent, hub) = run(hello(&[1, 7], Some("s3cret")), policy(&["other", "s3cret"])).await;
        let answer = agent.expect("101");
        assert_eq!(answer.version, 1);
        assert_eq!(answer.hub.name, "hub-1");
        assert_eq!(answer.hub.generation, 2);
        assert_eq!(answer.hubs[0].name, "hub-2");
        assert_eq!(answer.control_key, "k3y");
        assert_eq!(answer.instance, "p1d");
        let (seen, version) = hub.expect("accepted");
        assert_eq!(version, 1);
        assert_eq!(seen.id, "node-1");
        assert_eq!(seen.identifiers, hello(&[], None).identifiers);
    }

    #[tokio::test]
    async fn a_version_mismatch_and_a_bad_token_are_refused_with_their_reason() {
        let (agent, hub) = run(hello(&[9], None), policy(&[])).await;
        let err = agent.expect_err("no common version").to_string();
        assert!(
            err.contains("426") && err.contains("no common protocol version"),
            "{err}"
        );
        assert!(hub.is_err());
        let (agent, _) = run(hello(&[1], Some("wrong")), policy(&["s3cret"])).await;
        let err = agent.expect_err("bad token").to_string();
        assert!(err.contains("401") && err.contains("token"), "{err}");
        let (agent, _) = run(hello(&[1], None), policy(&["s3cret"])).await;
        assert!(agent.expect_err("no token").to_string().contains("401"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_stalls_costs_at_most_the_deadline() {
        let (_a, mut h) = tokio::io::duplex(4096);
        let deadline = Instant::now() + Duration::from_secs(10);
        let err = hub(&mut h, &policy(&[]), "k", None, deadline)
            .await
            .expect_err("stalled");
        assert!(matches!(err, HandshakeError::TimedOut));
        assert!(Instant::now() >= deadline);
    }
}
