import CLibvirt
import Foundation

/// A libvirt storage pool, identified by name.
public struct StoragePool: Sendable, Hashable {
    public let connection: Connection
    public let name: String

    public static func == (lhs: StoragePool, rhs: StoragePool) -> Bool {
        lhs.connection === rhs.connection && lhs.name == rhs.name
    }

    public func hash(into hasher: inout Hasher) { hasher.combine(name) }

    @discardableResult
    func withPointer<T: Sendable>(
        _ operation: String, _ body: @escaping @Sendable (OpaquePointer) throws -> T
    ) async throws -> T {
        let label = "\(operation) storage pool '\(name)'"
        return try await connection.withPointer { [name] connection in
            let pool = try check(virStoragePoolLookupByName(connection, name), label)
            defer { virStoragePoolFree(pool) }
            return try body(pool)
        }
    }

    /// Rescans the pool's directory for volumes made outside libvirt.
    public func refresh() async throws {
        try await withPointer("refresh") { try check(virStoragePoolRefresh($0, 0), "refresh storage pool '\(name)'") }
    }

    /// The names of the pool's volumes.
    public func volumeNames() async throws -> [String] {
        try await withPointer("list volumes of") { pool in
            var list: UnsafeMutablePointer<OpaquePointer?>?
            let count = try check(virStoragePoolListAllVolumes(pool, &list, 0), "list volumes of storage pool '\(name)'")
            defer { free(list) }
            guard let list else { return [] }
            return (0..<Int(count)).compactMap { index -> String? in
                guard let volume = list[index] else { return nil }
                defer { virStorageVolFree(volume) }
                return virStorageVolGetName(volume).map { String(cString: $0) }
            }
        }
    }

    /// The volume with this name (``LibvirtError/Code/noStorageVolume`` if none).
    public func volume(named volumeName: String) async throws -> StorageVolume {
        try await withPointer("look up volume '\(volumeName)' in") { pool in
            let volume = try check(
                virStorageVolLookupByName(pool, volumeName), "look up volume '\(volumeName)' in storage pool '\(name)'")
            defer { virStorageVolFree(volume) }
            return try StorageVolume(pool: self, pointer: volume)
        }
    }

    /// Creates a qcow2 volume whose reads fall through to `backingPath`
    /// (a base image in `backingFormat`) and whose writes stay in the new
    /// volume. `capacityBytes` is the guest-visible size: at least the base
    /// image's virtual size.
    public func createOverlay(
        name volumeName: String, backingPath: String, backingFormat: String = "qcow2", capacityBytes: UInt64
    ) async throws -> StorageVolume {
        let xml = """
            <volume>
              <name>\(escapeXMLAttribute(volumeName))</name>
              <capacity unit='bytes'>\(capacityBytes)</capacity>
              <target><format type='qcow2'/></target>
              <backingStore>
                <path>\(escapeXMLAttribute(backingPath))</path>
                <format type='\(escapeXMLAttribute(backingFormat))'/>
              </backingStore>
            </volume>
            """
        return try await createVolume(xml: xml)
    }

    /// Creates a volume from volume XML.
    public func createVolume(xml: String) async throws -> StorageVolume {
        try await withPointer("create volume in") { pool in
            let volume = try check(virStorageVolCreateXML(pool, xml, 0), "create volume in storage pool '\(name)'")
            defer { virStorageVolFree(volume) }
            return try StorageVolume(pool: self, pointer: volume)
        }
    }

    /// Stops and undefines the pool; with `deleteDirectory` also removes
    /// its (empty) directory.
    public func remove(deleteDirectory: Bool = false) async throws {
        try await withPointer("remove") { pool in
            if virStoragePoolIsActive(pool) == 1 {
                try check(virStoragePoolDestroy(pool), "stop storage pool '\(name)'")
            }
            // libvirt deletes only the directory of a stopped pool.
            if deleteDirectory {
                try check(virStoragePoolDelete(pool, 0), "delete the directory of storage pool '\(name)'")
            }
            try check(virStoragePoolUndefine(pool), "undefine storage pool '\(name)'")
        }
    }
}

