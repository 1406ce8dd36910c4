import Foundation
import PoolAPI

#if canImport(Glibc)
import Glibc
#endif

/// The bounds every number, name, list and text from an appliance or a
/// user is held to where it arrives, before anything is stored or computed
/// from it. Numbers, names and lists outside them are a 400 that names the
/// field and the allowed range. Free text that only describes (console
/// lines, errors, reasons, phase details) is cut to its bound instead, so
/// that a guest printing a long line cannot make its appliance's report,
/// and with it the instance's state, be refused.
///
/// Within these bounds no sum the pool makes of reported numbers can
/// overflow, and every date it stores stays within years 1970 to 9999,
/// which its database can read back.
struct InputBounds: Sendable {
    let limits: PoolConfiguration.Limits

    /// The largest capacity (vCPUs, MiB, GiB) an appliance may report.
    static let maxCapacity = 1 << 40
    /// The most console lines one report may carry, and the longest line kept.
    static let maxConsoleLines = 1000
    static let maxConsoleLineBytes = 1024
    static let maxErrorBytes = 4096
    static let maxShortTextBytes = 256
    static let maxAddresses = 16
    static let maxTimelineEntries = 32
    /// The most action ids one check-in may acknowledge.
    static let maxDone = 10_000
    static let maxAsk = 1_000_000_000
    static let maxTokenBytes = 256
    /// How far from now a reported date may lie: ten years back, and the
    /// longest lease plus a day ahead.
    static let pastWindow: TimeInterval = 10 * 365 * 86_400

    static func refuse(_ field: String, _ reason: String) -> Refusal {
        Refusal(.badRequest, "field '\(field)' \(reason)")
    }

    /// A name of an instance or appliance (see ``ResourceName``).
    static func checkName(_ name: String, field: String) throws {
        if let problem = ResourceName.problem(name) {
            throw refuse(field, "\(problem) (\(ResourceName.pattern)), not '\(name.prefix(80))'")
        }
    }

    static func check(_ value: Int, _ range: ClosedRange<Int>, field: String) throws {
        guard range.contains(value) else {
            throw refuse(field, "must be from \(range.lowerBound) to \(range.upperBound) (it was \(value))")
        }
    }

    static func checkCount(_ count: Int, at most: Int, field: String) throws {
        guard count <= most else { throw refuse(field, "may list at most \(most) entries (it listed \(count))") }
    }

    /// `text` cut to at most `bytes` bytes of UTF-8, on a character boundary.
    static func cut(_ text: String, to bytes: Int) -> String {
        guard text.utf8.count > bytes else { return text }
        var out = ""
        var used = 0
        for character in text {
            let size = character.utf8.count
            guard used + size <= bytes - 3 else { break }
            out.append(character)
            used += size
        }
        return out + "..."
    }

    /// A lease or reservation length a user asks for.
    func checkLease(_ seconds: Int, field: String) throws {
        try Self.check(seconds, 1...limits.maxLeaseSeconds, field: field)
    }

    /// The appliance block every appliance request carries.
    func check(_ block: ApplianceBlock) throws {
        guard block.apitoken.utf8.count <= Self.maxTokenBytes else {
            throw Refusal(.unauthorized, "Token is not valid.")
        }
        if let version = block.version, version.utf8.count > 64 {
            throw Self.refuse("appliance.version", "must be at most 64 bytes")
        }
        if let latitude = block.latitude, !(-90...90).contains(latitude) {
            throw Self.refuse("appliance.latitude", "must be from -90 to 90")
        }
        if let longitude = block.longitude, !(-180...180).contains(longitude) {
            throw Self.refuse("appliance.longitude", "must be from -180 to 180")
        }
    }

    /// A check-in: capacities, the instance summary, acknowledged actions.
    func check(_ request: CheckInRequest) throws {
        let stats = request.stats
        for (field, capacity) in [("vcpus", stats.vcpus), ("memory_mib", stats.memoryMiB), ("disk_gib", stats.diskGiB)] {
            try Self.check(capacity.total, 0...Self.maxCapacity, field: "stats.\(field).total")
            try Self.check(capacity.free, 0...capacity.total, field: "stats.\(field).free")
        }
        try Self.check(stats.running, 0...Self.maxCapacity, field: "stats.running")
        try Self.checkCount(request.instances.count, at: limits.maxInstancesPerAppliance, field: "instances")
        for (index, summary) in request.instances.enumerated() {
            try Self.checkName(summary.name, field: "instances[\(index)].name")
        }
        try Self.checkCount(request.done.count, at: Self.maxDone, field: "done")
        if let index = request.done.firstIndex(where: { $0.utf8.count > 64 }) {
            throw Self.refuse("done[\(index)]", "must be an action id (at most 64 bytes)")
        }
    }

