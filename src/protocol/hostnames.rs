//! Listeners that share a public port by host name, on the wire.
//!
//! `ListenerSpec` is frozen (see [`super::datagram`] for the same problem with UDP), so a
//! listener with `hostnames` is pushed with [`ROUTE_MARKER`] as the first entry of
//! `clients.except` and its names, space-separated, as the second. A gateway that routes by
//! host name strips both; a gateway that does not parses the marker as an address pattern,
//! fails, and answers that listener alone `Failed` with the marker's text: such a gateway never
//! opens a shared-port listener as a plain one (which would take the port from the others), and
//! the agent's log says why. No protocol version is spent on it.

/// The first `except` entry of a listener with host names. It contains no `*`, `/` or `-`, so
/// a gateway without host routing reports it whole as an "invalid address pattern".
pub const ROUTE_MARKER: &str =
    "hostnames: this gateway does not share ports by host name, upgrade it";

/// Puts `names` (normalized, none containing a space) in front of a listener's exceptions.
pub fn mark(names: &[String], except: &mut Vec<String>) {
    if names.is_empty() {
        return;
    }
    except.insert(0, names.join(" "));
    except.insert(0, ROUTE_MARKER.to_string());
}

/// The host names of a pushed listener (empty: a plain one) and its real client exceptions.
/// A marker without its names entry is no names at all (and fails as a pattern).
pub fn split(except: &[String]) -> (Vec<String>, &[String]) {
    match except {
        [marker, names, rest @ ..] if marker == ROUTE_MARKER => (
            names
                .split(' ')
                .filter(|n| !n.is_empty())
                .map(crate::peek::normalize)
                .collect(),
            rest,
        ),
        _ => (Vec::new(), except),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_travel_in_front_of_the_rules_and_fail_on_an_older_gateway() {
        let mut except = vec!["10.0.0.1".to_string()];
        let names = vec![
            "a.example".to_string(),
            "*.b.example".to_string(),
            "*".to_string(),
        ];
        mark(&names, &mut except);
        let (got, rest) = split(&except);
        assert_eq!(got, names);
        assert_eq!(rest, &["10.0.0.1".to_string()]);
        let err =
            crate::access::AccessRules::parse(crate::access::Policy::Allow, &except).unwrap_err();
        assert!(err.contains(ROUTE_MARKER), "{err}");
        assert_eq!(split(&except[2..]).0, Vec::<String>::new());
    }
}
