import Foundation

#if canImport(FoundationXML)
import FoundationXML
#endif

/// What Corral records inside a domain's `<metadata>`, so `virsh dumpxml`
/// and `corral domains list` show whose VM it is.
public struct InstanceMetadata: Sendable, Hashable, Codable {
    /// The XML namespace of Corral's metadata element.
    public static let namespace = "https://corral.dev/xmlns/instance/1"
    /// The element prefix libvirt writes for that namespace.
    public static let prefix = "corral"

    /// The pool's name for the instance.
    public var instance: String
    /// The appliance (agent) that runs it.
    public var appliance: String
    /// The pool controller's URL.
    public var pool: String?
    /// When the lease ends, if it does.
    public var leaseExpires: Date?

    public init(instance: String, appliance: String, pool: String? = nil, leaseExpires: Date? = nil) {
        self.instance = instance
        self.appliance = appliance
        self.pool = pool
        self.leaseExpires = leaseExpires
    }

    /// The element as libvirt stores it (the namespace is added by libvirt).
    public func render() -> String { "<instance \(attributes)/>" }

    /// The element as it stands inside a domain definition's `<metadata>`:
    /// prefixed, with its namespace declared.
    public func renderForDomainXML() -> String {
        "<\(Self.prefix):instance xmlns:\(Self.prefix)='\(Self.namespace)' \(attributes)/>"
    }

    private var attributes: String {
        var attributes = [("instance", instance), ("appliance", appliance)]
        if let pool { attributes.append(("pool", pool)) }
        if let leaseExpires {
            attributes.append(("lease-expires", leaseExpires.formatted(.iso8601)))
        }
        return attributes.map { "\($0.0)=\"\(escapeXMLAttribute($0.1))\"" }.joined(separator: " ")
    }

    /// Parses the element libvirt returns; nil when it is not Corral's.
    public init?(xml: String) {
        guard let document = try? XMLDocument(xmlString: xml, options: []),
            let element = document.rootElement(), element.localName == "instance"
        else { return nil }
        self.init(element: element)
    }

    init?(element: XMLElement) {
        guard let instance = element.attribute(forName: "instance")?.stringValue,
            let appliance = element.attribute(forName: "appliance")?.stringValue
        else { return nil }
        self.instance = instance
        self.appliance = appliance
        self.pool = element.attribute(forName: "pool")?.stringValue
        self.leaseExpires = element.attribute(forName: "lease-expires")?.stringValue
            .flatMap { try? Date($0, strategy: .iso8601) }
    }
}

/// `value` with the five XML special characters escaped, for element text
/// and attribute values in domain, volume and pool XML.
public func escapeXMLAttribute(_ value: String) -> String {
    var escaped = ""
    for character in value {
        switch character {
        case "&": escaped += "&amp;"
        case "<": escaped += "&lt;"
        case ">": escaped += "&gt;"
        case "\"": escaped += "&quot;"
        case "'": escaped += "&apos;"
        default: escaped.append(character)
        }
    }
    return escaped
}
