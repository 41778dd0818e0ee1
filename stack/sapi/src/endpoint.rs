//! Socket addresses on the wire: the protobuf form and the fixed 19-byte form used in event records.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use shunt_proto::sapi as pb;

/// Length of an endpoint inside an event record: family, port, 16 address bytes.
pub const PACKED_LEN: usize = 19;

const FAMILY_V4: u8 = 4;
const FAMILY_V6: u8 = 6;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum EndpointError {
    #[error("endpoint is missing")]
    Missing,
    #[error("endpoint address has {0} bytes, expected 4 or 16")]
    BadAddressLength(usize),
    #[error("endpoint port {0} is out of range")]
    BadPort(u32),
    #[error("endpoint family {0} is unknown")]
    BadFamily(u8),
}

pub fn to_proto(addr: SocketAddr) -> pb::Endpoint {
    let ip = match addr.ip() {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    pb::Endpoint {
        ip,
        port: u32::from(addr.port()),
    }
}

pub fn from_proto(ep: Option<&pb::Endpoint>) -> Result<SocketAddr, EndpointError> {
    let ep = ep.ok_or(EndpointError::Missing)?;
    let port = u16::try_from(ep.port).map_err(|_| EndpointError::BadPort(ep.port))?;
    let ip = match ep.ip.len() {
        4 => IpAddr::V4(Ipv4Addr::from(
            <[u8; 4]>::try_from(&ep.ip[..]).expect("length checked"),
        )),
        16 => IpAddr::V6(Ipv6Addr::from(
            <[u8; 16]>::try_from(&ep.ip[..]).expect("length checked"),
        )),
        n => return Err(EndpointError::BadAddressLength(n)),
    };
    Ok(SocketAddr::new(ip, port))
}

pub fn pack(addr: SocketAddr, out: &mut [u8; PACKED_LEN]) {
    out[1..3].copy_from_slice(&addr.port().to_le_bytes());
    match addr.ip() {
        IpAddr::V4(v4) => {
            out[0] = FAMILY_V4;
            out[3..7].copy_from_slice(&v4.octets());
            out[7..].fill(0);
        }
        IpAddr::V6(v6) => {
            out[0] = FAMILY_V6;
            out[3..].copy_from_slice(&v6.octets());
        }
    }
}

pub fn unpack(bytes: &[u8; PACKED_LEN]) -> Result<SocketAddr, EndpointError> {
    let port = u16::from_le_bytes([bytes[1], bytes[2]]);
    let ip = match bytes[0] {
        FAMILY_V4 => IpAddr::V4(Ipv4Addr::new(bytes[3], bytes[4], bytes[5], bytes[6])),
        FAMILY_V6 => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&bytes[3..]);
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        other => return Err(EndpointError::BadFamily(other)),
    };
    Ok(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proto_round_trip_both_families() {
        for addr in ["10.1.2.3:80", "[fd00::1]:65535", "0.0.0.0:0"] {
            let addr: SocketAddr = addr.parse().unwrap();
            assert_eq!(from_proto(Some(&to_proto(addr))), Ok(addr));
        }
    }

    #[test]
    fn proto_rejects_bad_lengths_and_ports() {
        let bad_len = pb::Endpoint {
            ip: vec![1, 2, 3],
            port: 1,
        };
        assert_eq!(
            from_proto(Some(&bad_len)),
            Err(EndpointError::BadAddressLength(3))
        );
        let bad_port = pb::Endpoint {
            ip: vec![1, 2, 3, 4],
            port: 70_000,
        };
        assert_eq!(
            from_proto(Some(&bad_port)),
            Err(EndpointError::BadPort(70_000))
        );
        assert_eq!(from_proto(None), Err(EndpointError::Missing));
    }

    #[test]
    fn packed_round_trip_and_bad_family() {
        for addr in ["192.168.0.1:443", "[::1]:8080"] {
            let addr: SocketAddr = addr.parse().unwrap();
            let mut buf = [0u8; PACKED_LEN];
            pack(addr, &mut buf);
            assert_eq!(unpack(&buf), Ok(addr));
        }
        let mut buf = [0u8; PACKED_LEN];
        buf[0] = 9;
        assert_eq!(unpack(&buf), Err(EndpointError::BadFamily(9)));
    }
}
