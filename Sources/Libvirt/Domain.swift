import CLibvirt
import Foundation

/// A libvirt domain (a virtual machine), identified by its UUID.
///
/// A `Domain` holds no libvirt pointer: each call looks the domain up by
/// UUID on the connection's live handle, so a value stays usable across a
/// reconnect to a restarted libvirtd.
public struct Domain: Sendable, Hashable {
    /// The connection the domain was found on.
    public let connection: Connection
    /// The domain's name.
    public let name: String
    /// The domain's UUID (stable across redefinition and restarts).
    public let uuid: UUID

    init?(connection: Connection, pointer: OpaquePointer) {
        guard let name = virDomainGetName(pointer), let uuid = domainUUID(pointer) else { return nil }
        self.connection = connection
        self.name = String(cString: name)
        self.uuid = uuid
    }

    public static func == (lhs: Domain, rhs: Domain) -> Bool {
        lhs.connection === rhs.connection && lhs.uuid == rhs.uuid
    }

    public func hash(into hasher: inout Hasher) {
        hasher.combine(uuid)
    }

    /// Runs `body` with this domain's pointer on a wrapper thread.
    @discardableResult
    func withPointer<T: Sendable>(
        _ operation: String, _ body: @escaping @Sendable (OpaquePointer) throws -> T
    ) async throws -> T {
        let uuidString = uuid.uuidString.lowercased()
        let label = "\(operation) domain '\(name)'"
        return try await connection.withPointer { connection in
            let domain = try check(virDomainLookupByUUIDString(connection, uuidString), label)
            defer { virDomainFree(domain) }
            return try body(domain)
        }
    }

    // MARK: Lifecycle

    /// Starts (boots) the defined domain.
    public func start() async throws {
        try await withPointer("start") { try check(virDomainCreate($0), "start domain '\(name)'") }
    }

    /// Asks the guest to shut down (ACPI power button or guest agent) and
    /// returns at once; see ``shutdown(timeout:)`` to wait.
    public func requestShutdown() async throws {
        try await withPointer("shut down") { try check(virDomainShutdown($0), "shut down domain '\(name)'") }
    }

    /// How ``shutdown(timeout:)`` ended.
    public enum ShutdownOutcome: Sendable, Hashable {
        /// The guest shut down by itself within the timeout.
        case graceful
        /// The guest did not stop in time and was destroyed.
        case destroyed
        /// The domain was not running.
        case notRunning
    }

