import ArgumentParser
import Foundation
import Libvirt

extension Corral {
    struct Domains: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Inspect the libvirt domains on this host (an admin's view).",
            subcommands: [List.self, Show.self]
        )
    }
}

extension Corral.Domains {
    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "List every domain with its state, size, uptime, addresses and Corral owner.")

        @OptionGroup var libvirt: LibvirtOptions

        @Flag(help: "Print JSON instead of a table.")
        var json = false

        func run() async throws {
            try await libvirt.withConnection { connection in
                var summaries: [DomainSummary] = []
                for domain in try await connection.domains() {
                    do {
                        summaries.append(try await DomainSummary(domain, uri: libvirt.uri))
                    } catch let error as LibvirtError where error.code == .noDomain {
                        continue  // undefined while we were listing
                    }
                }
                summaries.sort { $0.name < $1.name }
                if json {
                    try printJSON(summaries)
                    return
                }
                var table = Table(header: ["NAME", "STATE", "VCPUS", "MEMORY", "UPTIME", "ADDRESSES", "INSTANCE", "APPLIANCE"])
                for summary in summaries {
                    table.rows.append([
                        summary.name,
                        summary.reason.map { "\(summary.state) (\($0))" } ?? summary.state,
                        "\(summary.vcpus)",
                        "\(summary.memoryMiB) MiB",
                        summary.uptimeSeconds.map(formatDuration) ?? "-",
                        summary.addresses.isEmpty ? "-" : summary.addresses.joined(separator: ","),
                        summary.instance?.instance ?? "-",
                        summary.instance?.appliance ?? "-",
                    ])
                }
                print(table.render())
            }
        }
    }

    struct Show: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Show one domain in full, with the tail of its serial console log.")

        @OptionGroup var libvirt: LibvirtOptions

        @Argument(help: "The domain's name.")
        var name: String

        @Option(help: "How many lines of the console log to show.")
        var consoleLines = 20

        @Flag(help: "Print JSON.")
        var json = false

        func validate() throws {
            guard consoleLines >= 0 else {
                throw ValidationError("--console-lines must be 0 or more (it was \(consoleLines)).")
            }
        }

        func run() async throws {
            try await libvirt.withConnection { connection in
                let domain = try await connection.domain(named: name)
                let detail = try await DomainDetail(domain, uri: libvirt.uri, consoleLines: consoleLines)
                if json {
                    try printJSON(detail)
                } else {
                    print(detail.render())
                }
            }
        }
    }
}

/// One row of `corral domains list`.
struct DomainSummary: Encodable {
    var name: String
    var uuid: String
    var state: String
    var reason: String?
    var vcpus: Int
    var memoryMiB: UInt64
    var uptimeSeconds: Int?
    var addresses: [String]
    var instance: InstanceMetadata?

    enum CodingKeys: String, CodingKey {
        case name, uuid, state, reason, vcpus, uptimeSeconds, addresses, instance
        case memoryMiB = "memoryMib"
    }

    init(_ domain: Domain, uri: String) async throws {
        let info = try await domain.info()
        let description = try await domain.describe()
        name = domain.name
        uuid = domain.uuid.uuidString.lowercased()
        state = info.state.name
        reason = info.state.reason
        vcpus = info.vcpus
        memoryMiB = info.maxMemoryKiB / 1024
        uptimeSeconds = info.state.isActive ? uptime(of: domain.name, uri: uri) : nil
        addresses = info.state.isActive
            ? try await domain.interfaceAddresses().flatMap { $0.addresses.map(\.address) } : []
        instance = description.instance
    }
}

/// Everything `corral domains show` prints.
struct DomainDetail: Encodable {
    var summary: DomainSummary
    var persistent: Bool
    var autostart: Bool
    var virtType: String
    var cpuTimeSeconds: Double
    var disks: [DomainDescription.Disk]
    var interfaces: [DomainDescription.Interface]
    var interfaceAddresses: [InterfaceAddresses]
    var consoleLog: String?
    var consoleTail: [String]

    init(_ domain: Domain, uri: String, consoleLines: Int) async throws {
        summary = try await DomainSummary(domain, uri: uri)
        let info = try await domain.info()
        let description = try await domain.describe()
        persistent = try await domain.isPersistent()
        autostart = persistent ? try await domain.autostart() : false
        virtType = description.virtType
        cpuTimeSeconds = Double(info.cpuTimeNanoseconds) / 1e9
        disks = description.disks
        interfaces = description.interfaces
        interfaceAddresses = info.state.isActive ? try await domain.interfaceAddresses() : []
        consoleLog = description.consoleLogPath
        consoleTail = description.consoleLogPath.map { tailLines(ofFile: $0, count: consoleLines) } ?? []
    }

