//! Istio's cluster names: `outbound|PORT|SUBSET|FQDN` and `inbound|PORT|SUBSET|FQDN` (the last
//! two often empty), and the SNI form `outbound_.PORT_.SUBSET_.FQDN`.

use crate::tables::Direction;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IstioClusterName {
    pub direction: Direction,
    pub port: u16,
    pub subset: String,
    pub host: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClusterNameError {
    #[error("not an Istio cluster name")]
    NotIstio,
    #[error("bad port `{0}`")]
    BadPort(String),
    #[error("outbound cluster without a host")]
    NoHost,
}

impl TryFrom<&str> for IstioClusterName {
    type Error = ClusterNameError;

    fn try_from(name: &str) -> Result<Self, Self::Error> {
        let parts: Vec<&str> = if name.contains('|') {
            name.split('|').collect()
        } else if let Some(rest) = name.strip_prefix("outbound_.") {
            // The SNI form: the host itself contains dots, so split only twice.
            let mut it = rest.splitn(3, '.');
            let (port, subset, host) = (
                it.next().unwrap_or_default(),
                it.next().unwrap_or_default(),
                it.next().unwrap_or_default(),
            );
            let strip = |s: &'static str, v: &'_ str| v.strip_suffix(s).map(str::to_owned);
            let port = strip("_", port).ok_or(ClusterNameError::NotIstio)?;
            let subset = strip("_", subset).ok_or(ClusterNameError::NotIstio)?;
            return finish(Direction::Outbound, &port, &subset, host);
        } else {
            return Err(ClusterNameError::NotIstio);
        };
        let [direction, port, subset, host] = parts.as_slice() else {
            return Err(ClusterNameError::NotIstio);
        };
        let direction = match *direction {
            "outbound" => Direction::Outbound,
            "inbound" => Direction::Inbound,
            _ => return Err(ClusterNameError::NotIstio),
        };
        finish(direction, port, subset, host)
    }
}

fn finish(
    direction: Direction,
    port: &str,
    subset: &str,
    host: &str,
) -> Result<IstioClusterName, ClusterNameError> {
    let port = port
        .parse()
        .map_err(|_| ClusterNameError::BadPort(port.to_owned()))?;
    if direction == Direction::Outbound && host.is_empty() {
        return Err(ClusterNameError::NoHost);
    }
    Ok(IstioClusterName {
        direction,
        port,
        subset: subset.to_owned(),
        host: host.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<IstioClusterName, ClusterNameError> {
        IstioClusterName::try_from(s)
    }

    #[test]
    fn istio_forms() {
        assert_eq!(
            parse("outbound|9080|v1|reviews.default.svc.cluster.local"),
            Ok(IstioClusterName {
                direction: Direction::Outbound,
                port: 9080,
                subset: "v1".into(),
                host: "reviews.default.svc.cluster.local".into(),
            })
        );
        assert_eq!(
            parse("inbound|8080||"),
            Ok(IstioClusterName {
                direction: Direction::Inbound,
                port: 8080,
                subset: String::new(),
                host: String::new(),
            })
        );
        assert_eq!(
            parse("inbound|7070|tcplocal|s1tcp.none").unwrap().subset,
            "tcplocal"
        );
        assert_eq!(
            parse("outbound_.9080_.v2_.reviews.default.svc.cluster.local"),
            Ok(IstioClusterName {
                direction: Direction::Outbound,
                port: 9080,
                subset: "v2".into(),
                host: "reviews.default.svc.cluster.local".into(),
            })
        );
        assert_eq!(parse("outbound_.80_._.a.b").unwrap().subset, "");
    }

    #[test]
    fn refusals() {
        for name in [
            "BlackHoleCluster",
            "xds-grpc",
            "sideways|1||a",
            "outbound|1|x",
            "",
        ] {
            assert_eq!(parse(name), Err(ClusterNameError::NotIstio), "{name}");
        }
        assert_eq!(
            parse("outbound|99999||a"),
            Err(ClusterNameError::BadPort("99999".into()))
        );
        assert_eq!(parse("outbound|80||"), Err(ClusterNameError::NoHost));
        assert_eq!(
            parse("outbound_.x_._.h"),
            Err(ClusterNameError::BadPort("x".into()))
        );
    }
}