    /// Shuts the guest down gracefully, and destroys it if it has not
    /// stopped after `timeout` or cannot be asked at all (a paused guest:
    /// QEMU refuses the request).
    @discardableResult
    public func shutdown(timeout: Duration, pollInterval: Duration = .milliseconds(200)) async throws -> ShutdownOutcome {
        guard try await state().isActive else { return .notRunning }
        do {
            try await requestShutdown()
        } catch let error as LibvirtError where error.code == .operationInvalid {
            guard try await state().isActive else { return .notRunning }
            return try await destroyIfActive()
        }
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            try await Task.sleep(for: pollInterval)
            do {
                if try await !state().isActive { return .graceful }
            } catch let error as LibvirtError where error.code == .noDomain {
                return .graceful  // a transient domain is gone once it stops
            }
        }
        return try await destroyIfActive()
    }

    private func destroyIfActive() async throws -> ShutdownOutcome {
        do {
            try await destroy()
        } catch let error as LibvirtError where error.code == .operationInvalid || error.code == .noDomain {
            // It stopped between the last look and the destroy (a transient
            // domain is gone altogether).
            return .graceful
        }
        return .destroyed
    }

    /// Stops the domain at once, like pulling the plug.
    public func destroy() async throws {
        try await withPointer("destroy") { try check(virDomainDestroy($0), "destroy domain '\(name)'") }
    }

    /// Asks the guest to reboot.
    public func reboot() async throws {
        try await withPointer("reboot") { try check(virDomainReboot($0, 0), "reboot domain '\(name)'") }
    }

    /// Pauses the guest's CPUs (memory stays allocated).
    public func suspend() async throws {
        try await withPointer("suspend") { try check(virDomainSuspend($0), "suspend domain '\(name)'") }
    }

    /// Resumes a paused guest.
    public func resume() async throws {
        try await withPointer("resume") { try check(virDomainResume($0), "resume domain '\(name)'") }
    }

    /// Removes the domain's definition, with its managed-save image,
    /// snapshot and checkpoint metadata and NVRAM where the driver has them.
    /// A running domain keeps running as a transient one.
    public func undefine() async throws {
        try await withPointer("undefine") { domain in
            let flags =
                VIR_DOMAIN_UNDEFINE_MANAGED_SAVE.rawValue | VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA.rawValue
                | VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA.rawValue | VIR_DOMAIN_UNDEFINE_NVRAM.rawValue
            if virDomainUndefineFlags(domain, flags) == 0 { return }
            let error = LibvirtError.last("undefine domain '\(name)'")
            // Drivers without those features refuse the flags; plain undefine
            // is then the same thing.
            guard error.code == .noSupport || error.code == .argumentUnsupported || error.code == .invalidArgument
            else { throw error }
            try check(virDomainUndefine(domain), "undefine domain '\(name)'")
        }
    }

    // MARK: State and facts

    /// The domain's state and libvirt's reason for it.
    public func state() async throws -> DomainState {
        try await withPointer("read state of") { domain in
            var state: Int32 = 0
            var reason: Int32 = 0
            try check(virDomainGetState(domain, &state, &reason, 0), "read state of domain '\(name)'")
            return DomainState(state: state, reason: reason)
        }
    }

    /// vCPUs, memory and CPU time.
    public func info() async throws -> DomainInfo {
        try await withPointer("read info of") { domain in
            var info = virDomainInfo()
            try check(virDomainGetInfo(domain, &info), "read info of domain '\(name)'")
            var state: Int32 = 0
            var reason: Int32 = 0
            try check(virDomainGetState(domain, &state, &reason, 0), "read state of domain '\(name)'")
            return DomainInfo(
                state: DomainState(state: state, reason: reason),
                maxMemoryKiB: UInt64(info.maxMem), memoryKiB: UInt64(info.memory),
                vcpus: Int(info.nrVirtCpu), cpuTimeNanoseconds: UInt64(info.cpuTime))
        }
    }

    /// Whether the domain is persistent (defined) rather than transient.
    public func isPersistent() async throws -> Bool {
        try await withPointer("read persistence of") { domain in
            try check(virDomainIsPersistent(domain), "read persistence of domain '\(name)'") == 1
        }
    }

    /// The domain's XML description; `inactive` gives the definition used
    /// at next boot rather than the live one.
    public func xml(inactive: Bool = false) async throws -> String {
        try await withPointer("describe") { domain in
            let flags = inactive ? VIR_DOMAIN_XML_INACTIVE.rawValue : 0
            return try check(takeString(virDomainGetXMLDesc(domain, flags)), "describe domain '\(name)'")
        }
    }

    /// Whether the domain starts when libvirtd starts.
    public func autostart() async throws -> Bool {
        try await withPointer("read autostart of") { domain in
            var value: Int32 = 0
            try check(virDomainGetAutostart(domain, &value), "read autostart of domain '\(name)'")
            return value != 0
        }
    }

    /// Sets whether the domain starts when libvirtd starts.
    public func setAutostart(_ enabled: Bool) async throws {
        try await withPointer("set autostart of") { domain in
            try check(virDomainSetAutostart(domain, enabled ? 1 : 0), "set autostart of domain '\(name)'")
        }
    }

    /// The guest's network interfaces and IP addresses, from the first
    /// source that knows any: DHCP leases of a libvirt network, the QEMU
    /// guest agent, then the host's ARP table. Empty when none does (as with
    /// user-mode networking).
    public func interfaceAddresses() async throws -> [InterfaceAddresses] {
        try await withPointer("read addresses of") { domain in
            for source in [InterfaceAddresses.Source.lease, .agent, .arp] {
                let found = readInterfaceAddresses(domain, source: source)
                if !found.isEmpty { return found }
            }
            return []
        }
    }
}

private func readInterfaceAddresses(_ domain: OpaquePointer, source: InterfaceAddresses.Source) -> [InterfaceAddresses] {
    let code: UInt32 =
        switch source {
        case .lease: VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE.rawValue
        case .agent: VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT.rawValue
        case .arp: VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_ARP.rawValue
        }
    var interfaces: UnsafeMutablePointer<virDomainInterfacePtr?>?
    // A source that is unavailable (no agent, no network) is an error here,
    // and just means "ask the next one".
    let count = virDomainInterfaceAddresses(domain, &interfaces, code, 0)
    guard count > 0, let interfaces else { return [] }
    defer {
        for index in 0..<Int(count) { virDomainInterfaceFree(interfaces[index]) }
        free(interfaces)
    }
    return (0..<Int(count)).compactMap { index -> InterfaceAddresses? in
        guard let interface = interfaces[index]?.pointee else { return nil }
        let addresses = (0..<Int(interface.naddrs)).compactMap { position -> InterfaceAddresses.Address? in
            guard let entry = interface.addrs?[position], let text = entry.addr else { return nil }
            let family: InterfaceAddresses.Address.Family =
                entry.type == Int32(VIR_IP_ADDR_TYPE_IPV6.rawValue) ? .ipv6 : .ipv4
            return .init(family: family, address: String(cString: text), prefix: Int(entry.prefix))
        }
        return InterfaceAddresses(
            name: interface.name.map { String(cString: $0) } ?? "",
            macAddress: interface.hwaddr.map { String(cString: $0) },
            addresses: addresses, source: source)
    }
}
