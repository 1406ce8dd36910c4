/// The host's CPUs and memory, as libvirt reports them.
public struct NodeInfo: Sendable, Hashable, Codable {
    /// CPU model, e.g. `x86_64`.
    public var model: String
    /// Memory in KiB.
    public var memoryKiB: UInt64
    /// Active logical CPUs.
    public var cpus: Int
    /// CPU frequency in MHz.
    public var mhz: Int
    public var numaNodes: Int
    public var sockets: Int
    public var cores: Int
    public var threads: Int

    enum CodingKeys: String, CodingKey {
        case model, cpus, mhz, numaNodes, sockets, cores, threads
        case memoryKiB = "memoryKib"
    }
}

/// A domain's resource figures from `virDomainGetInfo`.
public struct DomainInfo: Sendable, Hashable {
    public var state: DomainState
    /// The most memory the domain may use, in KiB.
    public var maxMemoryKiB: UInt64
    /// Memory in use, in KiB.
    public var memoryKiB: UInt64
    /// Virtual CPUs.
    public var vcpus: Int
    /// CPU time used, in nanoseconds.
    public var cpuTimeNanoseconds: UInt64
}

/// One guest network interface and its addresses.
public struct InterfaceAddresses: Sendable, Hashable, Codable {
    /// Where libvirt learned the addresses.
    public enum Source: String, Sendable, Hashable, Codable {
        case lease, agent, arp
    }

    /// One IP address with its prefix length.
    public struct Address: Sendable, Hashable, Codable, CustomStringConvertible {
        public enum Family: String, Sendable, Hashable, Codable { case ipv4, ipv6 }
        public var family: Family
        public var address: String
        public var prefix: Int
        public var description: String { "\(address)/\(prefix)" }
    }

    /// Interface name as the source reports it (`vnet0`, `eth0`, ...).
    public var name: String
    /// MAC address, when known.
    public var macAddress: String?
    public var addresses: [Address]
    public var source: Source
}