    /// An instance's size, from a report or the catalogue.
    func check(_ flavor: InstanceFlavor, field: String) throws {
        try Self.check(flavor.vcpus, 1...limits.maxVCPUs, field: "\(field).vcpus")
        try Self.check(flavor.memory, 1...limits.maxMemoryMiB, field: "\(field).memory")
        try Self.check(flavor.disk, 0...limits.maxDiskGiB, field: "\(field).disk")
        if let name = flavor.name, name.utf8.count > 64 { throw Self.refuse("\(field).name", "must be at most 64 bytes") }
    }

    /// An instance report, with its free text cut to its bounds.
    func checked(_ report: InstanceReport, at now: Date) throws -> InstanceReport {
        var report = report
        try Self.checkName(report.name, field: "instance.name")
        if let flavor = report.flavor { try check(flavor, field: "instance.flavor") }
        if let ask = report.ask { try Self.check(ask, 0...Self.maxAsk, field: "instance.ask") }
        if let expires = report.expires {
            let earliest = Int(now.timeIntervalSince1970 - Self.pastWindow)
            let latest = Int(now.timeIntervalSince1970) + limits.maxLeaseSeconds + 86_400
            try Self.check(expires, max(0, earliest)...latest, field: "instance.expires")
        }
        if let address = report.address, address.utf8.count > Self.maxShortTextBytes {
            throw Self.refuse("instance.address", "must be at most \(Self.maxShortTextBytes) bytes")
        }
        let addresses = report.ipAddresses ?? []
        try Self.checkCount(addresses.count, at: Self.maxAddresses, field: "instance.ip_addresses")
        for (index, address) in addresses.enumerated() {
            let field = "instance.ip_addresses[\(index)]"
            guard [4, 6].contains(address.version) else { throw Self.refuse("\(field).version", "must be 4 or 6") }
            guard ["public", "private"].contains(address.scope) else {
                throw Self.refuse("\(field).scope", "must be 'public' or 'private'")
            }
            guard Self.isAddress(address.address, version: address.version) else {
                throw Self.refuse("\(field).address", "must be an IPv\(address.version) address")
            }
        }
        if let ssh = report.ssh {
            guard (1...65535).contains(ssh.port) else { throw Self.refuse("instance.ssh.port", "must be from 1 to 65535") }
            guard Self.isAddress(ssh.host, version: 4) || Self.isAddress(ssh.host, version: 6) || Self.isHostName(ssh.host) else {
                throw Self.refuse("instance.ssh.host", "must be an IP address or a DNS name")
            }
        }
        if let applied = report.keysApplied, applied.isEmpty || applied.utf8.count > 64 {
            throw Self.refuse("instance.keys_applied", "must be an action id of 1 to 64 bytes")
        }
        if let lines = report.consoleOutput {
            try Self.checkCount(lines.count, at: Self.maxConsoleLines, field: "instance.console_output")
            report.consoleOutput = lines.map { Self.cut($0, to: Self.maxConsoleLineBytes) }
        }
        report.error = report.error.map { Self.cut($0, to: Self.maxErrorBytes) }
        report.reason = report.reason.map { Self.cut($0, to: Self.maxShortTextBytes) }
        if let timeline = report.timeline {
            try Self.checkCount(timeline.count, at: Self.maxTimelineEntries, field: "instance.timeline")
            let window = (now.timeIntervalSince1970 - Self.pastWindow)...(now.timeIntervalSince1970 + 86_400)
            for (index, entry) in timeline.enumerated() where !window.contains(entry.at) {
                throw Self.refuse("instance.timeline[\(index)].at", "must be a time within ten years before now and a day after")
            }
            report.timeline = timeline.map { entry in
                var entry = entry
                entry.detail = entry.detail.map { Self.cut($0, to: Self.maxShortTextBytes) }
                return entry
            }
        }
        return report
    }

    /// Whether `text` is a DNS name: dot-separated labels of letters,
    /// digits and hyphens, at most 253 bytes.
    static func isHostName(_ text: String) -> Bool {
        let labels = text.split(separator: ".", omittingEmptySubsequences: false)
        return !text.isEmpty && text.utf8.count <= 253
            && labels.allSatisfy { label in
                (1...63).contains(label.utf8.count) && !label.hasPrefix("-") && !label.hasSuffix("-")
                    && label.unicodeScalars.allSatisfy { ($0.isASCII && ($0.properties.isAlphabetic || ("0"..."9").contains($0))) || $0 == "-" }
            }
    }

    /// Whether `text` is an IP address of that version.
    static func isAddress(_ text: String, version: Int) -> Bool {
        var buffer = [UInt8](repeating: 0, count: 16)
        return inet_pton(version == 6 ? AF_INET6 : AF_INET, text, &buffer) == 1
    }
}
