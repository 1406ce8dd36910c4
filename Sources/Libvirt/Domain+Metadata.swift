import CLibvirt
import Foundation

extension Domain {
    /// The custom metadata element stored under `namespace`, or nil.
    public func metadata(namespace: String) async throws -> String? {
        try await withPointer("read metadata of") { domain in
            let type = Int32(VIR_DOMAIN_METADATA_ELEMENT.rawValue)
            if let xml = takeString(virDomainGetMetadata(domain, type, namespace, 0)) { return xml }
            let error = LibvirtError.last("read metadata of domain '\(name)'")
            if error.code == .noDomainMetadata { return nil }
            throw error
        }
    }

    /// Stores `xml` (one element) as metadata under `namespace` with the
    /// element prefix `key`; nil removes it. Written to the live domain and
    /// to its persistent definition, whichever exist.
    public func setMetadata(_ xml: String?, key: String, namespace: String) async throws {
        try await withPointer("set metadata of") { domain in
            let active = virDomainIsActive(domain) == 1
            let persistent = virDomainIsPersistent(domain) == 1
            var flags: UInt32 = 0
            if active { flags |= VIR_DOMAIN_AFFECT_LIVE.rawValue }
            if persistent { flags |= VIR_DOMAIN_AFFECT_CONFIG.rawValue }
            let type = Int32(VIR_DOMAIN_METADATA_ELEMENT.rawValue)
            try check(
                virDomainSetMetadata(domain, type, xml, xml == nil ? nil : key, namespace, flags),
                "set metadata of domain '\(name)'")
        }
    }

    /// Corral's metadata on this domain, or nil for a domain Corral does not own.
    public func instanceMetadata() async throws -> InstanceMetadata? {
        try await metadata(namespace: InstanceMetadata.namespace).flatMap(InstanceMetadata.init(xml:))
    }

    /// Stores Corral's metadata on this domain (nil removes it).
    public func setInstanceMetadata(_ metadata: InstanceMetadata?) async throws {
        try await setMetadata(metadata?.render(), key: InstanceMetadata.prefix, namespace: InstanceMetadata.namespace)
    }
}