/// A volume in a storage pool.
public struct StorageVolume: Sendable, Hashable {
    public let pool: StoragePool
    public let name: String
    /// The volume's file path on the host.
    public let path: String

    init(pool: StoragePool, pointer: OpaquePointer) throws {
        self.pool = pool
        let cName: UnsafePointer<CChar> = try check(virStorageVolGetName(pointer), "read volume name")
        self.name = String(cString: cName)
        self.path = try check(takeString(virStorageVolGetPath(pointer)), "read path of volume '\(name)'")
    }

    /// Size facts of a volume.
    public struct Info: Sendable, Hashable {
        /// Guest-visible size in bytes.
        public var capacityBytes: UInt64
        /// Bytes the volume occupies on the host.
        public var allocationBytes: UInt64
    }

    @discardableResult
    func withPointer<T: Sendable>(
        _ operation: String, _ body: @escaping @Sendable (OpaquePointer) throws -> T
    ) async throws -> T {
        let label = "\(operation) volume '\(name)'"
        return try await pool.connection.withPointer { [path] connection in
            let volume = try check(virStorageVolLookupByPath(connection, path), label)
            defer { virStorageVolFree(volume) }
            return try body(volume)
        }
    }

    /// Capacity and allocation.
    public func info() async throws -> Info {
        try await withPointer("read info of") { volume in
            var info = virStorageVolInfo()
            try check(virStorageVolGetInfo(volume, &info), "read info of volume '\(name)'")
            return Info(capacityBytes: UInt64(info.capacity), allocationBytes: UInt64(info.allocation))
        }
    }

    /// The volume's XML description (format, backing store, ...).
    public func xml() async throws -> String {
        try await withPointer("describe") { volume in
            try check(takeString(virStorageVolGetXMLDesc(volume, 0)), "describe volume '\(name)'")
        }
    }

    /// Deletes the volume and its file.
    public func delete() async throws {
        try await withPointer("delete") { try check(virStorageVolDelete($0, 0), "delete volume '\(name)'") }
    }
}

extension Connection {
    /// The storage pool with this name (``LibvirtError/Code/noStoragePool`` if none).
    public func storagePool(named name: String) async throws -> StoragePool {
        try await withPointer { connection in
            let pool = try check(virStoragePoolLookupByName(connection, name), "look up storage pool '\(name)'")
            virStoragePoolFree(pool)
            return StoragePool(connection: self, name: name)
        }
    }

    /// The names of all storage pools.
    public func storagePoolNames() async throws -> [String] {
        try await withPointer { connection in
            var list: UnsafeMutablePointer<OpaquePointer?>?
            let count = try check(virConnectListAllStoragePools(connection, &list, 0), "list storage pools")
            defer { free(list) }
            guard let list else { return [] }
            return (0..<Int(count)).compactMap { index -> String? in
                guard let pool = list[index] else { return nil }
                defer { virStoragePoolFree(pool) }
                return virStoragePoolGetName(pool).map { String(cString: $0) }
            }
        }
    }

    /// A directory-backed storage pool at `path`: defined, its directory
    /// made, started and set to autostart. Reuses a pool of that name
    /// (starting it if it is stopped), so it is safe to call on every start.
    public func directoryPool(named name: String, path: String) async throws -> StoragePool {
        let xml = """
            <pool type='dir'>
              <name>\(escapeXMLAttribute(name))</name>
              <target><path>\(escapeXMLAttribute(path))</path></target>
            </pool>
            """
        return try await withPointer { connection in
            var pool = virStoragePoolLookupByName(connection, name)
            if pool == nil {
                let defined = try check(virStoragePoolDefineXML(connection, xml, 0), "define storage pool '\(name)'")
                // Build makes the directory; it fails harmlessly if it exists.
                _ = virStoragePoolBuild(defined, 0)
                pool = defined
            }
            guard let pool else { throw LibvirtError.last("look up storage pool '\(name)'") }
            defer { virStoragePoolFree(pool) }
            if virStoragePoolIsActive(pool) != 1 {
                try check(virStoragePoolCreate(pool, 0), "start storage pool '\(name)'")
            }
            _ = virStoragePoolSetAutostart(pool, 1)
            return StoragePool(connection: self, name: name)
        }
    }
}
