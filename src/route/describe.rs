//! The routes as `sluice check` prints them: one line each.

use crate::config::{
    Config, DEFAULT_GROUP, Fallback, FanoutMode, OnErrorConfig, OverflowConfig, RouteConfig,
    SecondaryConfig, TextMatch,
};

/// One line per route, then the fallback.
pub(crate) fn describe(config: &Config) -> Vec<String> {
    let mut lines: Vec<String> = config
        .routes
        .iter()
        .enumerate()
        .map(|(i, r)| route(i, r))
        .collect();
    lines.push(match config.routing.fallback {
        Fallback::Upstream => {
            format!("otherwise → {DEFAULT_GROUP} ({})", config.upstream.address)
        }
        Fallback::Unimplemented => "otherwise → refuse UNIMPLEMENTED".to_owned(),
    });
    lines
}

fn route(i: usize, r: &RouteConfig) -> String {
    let mut conditions = Vec::new();
    if let Some(m) = &r.method {
        conditions.push(format!("method {m}"));
    }
    if let Some(a) = &r.authority {
        conditions.push(format!("authority {a}"));
    }
    for (k, m) in &r.metadata {
        conditions.push(match m {
            TextMatch::Equals(v) => format!("{k} = {v:?}"),
            TextMatch::Prefix(v) => format!("{k} starts with {v:?}"),
            TextMatch::Regex(re) => format!("{k} matches /{re}/"),
            TextMatch::Present(true) => format!("{k} present"),
            TextMatch::Present(false) => format!("{k} absent"),
        });
    }
    if let Some(f) = &r.field {
        let test = match (&f.equals, &f.prefix, f.int, f.present) {
            (Some(v), ..) => format!("= {v:?}"),
            (None, Some(v), ..) => format!("starts with {v:?}"),
            (None, None, Some(n), _) => format!("= {n}"),
            (None, None, None, Some(false)) => "absent".to_owned(),
            _ => "present".to_owned(),
        };
        conditions.push(format!("first message field {} {test}", f.path));
    }
    let when = if conditions.is_empty() {
        "every call".to_owned()
    } else {
        format!("when {}", conditions.join(" and "))
    };
    let then = match (&r.upstream, &r.refuse, &r.fanout, &r.mirror) {
        (Some(group), ..) => format!("→ {}", group.get_ref()),
        (None, Some(refuse), ..) => format!(
            "→ refuse with grpc-status {} {:?}",
            refuse.code.as_i32(),
            refuse.message
        ),
        (None, None, Some(f), _) => {
            let which = match &f.key {
                Some(k) => format!("the endpoints of {} named by {k}", f.group.get_ref()),
                None => format!("every endpoint of {}", f.group.get_ref()),
            };
            let mode = match f.mode {
                Some(FanoutMode::Merge) => "merged",
                Some(FanoutMode::MergeByArrival) => "merged by arrival",
                Some(FanoutMode::Interleave) => "interleaved",
                None => "merged (interleaved for [fanout] streaming_methods)",
            };
            format!("→ fan out to {which}, replies {mode}")
        }
        (None, None, None, Some(m)) => {
            let secondaries: Vec<String> = m
                .secondaries
                .iter()
                .map(|s| match s {
                    SecondaryConfig::Group(g) => format!("{g} (block, swallow)"),
                    SecondaryConfig::Detailed {
                        upstream,
                        overflow,
                        on_error,
                    } => format!(
                        "{} ({}, {})",
                        upstream,
                        match overflow {
                            OverflowConfig::Block => "block",
                            OverflowConfig::Drop => "drop",
                        },
                        match on_error {
                            OnErrorConfig::Swallow => "swallow",
                            OnErrorConfig::Fail => "fail",
                        }
                    ),
                })
                .collect();
            format!(
                "→ mirror: {} answers, copies to {}",
                m.primary.get_ref(),
                secondaries.join(", ")
            )
        }
        _ => "→ ?".to_owned(),
    };
    let name = r
        .name
        .as_deref()
        .map(|n| format!(" ({n})"))
        .unwrap_or_default();
    let cap = r
        .timeout
        .map(|t| format!(" (deadline capped at {t:?})"))
        .unwrap_or_default();
    let only = r
        .identity
        .as_ref()
        .map(|id| {
            format!(
                " (only for {}; others PERMISSION_DENIED)",
                id.rule().describe()
            )
        })
        .unwrap_or_default();
    format!("route {i}{name}: {when} {then}{cap}{only}")
}
