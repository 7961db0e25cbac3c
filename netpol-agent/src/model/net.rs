//! CIDRs and ipBlocks. Every address is also seen as a 128-bit key the way the kernel maps see it:
//! IPv6 as is, IPv4 as IPv4-mapped IPv6 (`::ffff:a.b.c.d`, [`netpol_common::v4_mapped`]).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use super::ModelError;

/// The 128-bit map key of an address (IPv4 → IPv4-mapped; IPv4-mapped IPv6 is treated as IPv4).
pub fn key_of(ip: IpAddr) -> u128 {
    match ip.to_canonical() {
        IpAddr::V4(v4) => u128::from_be_bytes(netpol_common::v4_mapped(v4.octets())),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// Keeps the first `bits` bits of `key`.
pub(crate) fn mask(key: u128, bits: u32) -> u128 {
    if bits == 0 {
        0
    } else {
        key & (u128::MAX << (128 - bits.min(128)))
    }
}

/// An IPv4 or IPv6 network; the address has its host bits cleared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

const MAPPED_BASE: u128 = 0xffff << 32;

impl Cidr {
    /// Builds a network, clearing host bits (the API accepts `10.0.0.1/24` and means
    /// `10.0.0.0/24`). IPv4-mapped IPv6 networks are rejected: pods and node addresses of the IPv4
    /// family are IPv4, and Kubernetes never matches them against IPv6 blocks.
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Self, ModelError> {
        let invalid = || ModelError::InvalidCidr { value: format!("{addr}/{prefix}") };
        let addr = match addr {
            IpAddr::V4(v4) if prefix <= 32 => {
                let m = if prefix == 0 { 0 } else { u32::MAX << (32 - prefix) };
                IpAddr::V4(Ipv4Addr::from(u32::from(v4) & m))
            }
            IpAddr::V6(v6) if prefix <= 128 => {
                let masked = mask(u128::from(v6), u32::from(prefix));
                if prefix >= 96 && mask(masked, 96) == MAPPED_BASE {
                    return Err(ModelError::MappedCidr { value: format!("{addr}/{prefix}") });
                }
                IpAddr::V6(Ipv6Addr::from(masked))
            }
            _ => return Err(invalid()),
        };
        Ok(Cidr { addr, prefix })
    }

    /// The single-address network of `ip` (`/32` or `/128`).
    pub fn host(ip: IpAddr) -> Self {
        let ip = ip.to_canonical();
        Cidr { addr: ip, prefix: if ip.is_ipv4() { 32 } else { 128 } }
    }

    /// Network address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// Prefix length in the address's own family.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// The network in the 128-bit key space: `(base, prefix bits)`.
    pub fn key(&self) -> (u128, u32) {
        let p = u32::from(self.prefix);
        match self.addr {
            IpAddr::V4(_) => (key_of(self.addr), netpol_common::V4_MAPPED_PREFIX_BITS + p),
            IpAddr::V6(_) => (key_of(self.addr), p),
        }
    }

    /// Whether `ip` is in this network. Families never mix: an IPv6 block (even `::/0`) does not
    /// contain IPv4 addresses.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        if ip.is_ipv4() != self.addr.is_ipv4() {
            return false;
        }
        let (base, bits) = self.key();
        mask(key_of(ip), bits) == base
    }

    /// Whether `other` is a strict subset of `self`.
    pub fn strictly_contains(&self, other: &Cidr) -> bool {
        other.addr.is_ipv4() == self.addr.is_ipv4()
            && other.prefix > self.prefix
            && self.contains(other.addr)
    }

    /// Whether this IPv6 network contains the whole IPv4-mapped range `::ffff:0:0/96` (its key
    /// would then cover IPv4 addresses, which Kubernetes never matches against IPv6 blocks).
    pub fn covers_v4_mapped(&self) -> bool {
        match self.addr {
            IpAddr::V6(_) => {
                self.prefix <= 96 && mask(MAPPED_BASE, u32::from(self.prefix)) == self.key().0
            }
            IpAddr::V4(_) => false,
        }
    }

    /// The key-space range `::ffff:0:0/96` holding every IPv4 address.
    pub const fn v4_mapped_range() -> (u128, u32) {
        (MAPPED_BASE, netpol_common::V4_MAPPED_PREFIX_BITS)
    }
}

