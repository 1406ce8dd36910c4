import Foundation

#if canImport(FoundationXML)
import FoundationXML
#endif

/// The parts of a domain's XML description an operator looks at.
public struct DomainDescription: Sendable, Hashable {
    /// One disk.
    public struct Disk: Sendable, Hashable, Codable {
        /// Guest device name, e.g. `vda`.
        public var target: String
        /// Host file or volume behind it, if any.
        public var source: String?
        /// Image format from the driver element, e.g. `qcow2`.
        public var format: String?
        /// `disk` or `cdrom`.
        public var device: String
    }

    /// One network interface.
    public struct Interface: Sendable, Hashable, Codable {
        /// `network`, `bridge`, `user`, ...
        public var type: String
        public var macAddress: String?
        /// The network or bridge name, when there is one.
        public var source: String?
        public var model: String?
    }

    public var name: String
    public var uuid: String
    /// The virtualisation type, `kvm` or `qemu`.
    public var virtType: String
    public var vcpus: Int?
    /// Maximum memory in KiB.
    public var memoryKiB: UInt64?
    public var disks: [Disk]
    public var interfaces: [Interface]
    /// The file the first serial port or console writes to, when it writes
    /// to a file (or logs to one).
    public var consoleLogPath: String?
    /// Corral's metadata, when the domain carries it.
    public var instance: InstanceMetadata?

    /// Parses a domain XML description.
    public init(xml: String) throws {
        let document: XMLDocument
        do {
            document = try XMLDocument(xmlString: xml, options: [])
        } catch {
            throw LibvirtError(operation: "parse domain XML", code: .xmlError, message: "\(error)")
        }
        func strings(_ path: String) -> [String] {
            ((try? document.nodes(forXPath: path)) ?? []).compactMap { $0.stringValue }
        }
        func string(_ path: String) -> String? { strings(path).first }

        name = string("/domain/name") ?? ""
        uuid = string("/domain/uuid") ?? ""
        virtType = string("/domain/@type") ?? ""
        vcpus = string("/domain/vcpu").flatMap { Int($0.trimmingCharacters(in: .whitespaces)) }
        memoryKiB = Self.kibibytes(document: document, path: "/domain/memory")

        let diskElements = ((try? document.nodes(forXPath: "/domain/devices/disk")) ?? []).compactMap { $0 as? XMLElement }
        disks = diskElements.map { disk in
            let source = disk.elements(forName: "source").first
            return Disk(
                target: disk.elements(forName: "target").first?.attribute(forName: "dev")?.stringValue ?? "",
                source: source?.attribute(forName: "file")?.stringValue
                    ?? source?.attribute(forName: "volume")?.stringValue
                    ?? source?.attribute(forName: "dev")?.stringValue,
                format: disk.elements(forName: "driver").first?.attribute(forName: "type")?.stringValue,
                device: disk.attribute(forName: "device")?.stringValue ?? "disk")
        }

        let interfaceElements = ((try? document.nodes(forXPath: "/domain/devices/interface")) ?? [])
            .compactMap { $0 as? XMLElement }
        interfaces = interfaceElements.map { interface in
            let source = interface.elements(forName: "source").first
            return Interface(
                type: interface.attribute(forName: "type")?.stringValue ?? "",
                macAddress: interface.elements(forName: "mac").first?.attribute(forName: "address")?.stringValue,
                source: source?.attribute(forName: "network")?.stringValue
                    ?? source?.attribute(forName: "bridge")?.stringValue,
                model: interface.elements(forName: "model").first?.attribute(forName: "type")?.stringValue)
        }

        consoleLogPath =
            string("/domain/devices/serial[@type='file']/source/@path")
            ?? string("/domain/devices/console[@type='file']/source/@path")
            ?? string("/domain/devices/serial/log/@file")
            ?? string("/domain/devices/console/log/@file")

        let metadata = ((try? document.nodes(forXPath: "/domain/metadata/*")) ?? []).compactMap { $0 as? XMLElement }
        instance = metadata.first { $0.uri == InstanceMetadata.namespace }.flatMap(InstanceMetadata.init(element:))
    }

    private static func kibibytes(document: XMLDocument, path: String) -> UInt64? {
        guard let element = (try? document.nodes(forXPath: path))?.first as? XMLElement,
            let value = element.stringValue.flatMap({ UInt64($0.trimmingCharacters(in: .whitespaces)) })
        else { return nil }
        // libvirt writes KiB; hand-written XML may use any of its units.
        let bytesPerUnit: Double =
            switch element.attribute(forName: "unit")?.stringValue?.lowercased() ?? "kib" {
            case "b", "bytes": 1
            case "kb": 1e3
            case "mb": 1e6
            case "gb": 1e9
            case "tb": 1e12
            case "m", "mib": 1_048_576
            case "g", "gib": 1_073_741_824
            case "t", "tib": 1_099_511_627_776
            default: 1024
            }
        return UInt64((Double(value) * bytesPerUnit / 1024).rounded())
    }
}

extension Domain {
    /// The domain's XML description, parsed.
    public func describe(inactive: Bool = false) async throws -> DomainDescription {
        try DomainDescription(xml: try await xml(inactive: inactive))
    }
}
