import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// An IPv4 (4 bytes) or IPv6 (16 bytes) address.
public struct IPAddressBytes: Sendable, Equatable, CustomStringConvertible {
    public var bytes: [UInt8]

    public init(bytes: [UInt8]) { self.bytes = bytes }

    /// Parses a textual IPv4 or IPv6 address.
    public init?(_ text: String) {
        var ipv4 = in_addr()
        var ipv6 = in6_addr()
        if inet_pton(AF_INET, text, &ipv4) == 1 {
            bytes = withUnsafeBytes(of: ipv4) { Array($0) }
        } else if inet_pton(AF_INET6, text, &ipv6) == 1 {
            bytes = withUnsafeBytes(of: ipv6) { Array($0) }
        } else {
            return nil
        }
    }

    public var isIPv6: Bool { bytes.count == 16 }

    public var description: String {
        var buffer = [CChar](repeating: 0, count: Int(INET6_ADDRSTRLEN))
        return bytes.withUnsafeBytes { raw in
            inet_ntop(isIPv6 ? AF_INET6 : AF_INET, raw.baseAddress, &buffer, socklen_t(buffer.count))
            return String(cString: buffer)
        }
    }

    /// The IPv4 address an IPv6 address carries: IPv4-mapped, -compatible
    /// or -translated, NAT64 (well-known prefix) or 6to4.
    public var embeddedIPv4: IPAddressBytes? {
        guard isIPv6 else { return nil }
        if IPNetwork.embeddingLastFour.contains(where: { $0.contains(self) }) {
            return IPAddressBytes(bytes: Array(bytes[12...]))
        }
        if IPNetwork.sixToFour.contains(self) { return IPAddressBytes(bytes: Array(bytes[2..<6])) }
        return nil
    }

    /// What kind of non-public address this is, or nil for a public one.
    /// An IPv6 address is public only in global unicast (2000::/3) outside
    /// the special blocks; one that carries an IPv4 address is what that
    /// address is.
    public var specialUse: String? {
        if let kind = IPNetwork.special.first(where: { $0.network.contains(self) })?.kind { return kind }
        if let ipv4 = embeddedIPv4 { return ipv4.specialUse }
        if isIPv6, !IPNetwork.globalUnicast.contains(self) { return "non-global (outside 2000::/3)" }
        return nil
    }
}

/// An address range in CIDR form.
public struct IPNetwork: Sendable, Equatable {
    public var address: IPAddressBytes
    public var prefixLength: Int

    /// Parses `ADDRESS/PREFIX`, or a lone address (a network of one).
    public init?(_ text: String) {
        let parts = text.split(separator: "/", maxSplits: 1, omittingEmptySubsequences: false).map(String.init)
        guard let first = parts.first, let address = IPAddressBytes(first) else { return nil }
        let maximum = address.bytes.count * 8
        let length = parts.count == 2 ? (parts[1].utf8.allSatisfy { (0x30...0x39).contains($0) } ? Int(parts[1]) : nil) : maximum
        guard let length, (0...maximum).contains(length) else { return nil }
        self.address = address
        self.prefixLength = length
    }

    public func contains(_ other: IPAddressBytes) -> Bool {
        guard other.bytes.count == address.bytes.count else { return false }
        var remaining = prefixLength
        for (mine, theirs) in zip(address.bytes, other.bytes) where remaining > 0 {
            let bits = min(8, remaining)
            let mask = UInt8(truncatingIfNeeded: 0xFF << (8 - bits))
            if mine & mask != theirs & mask { return false }
            remaining -= bits
        }
        return true
    }

    /// Prefixes whose addresses carry an IPv4 address in their last four
    /// bytes: IPv4-mapped, IPv4-translated (SIIT), IPv4-compatible
    /// (deprecated; `::` and `::1` are matched first) and NAT64.
    static let embeddingLastFour = ["::ffff:0:0/96", "::ffff:0:0:0/96", "::/96", "64:ff9b::/96"].compactMap(IPNetwork.init)
    /// 6to4: the IPv4 address is in bytes 2 to 5.
    static let sixToFour = IPNetwork("2002::/16")!
    static let globalUnicast = IPNetwork("2000::/3")!

    /// Ranges that are not the public internet (RFC 6890 and friends).
    static let special: [(network: IPNetwork, kind: String)] = [
        ("0.0.0.0/8", "unspecified"), ("10.0.0.0/8", "private"), ("100.64.0.0/10", "carrier-grade NAT"),
        ("127.0.0.0/8", "loopback"), ("169.254.0.0/16", "link-local (cloud metadata)"), ("172.16.0.0/12", "private"),
        ("192.0.0.0/24", "IETF protocol"), ("192.0.2.0/24", "documentation"), ("192.168.0.0/16", "private"),
        ("198.18.0.0/15", "benchmarking"), ("198.51.100.0/24", "documentation"), ("203.0.113.0/24", "documentation"),
        ("224.0.0.0/4", "multicast"), ("240.0.0.0/4", "reserved"), ("192.88.99.0/24", "6to4 relay anycast"),
        ("::/128", "unspecified"), ("::1/128", "loopback"), ("64:ff9b:1::/48", "local-use NAT64"), ("100::/64", "discard"),
        ("2001::/23", "IETF protocol (Teredo, benchmarking, ORCHID)"), ("2001:db8::/32", "documentation"),
        ("3fff::/20", "documentation"), ("5f00::/16", "SRv6"), ("fc00::/7", "unique local (private)"), ("fe80::/10", "link-local"),
        ("fec0::/10", "site-local"), ("ff00::/8", "multicast"),
    ].compactMap { network, kind in IPNetwork(network).map { ($0, kind) } }
}
