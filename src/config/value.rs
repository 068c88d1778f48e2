//! Config value types that check themselves while they are read, so that a
//! bad value is reported at its own line and column.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Deserializer, de};

/// An HTTP/2 flow-control window: 1 ..= 2^31 − 1 bytes (RFC 9113 §6.9.1).
/// Written as an integer or a size string (`"1MiB"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowSize(pub u32);

/// A byte count written as an integer or a size string (`"16KiB"`, `"4MiB"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteSize(pub u32);

/// A `host:port` address (the host may be a name, resolved when
/// dialling), or `unix:/path` for a Unix domain socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPort {
    /// The host; for a Unix socket, its path.
    host: String,
    port: u16,
    unix: bool,
}

pub(super) const MAX_WINDOW: u64 = (1 << 31) - 1;

// === impl HostPort ===

impl HostPort {
    /// The host part (a name, an IPv4 address, or an IPv6 address without
    /// brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port (0 for a Unix socket).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The path, for a Unix domain socket (`unix:/path`).
    pub fn unix_path(&self) -> Option<&std::path::Path> {
        self.unix.then(|| std::path::Path::new(&self.host))
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.unix {
            write!(f, "unix:{}", self.host)
        } else if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl From<std::net::SocketAddr> for HostPort {
    fn from(addr: std::net::SocketAddr) -> Self {
        Self {
            host: addr.ip().to_string(),
            port: addr.port(),
            unix: false,
        }
    }
}

impl FromStr for HostPort {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix:") {
            if !path.starts_with('/') {
                return Err(format!("a Unix socket path must be absolute, got {s:?}"));
            }
            return Ok(Self {
                host: path.to_owned(),
                port: 0,
                unix: true,
            });
        }
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("expected host:port, got {s:?}"))?;
        let port: u16 = port.parse().map_err(|_| format!("invalid port in {s:?}"))?;
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if host.is_empty() || (host.contains(':') && host.parse::<std::net::Ipv6Addr>().is_err()) {
            return Err(format!("invalid host in {s:?}"));
        }
        Ok(Self {
            host: host.to_owned(),
            port,
            unix: false,
        })
    }
}

impl<'de> Deserialize<'de> for HostPort {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(de::Error::custom)
    }
}

// === sizes ===

#[derive(Deserialize)]
#[serde(untagged)]
enum RawSize {
    Int(i64),
    Text(String),
}

fn parse_size(raw: RawSize) -> Result<u64, String> {
    match raw {
        RawSize::Int(n) => u64::try_from(n).map_err(|_| format!("must not be negative, got {n}")),
        RawSize::Text(s) => {
            let t = s.trim();
            let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
            let (digits, unit) = t.split_at(split);
            let n: u64 = digits
                .parse()
                .map_err(|_| format!("expected a size like \"64KiB\", got {s:?}"))?;
            let scale = match unit.trim() {
                "" | "B" => 1,
                "KiB" => 1 << 10,
                "MiB" => 1 << 20,
                "GiB" => 1 << 30,
                other => {
                    return Err(format!(
                        "unknown size unit {other:?} (use B, KiB, MiB or GiB)"
                    ));
                }
            };
            n.checked_mul(scale)
                .ok_or_else(|| format!("{s:?} is too large"))
        }
    }
}

impl<'de> Deserialize<'de> for WindowSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = parse_size(RawSize::deserialize(d)?).map_err(de::Error::custom)?;
        if n == 0 || n > MAX_WINDOW {
            return Err(de::Error::custom(format!(
                "a window must be between 1 and {MAX_WINDOW} bytes, got {n}"
            )));
        }
        Ok(Self(u32::try_from(n).expect("checked against MAX_WINDOW")))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = parse_size(RawSize::deserialize(d)?).map_err(de::Error::custom)?;
        u32::try_from(n)
            .map(Self)
            .map_err(|_| de::Error::custom(format!("{n} bytes is more than 4 GiB")))
    }
}

impl<'de> Deserialize<'de> for super::FrameSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = parse_size(RawSize::deserialize(d)?).map_err(de::Error::custom)?;
        if !(16_384..=16_777_215).contains(&n) {
            return Err(de::Error::custom(format!(
                "max_frame_size must be between 16384 and 16777215 (RFC 9113 §6.5.2), got {n}"
            )));
        }
        Ok(Self(u32::try_from(n).expect("checked range")))
    }
}

/// Durations written as `"250ms"`, `"1s"`, `"5m"`, `"2h"`.
pub(super) mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, de};

    pub(crate) fn parse(s: &str) -> Result<Duration, String> {
        let t = s.trim();
        let split = t
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(|| format!("{s:?} needs a unit (ms, s, m or h)"))?;
        let (digits, unit) = t.split_at(split);
        let n: u64 = digits
            .parse()
            .map_err(|_| format!("expected a duration like \"250ms\", got {s:?}"))?;
        match unit.trim() {
            "ms" => Ok(Duration::from_millis(n)),
            "s" => Ok(Duration::from_secs(n)),
            "m" => Ok(Duration::from_secs(n.saturating_mul(60))),
            "h" => Ok(Duration::from_secs(n.saturating_mul(3600))),
            other => Err(format!(
                "unknown duration unit {other:?} (use ms, s, m or h)"
            )),
        }
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        let t = parse(&s).map_err(de::Error::custom)?;
        if t.is_zero() {
            return Err(de::Error::custom("must be more than zero"));
        }
        Ok(t)
    }
}

/// Durations that may be zero (`"0s"` turns a delay off).
pub(super) mod duration_or_zero {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, de};

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        super::duration::parse(&s).map_err(de::Error::custom)
    }
}

/// Counts that must be at least one.
pub(super) mod positive {
    use serde::{Deserialize, Deserializer, de};

    pub(crate) fn deserialize<'de, D, T>(d: D) -> Result<T, D::Error>
    where
        D: Deserializer<'de>,
        T: Deserialize<'de> + PartialEq + Default,
    {
        let n = T::deserialize(d)?;
        if n == T::default() {
            return Err(de::Error::custom("must be at least 1"));
        }
        Ok(n)
    }

    /// [`deserialize`] for a count that may be left out.
    pub(crate) fn optional<'de, D>(d: D) -> Result<Option<usize>, D::Error>
    where
        D: Deserializer<'de>,
    {
        deserialize(d).map(Some)
    }
}

/// A protobuf field path (`"1.2"`).
pub(super) fn field_path<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<sluice_layers::grpc::wire::FieldPath, D::Error> {
    String::deserialize(d)?.parse().map_err(de::Error::custom)
}

/// A gRPC status code by name (`"PERMISSION_DENIED"`) or number.
pub(super) fn grpc_code<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<sluice_layers::grpc::status::Code, D::Error> {
    use sluice_layers::grpc::status::Code;
    let name = String::deserialize(d)?;
    Code::from_name(&name)
        .ok_or_else(|| de::Error::custom(format!("unknown gRPC status code {name:?}")))
}

/// An optional duration (`timeout = "5s"`).
pub(super) fn optional_duration<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<std::time::Duration>, D::Error> {
    duration::deserialize(d).map(Some)
}

/// A regular expression, compiled (and so checked) while the config is read.
pub(super) fn regex<'de, D: Deserializer<'de>>(d: D) -> Result<regex::Regex, D::Error> {
    let pattern = String::deserialize(d)?;
    regex::Regex::new(&pattern).map_err(|e| de::Error::custom(format!("invalid regex: {e}")))
}