impl FromStr for Cidr {
    type Err = ModelError;

    /// Parses `a.b.c.d/n` or `x::y/n`.
    fn from_str(s: &str) -> Result<Self, ModelError> {
        let invalid = || ModelError::InvalidCidr { value: s.to_string() };
        let (addr, prefix) = s.split_once('/').ok_or_else(invalid)?;
        let addr: IpAddr = addr.parse().map_err(|_| invalid())?;
        if prefix.is_empty() || prefix.len() > 3 || !prefix.bytes().all(|b| b.is_ascii_digit()) {
            return Err(invalid());
        }
        let prefix: u8 = prefix.parse().map_err(|_| invalid())?;
        Cidr::new(addr, prefix).map_err(|e| match e {
            ModelError::MappedCidr { .. } => ModelError::MappedCidr { value: s.to_string() },
            _ => invalid(),
        })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// An `ipBlock` peer: addresses in `cidr` but in none of `except`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpBlock {
    /// `cidr`.
    pub cidr: Cidr,
    /// `except`: strict subsets of `cidr`.
    pub except: Vec<Cidr>,
}

impl IpBlock {
    /// Builds a block. API validation: "Except values will be rejected if they are outside the
    /// cidr range" (each must be a strict subset of `cidr`).
    pub fn new(cidr: Cidr, except: Vec<Cidr>) -> Result<Self, ModelError> {
        if let Some(bad) = except.iter().find(|e| !cidr.strictly_contains(e)) {
            return Err(ModelError::ExceptOutsideCidr { cidr, except: *bad });
        }
        Ok(IpBlock { cidr, except })
    }

    /// Whether `ip` is in the block.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.cidr.contains(ip) && !self.except.iter().any(|e| e.contains(ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parse_and_contains() {
        let cases = [
            ("10.0.0.0/8", "10.1.2.3", true),
            ("10.0.0.1/24", "10.0.0.200", true),
            ("10.0.0.0/24", "10.0.1.1", false),
            ("0.0.0.0/0", "1.2.3.4", true),
            ("0.0.0.0/0", "fd00::1", false),
            ("::/0", "1.2.3.4", false),
            ("::/0", "fd00::1", true),
            ("fd00::/64", "fd00::5", true),
            ("fd00::/64", "fd01::5", false),
            ("1.2.3.4/32", "1.2.3.4", true),
        ];
        for (cidr, addr, want) in cases {
            let c: Cidr = cidr.parse().unwrap();
            assert_eq!(c.contains(ip(addr)), want, "{cidr} {addr}");
        }
    }

    #[test]
    fn invalid_cidrs() {
        for s in ["10.0.0.0/33", "10.0.0.0", "x/8", "fd00::/129", "10.0.0.0/-1", "10.0.0.0/ 8", ""]
        {
            assert!(matches!(s.parse::<Cidr>(), Err(ModelError::InvalidCidr { .. })), "{s}");
        }
        assert!(matches!(
            "::ffff:10.0.0.0/104".parse::<Cidr>(),
            Err(ModelError::MappedCidr { .. })
        ));
    }

    #[test]
    fn keys_and_v4_mapped_cover() {
        let c: Cidr = "10.0.0.0/8".parse().unwrap();
        assert_eq!(c.key().1, 104);
        assert!("::/0".parse::<Cidr>().unwrap().covers_v4_mapped());
        assert!("::/64".parse::<Cidr>().unwrap().covers_v4_mapped());
        assert!(!"fd00::/8".parse::<Cidr>().unwrap().covers_v4_mapped());
        assert!(!c.covers_v4_mapped());
    }

    #[test]
    fn except_must_be_strict_subset() {
        let c: Cidr = "10.0.0.0/16".parse().unwrap();
        let inside: Cidr = "10.0.1.0/24".parse().unwrap();
        let outside: Cidr = "10.1.0.0/24".parse().unwrap();
        assert!(IpBlock::new(c, vec![inside]).is_ok());
        assert!(IpBlock::new(c, vec![outside]).is_err());
        assert!(IpBlock::new(c, vec![c]).is_err());
        let b = IpBlock::new(c, vec![inside]).unwrap();
        assert!(b.contains(ip("10.0.2.1")));
        assert!(!b.contains(ip("10.0.1.1")));
    }
}
