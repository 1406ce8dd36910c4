import CLibvirt
import Foundation

extension Connection {
    /// The host's capabilities XML (`virsh capabilities`).
    public func capabilities() async throws -> String {
        try await withPointer { connection in
            try check(takeString(virConnectGetCapabilities(connection)), "read host capabilities")
        }
    }

    /// The domain capabilities XML (`virsh domcapabilities`) for one
    /// virtualisation type (`kvm`, `qemu`), architecture and machine.
    public func domainCapabilities(
        virtType: String? = nil, arch: String? = nil, machine: String? = nil
    ) async throws -> String {
        try await withPointer { connection in
            try check(
                takeString(virConnectGetDomainCapabilities(connection, nil, arch, machine, virtType, 0)),
                "read domain capabilities for \(virtType ?? "the default type")")
        }
    }

    /// The host's CPUs and memory.
    public func nodeInfo() async throws -> NodeInfo {
        try await withPointer { connection in
            var info = virNodeInfo()
            try check(virNodeGetInfo(connection, &info), "read node info")
            let model = withUnsafeBytes(of: info.model) { bytes in
                String(decoding: bytes.prefix { $0 != 0 }, as: UTF8.self)
            }
            return NodeInfo(
                model: model, memoryKiB: UInt64(info.memory), cpus: Int(info.cpus), mhz: Int(info.mhz),
                numaNodes: Int(info.nodes), sockets: Int(info.sockets), cores: Int(info.cores),
                threads: Int(info.threads))
        }
    }

    /// The host name of the libvirt host.
    public func hostname() async throws -> String {
        try await withPointer { connection in
            try check(takeString(virConnectGetHostname(connection)), "read host name")
        }
    }

    /// The libvirt library version on the host, e.g. `9.0.0`.
    public func libvirtVersion() async throws -> String {
        try await withPointer { connection in
            var version: UInt = 0
            try check(virConnectGetLibVersion(connection, &version), "read libvirt version")
            return formatVersion(version)
        }
    }

    /// The hypervisor's version (QEMU's, for the QEMU driver), e.g. `7.2.0`.
    public func hypervisorVersion() async throws -> String {
        try await withPointer { connection in
            var version: UInt = 0
            try check(virConnectGetVersion(connection, &version), "read hypervisor version")
            return formatVersion(version)
        }
    }
}

private func formatVersion(_ version: UInt) -> String {
    "\(version / 1_000_000).\(version / 1000 % 1000).\(version % 1000)"
}

extension Connection {
    /// Every domain, running or defined.
    public func domains() async throws -> [Domain] {
        try await withPointer { connection in
            var list: UnsafeMutablePointer<OpaquePointer?>?
            let count = try check(virConnectListAllDomains(connection, &list, 0), "list domains")
            defer { free(list) }
            guard let list else { return [] }
            return (0..<Int(count)).compactMap { index -> Domain? in
                guard let pointer = list[index] else { return nil }
                defer { virDomainFree(pointer) }
                return Domain(connection: self, pointer: pointer)
            }
        }
    }

    /// The domain with this name. Throws ``LibvirtError`` with code
    /// ``LibvirtError/Code/noDomain`` when there is none.
    public func domain(named name: String) async throws -> Domain {
        try await withPointer { connection in
            let pointer = try check(virDomainLookupByName(connection, name), "look up domain '\(name)'")
            defer { virDomainFree(pointer) }
            return try check(Domain(connection: self, pointer: pointer), "look up domain '\(name)'")
        }
    }

    /// The domain with this UUID (``LibvirtError/Code/noDomain`` if none).
    public func domain(uuid: UUID) async throws -> Domain {
        try await withPointer { connection in
            let pointer = try check(
                virDomainLookupByUUIDString(connection, uuid.uuidString.lowercased()),
                "look up domain \(uuid.uuidString.lowercased())")
            defer { virDomainFree(pointer) }
            return try check(Domain(connection: self, pointer: pointer), "look up domain \(uuid)")
        }
    }

    /// Defines a persistent domain from XML (or updates the definition of
    /// the domain with the same name and UUID). libvirt's parser message is
    /// surfaced on invalid XML.
    public func defineDomain(xml: String) async throws -> Domain {
        try await withPointer { connection in
            let pointer = try check(virDomainDefineXML(connection, xml), "define domain")
            defer { virDomainFree(pointer) }
            return try check(Domain(connection: self, pointer: pointer), "define domain")
        }
    }

    /// Creates and starts a transient domain, gone when it stops.
    public func createTransientDomain(xml: String) async throws -> Domain {
        try await withPointer { connection in
            let pointer = try check(virDomainCreateXML(connection, xml, 0), "create transient domain")
            defer { virDomainFree(pointer) }
            return try check(Domain(connection: self, pointer: pointer), "create transient domain")
        }
    }
}