    func render() -> String {
        var lines: [String] = []
        func field(_ label: String, _ value: String) {
            lines.append(label.padding(toLength: 14, withPad: " ", startingAt: 0) + value)
        }
        field("Name:", summary.name)
        field("UUID:", summary.uuid)
        field("State:", summary.reason.map { "\(summary.state) (\($0))" } ?? summary.state)
        field("Persistent:", persistent ? "yes" : "no")
        field("Autostart:", autostart ? "yes" : "no")
        field("Type:", virtType)
        field("vCPUs:", "\(summary.vcpus)")
        field("Memory:", "\(summary.memoryMiB) MiB")
        field("CPU time:", String(format: "%.1f s", cpuTimeSeconds))
        field("Uptime:", summary.uptimeSeconds.map(formatDuration) ?? "-")
        if let instance = summary.instance {
            field("Instance:", instance.instance)
            field("Appliance:", instance.appliance)
            if let pool = instance.pool { field("Pool:", pool) }
            if let expires = instance.leaseExpires { field("Lease ends:", expires.formatted(.iso8601)) }
        }
        for disk in disks {
            let format = disk.format.map { " (\($0))" } ?? ""
            field("Disk \(disk.target):", "\(disk.source ?? "-")\(format)\(disk.device == "disk" ? "" : " [\(disk.device)]")")
        }
        for interface in interfaces {
            let source = interface.source.map { " \($0)" } ?? ""
            field("NIC:", "\(interface.type)\(source) \(interface.macAddress ?? "") \(interface.model ?? "")")
        }
        for interface in interfaceAddresses {
            let addresses = interface.addresses.map(\.description).joined(separator: ", ")
            field("Addresses:", "\(interface.name) \(addresses) (from \(interface.source.rawValue))")
        }
        if let consoleLog {
            field("Console log:", consoleLog)
            if !consoleTail.isEmpty {
                lines.append("--- last \(consoleTail.count) console lines ---")
                lines += consoleTail
            }
        }
        return lines.joined(separator: "\n")
    }
}

/// Seconds since the domain's QEMU process started, for a domain on the
/// local system QEMU driver (from its pid file); nil elsewhere.
func uptime(of name: String, uri: String) -> Int? {
    guard uri == "qemu:///system" || uri == "qemu:///session" else { return nil }
    let pidFile = uri == "qemu:///system" ? "/run/libvirt/qemu/\(name).pid" : "\(NSHomeDirectory())/.cache/libvirt/qemu/run/\(name).pid"
    guard let attributes = try? FileManager.default.attributesOfItem(atPath: pidFile),
        let started = attributes[.modificationDate] as? Date
    else { return nil }
    return max(0, Int(Date().timeIntervalSince(started)))
}

/// `3d 4h`, `2h 5m`, `4m 10s`, `12s`.
func formatDuration(_ seconds: Int) -> String {
    let days = seconds / 86400, hours = seconds / 3600 % 24, minutes = seconds / 60 % 60, rest = seconds % 60
    if days > 0 { return "\(days)d \(hours)h" }
    if hours > 0 { return "\(hours)h \(minutes)m" }
    if minutes > 0 { return "\(minutes)m \(rest)s" }
    return "\(rest)s"
}

/// The last `count` lines of a text file, reading at most its last 256 KiB.
func tailLines(ofFile path: String, count: Int) -> [String] {
    guard count > 0, let handle = FileHandle(forReadingAtPath: path) else { return [] }
    defer { try? handle.close() }
    let size = (try? handle.seekToEnd()) ?? 0
    let window: UInt64 = 256 * 1024
    try? handle.seek(toOffset: size > window ? size - window : 0)
    let data = (try? handle.readToEnd()) ?? Data()
    var lines = String(decoding: data, as: UTF8.self)
        .replacingOccurrences(of: "\r", with: "")
        .split(separator: "\n", omittingEmptySubsequences: false)
        .map(String.init)
    if lines.last == "" { lines.removeLast() }
    return Array(lines.suffix(count))
}
