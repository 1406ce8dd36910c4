import Foundation
import GRDB
import PoolAPI

/// The embedded default store: one SQLite file in WAL mode (readers never
/// wait for the writer). Migrations run when it opens. Every change is one
/// transaction, so a request that fails leaves nothing half-written.
public final class SQLiteStore: PoolStore {
    private let database: DatabasePool

    /// Opens (creating when missing) the database at `path`.
    public init(path: String) throws {
        do {
            let directory = URL(fileURLWithPath: path).deletingLastPathComponent()
            try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
            var configuration = Configuration()
            configuration.busyMode = .timeout(10)
            database = try DatabasePool(path: path, configuration: configuration)
            try Self.migrator.migrate(database)
        } catch {
            throw PoolError.storage("cannot open the pool database at \(path): \(error)")
        }
    }

    static var migrator: DatabaseMigrator {
        var migrator = DatabaseMigrator()
        migrator.registerMigration("1-users-appliances-flavors") { db in
            try db.create(table: "user") { table in
                table.autoIncrementedPrimaryKey("id")
                table.column("name", .text).notNull().unique()
                table.column("superuser", .boolean).notNull()
                table.column("maxInstances", .integer).notNull()
                table.column("tokenDigest", .text).notNull().unique()
                table.column("createdAt", .datetime).notNull()
            }
            try db.create(table: "appliance") { table in
                table.autoIncrementedPrimaryKey("id")
                table.column("name", .text).notNull().unique()
                table.column("ownerID", .integer).notNull().references("user")
                table.column("enabled", .boolean).notNull()
                table.column("tokenDigest", .text).notNull().unique()
                table.column("version", .text)
                table.column("latitude", .double)
                table.column("longitude", .double)
                table.column("dynamicImages", .boolean).notNull().defaults(to: false)
                table.column("lastSeen", .datetime)
                table.column("createdAt", .datetime).notNull()
            }
            try db.create(table: "flavor") { table in
                table.autoIncrementedPrimaryKey("id")
                table.column("name", .text).notNull().unique()
                table.column("description", .text).notNull()
                table.column("vcpus", .integer).notNull()
                table.column("memory", .integer).notNull()
                table.column("disk", .integer).notNull()
                table.column("networkUp", .integer).notNull()
                table.column("networkDown", .integer).notNull()
                table.column("rate", .integer).notNull()
                table.column("ask", .integer).notNull()
                table.column("hot", .integer).notNull()
                table.column("active", .boolean).notNull()
                // A flavor is its specs: two names for one size are refused.
                table.uniqueKey(["vcpus", "memory", "disk", "networkUp", "networkDown"])
            }
        }
        migrator.registerMigration("2-images-wisps-instances") { db in
            try db.create(table: "image") { table in
                table.autoIncrementedPrimaryKey("id")
                table.column("name", .text).notNull().unique()
                table.column("url", .text).notNull()
                table.column("sha256", .text)
                table.column("diskFormat", .text).notNull()
            }
            try db.create(table: "wisp") { table in
                table.autoIncrementedPrimaryKey("id")
                table.column("name", .text).notNull().unique()
                table.column("ownerID", .integer).notNull().references("user")
                table.column("imageID", .integer).references("image")
                table.column("dynamicImageURL", .text)
                table.column("sshKeys", .text).notNull()
                table.column("postCreate", .text).notNull()
                table.column("callbackURL", .text)
                table.column("isDefault", .boolean).notNull()
                table.column("isSystemDefault", .boolean).notNull()
            }
            try db.create(table: "instance") { table in
                table.autoIncrementedPrimaryKey("id")
                // Names are the pool's identity for instances: one appliance
                // cannot overwrite another's record by reusing a name.
                table.column("name", .text).notNull().unique()
                table.column("applianceID", .integer).notNull().references("appliance")
                table.column("ownerID", .integer).notNull().references("user")
                table.column("wispID", .integer).references("wisp")
                table.column("state", .integer).notNull()
                table.column("flavor", .jsonText)
                table.column("ask", .integer)
                table.column("expires", .datetime)
                table.column("address", .text)
                table.column("ipAddresses", .jsonText).notNull()
                table.column("consoleTail", .jsonText).notNull()
                table.column("createdAt", .datetime).notNull()
                table.column("updatedAt", .datetime).notNull()
            }
        }
        return migrator
    }

    // MARK: Users

    public func addUser(name: String, superuser: Bool, maxInstances: Int, tokenDigest: String) async throws -> User {
        let user = User(name: name, superuser: superuser, maxInstances: maxInstances, createdAt: Date())
        try await write(what: "user", name: name) { db in
            try db.execute(
                sql: "INSERT INTO user (name, superuser, maxInstances, tokenDigest, createdAt) VALUES (?, ?, ?, ?, ?)",
                arguments: [name, superuser, maxInstances, tokenDigest, user.createdAt])
        }
        return user
    }

    public func users() async throws -> [User] {
        try await database.read { db in
            try Row.fetchAll(db, sql: "SELECT * FROM user ORDER BY name").map(Self.user)
        }
    }

    // MARK: Appliances

    private static let applianceQuery = """
        SELECT appliance.*, user.name AS owner FROM appliance JOIN user ON user.id = appliance.ownerID
        """

    public func addAppliance(name: String, owner: String, tokenDigest: String) async throws -> Appliance {
        try await write(what: "appliance", name: name) { db in
            let ownerID = try Self.userID(db, named: owner)
            try db.execute(
                sql: "INSERT INTO appliance (name, ownerID, enabled, tokenDigest, createdAt) VALUES (?, ?, 1, ?, ?)",
                arguments: [name, ownerID, tokenDigest, Date()])
            return try Self.appliance(db, named: name)
        }
    }

    public func appliances() async throws -> [Appliance] {
        try await database.read { db in
            try Row.fetchAll(db, sql: Self.applianceQuery + " ORDER BY appliance.name").map(Self.appliance)
        }
    }

    public func setAppliance(_ name: String, enabled: Bool) async throws -> Appliance {
        try await database.write { db in
            try db.execute(sql: "UPDATE appliance SET enabled = ? WHERE name = ?", arguments: [enabled, name])
            guard db.changesCount == 1 else { throw PoolError.notFound(what: "appliance", name: name) }
            return try Self.appliance(db, named: name)
        }
    }

    public func setApplianceToken(_ name: String, tokenDigest: String) async throws {
        try await database.write { db in
            try db.execute(sql: "UPDATE appliance SET tokenDigest = ? WHERE name = ?", arguments: [tokenDigest, name])
            guard db.changesCount == 1 else { throw PoolError.notFound(what: "appliance", name: name) }
        }
    }

    public func appliance(tokenDigest: String) async throws -> Appliance? {
        try await database.read { db in
            try Row.fetchOne(db, sql: Self.applianceQuery + " WHERE appliance.tokenDigest = ?", arguments: [tokenDigest])
                .map(Self.appliance)
        }
    }

    public func recordCheckIn(_ name: String, block: ApplianceBlock, at date: Date) async throws -> Appliance {
        try await database.write { db in
            try db.execute(
                sql: """
                    UPDATE appliance SET version = ?, latitude = ?, longitude = ?, dynamicImages = ?, lastSeen = ?
                    WHERE name = ?
                    """,
                arguments: [block.version, block.latitude, block.longitude, block.dynamicimages ?? false, date, name])
            guard db.changesCount == 1 else { throw PoolError.notFound(what: "appliance", name: name) }
            return try Self.appliance(db, named: name)
        }
    }

    // MARK: Flavors

    public func addFlavor(_ flavor: Flavor) async throws {
        // Flavors are unique twice over: by name (checked here, in the same
        // transaction) and by their specs (the constraint the insert hits).
        try await write(what: "flavor with these specs", name: flavor.name) { db in
            if try Bool.fetchOne(db, sql: "SELECT 1 FROM flavor WHERE name = ?", arguments: [flavor.name]) ?? false {
                throw PoolError.alreadyExists(what: "flavor", name: flavor.name)
            }
            try db.execute(
                sql: """
                    INSERT INTO flavor (name, description, vcpus, memory, disk, networkUp, networkDown, rate, ask, hot, active)
                    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                    """,
                arguments: [
                    flavor.name, flavor.description, flavor.vcpus, flavor.memory, flavor.disk, flavor.networkUp,
                    flavor.networkDown, flavor.rate, flavor.ask, flavor.hot, flavor.active,
                ])
        }
    }

    public func flavors() async throws -> [Flavor] {
        try await database.read { db in
            try Row.fetchAll(db, sql: "SELECT * FROM flavor ORDER BY name").map { row in
                Flavor(
                    name: row["name"], description: row["description"], vcpus: row["vcpus"], memory: row["memory"],
                    disk: row["disk"], networkUp: row["networkUp"], networkDown: row["networkDown"], rate: row["rate"],
                    ask: row["ask"], hot: row["hot"], active: row["active"])
            }
        }
    }

    // MARK: Images and wisps

    public func addImage(_ image: Image) async throws {
        try await write(what: "image", name: image.name) { db in
            try db.execute(
                sql: "INSERT INTO image (name, url, sha256, diskFormat) VALUES (?, ?, ?, ?)",
                arguments: [image.name, image.url, image.sha256, image.diskFormat])
        }
    }

    public func images() async throws -> [Image] {
        try await database.read { db in
            try Row.fetchAll(db, sql: "SELECT * FROM image ORDER BY name").map(Self.image)
        }
    }

    public func addWisp(_ wisp: Wisp) async throws {
        try await write(what: "wisp", name: wisp.name) { db in
            let ownerID = try Self.userID(db, named: wisp.owner)
            var imageID: Int64?
            if let image = wisp.image {
                guard let id = try Int64.fetchOne(db, sql: "SELECT id FROM image WHERE name = ?", arguments: [image]) else {
                    throw PoolError.notFound(what: "image", name: image)
                }
                imageID = id
            }
            if wisp.isDefault {
                try db.execute(sql: "UPDATE wisp SET isDefault = 0 WHERE ownerID = ?", arguments: [ownerID])
            }
            if wisp.isSystemDefault {
                try db.execute(sql: "UPDATE wisp SET isSystemDefault = 0")
            }
            try db.execute(
                sql: """
                    INSERT INTO wisp (name, ownerID, imageID, dynamicImageURL, sshKeys, postCreate, callbackURL, isDefault, isSystemDefault)
                    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
                    """,
                arguments: [
                    wisp.name, ownerID, imageID, wisp.dynamicImageURL, wisp.sshKeys.joined(separator: "\n"),
                    wisp.postCreate, wisp.callbackURL, wisp.isDefault, wisp.isSystemDefault,
                ])
        }
    }

    private static let wispQuery = """
        SELECT wisp.*, user.name AS owner, image.name AS image FROM wisp
        JOIN user ON user.id = wisp.ownerID LEFT JOIN image ON image.id = wisp.imageID
        """

    public func wisps() async throws -> [Wisp] {
        try await database.read { db in
            try Row.fetchAll(db, sql: Self.wispQuery + " ORDER BY wisp.name").map(Self.wisp)
        }
    }

    // MARK: Instances

    private static let instanceQuery = """
        SELECT instance.*, appliance.name AS appliance, user.name AS owner, wisp.name AS wisp FROM instance
        JOIN appliance ON appliance.id = instance.applianceID JOIN user ON user.id = instance.ownerID
        LEFT JOIN wisp ON wisp.id = instance.wispID
        """

    public func recordReport(_ report: InstanceReport, appliance: String, consoleLimit: Int, at date: Date) async throws
        -> Instance
    {
        let encoder = JSONEncoder()
        let flavor = try report.flavor.map { String(decoding: try encoder.encode($0), as: UTF8.self) }
        let addresses = String(decoding: try encoder.encode(report.ipAddresses ?? []), as: UTF8.self)
        let tail = String(decoding: try encoder.encode(Array((report.consoleOutput ?? []).suffix(consoleLimit))), as: UTF8.self)
        let expires = report.expires.map { Date(timeIntervalSince1970: TimeInterval($0)) }
        return try await database.write { db in
            guard let reporter = try Row.fetchOne(db, sql: "SELECT id, ownerID FROM appliance WHERE name = ?", arguments: [appliance])
            else { throw PoolError.notFound(what: "appliance", name: appliance) }
            let applianceID: Int64 = reporter["id"]
            if let existing = try Int64.fetchOne(db, sql: "SELECT applianceID FROM instance WHERE name = ?", arguments: [report.name]) {
                guard existing == applianceID else {
                    throw PoolError.forbidden("instance '\(report.name)' belongs to another appliance")
                }
                try db.execute(
                    sql: """
                        UPDATE instance SET state = ?, flavor = ?, ask = ?, expires = ?, address = ?, ipAddresses = ?,
                        consoleTail = ?, updatedAt = ? WHERE name = ?
                        """,
                    arguments: [
                        report.state.rawValue, flavor, report.ask, expires, report.address, addresses, tail, date, report.name,
                    ])
            } else {
                try db.execute(
                    sql: """
                        INSERT INTO instance (name, applianceID, ownerID, state, flavor, ask, expires, address, ipAddresses,
                        consoleTail, createdAt, updatedAt) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                        """,
                    arguments: [
                        report.name, applianceID, reporter["ownerID"] as Int64, report.state.rawValue, flavor, report.ask,
                        expires, report.address, addresses, tail, date, date,
                    ])
            }
            return try Self.instance(db, named: report.name)
        }
    }

    public func startParameters(forInstance name: String) async throws -> StartParameters {
        try await database.read { db in
            guard let instance = try Row.fetchOne(db, sql: "SELECT wispID, ownerID FROM instance WHERE name = ?", arguments: [name])
            else { throw PoolError.notFound(what: "instance", name: name) }
            let wispID: Int64? = instance["wispID"]
            let ownerID: Int64 = instance["ownerID"]
            let row =
                try wispID.flatMap { try Row.fetchOne(db, sql: Self.wispQuery + " WHERE wisp.id = ?", arguments: [$0]) }
                ?? Row.fetchOne(db, sql: Self.wispQuery + " WHERE wisp.ownerID = ? AND wisp.isDefault", arguments: [ownerID])
                ?? Row.fetchOne(db, sql: Self.wispQuery + " WHERE wisp.isSystemDefault")
            guard let row else {
                throw PoolError.unavailable(
                    "instance '\(name)' has no wisp to boot from: neither its own, nor its owner's default, nor a system default (add one with `corral pool wisp add NAME --owner USER --image IMAGE --system-default`)")
            }
            let wisp = Self.wisp(row)
            let image: ImageReference
            if let imageName = wisp.image,
                let imageRow = try Row.fetchOne(db, sql: "SELECT * FROM image WHERE name = ?", arguments: [imageName])
            {
                let stored = Self.image(imageRow)
                image = ImageReference(name: stored.name, url: stored.url, sha256: stored.sha256, diskFormat: stored.diskFormat)
            } else if let url = wisp.dynamicImageURL {
                // The appliance checks the real format with qemu-img before use.
                image = ImageReference(name: "dynamic", url: url, diskFormat: url.hasSuffix(".raw") ? "raw" : "qcow2")
            } else {
                throw PoolError.invalid(field: "wisp '\(wisp.name)'", reason: "has neither an image nor a dynamic image URL")
            }
            return StartParameters(
                image: image, callbackURL: wisp.callbackURL ?? "", sshKeys: wisp.sshKeys,
                postCreate: wisp.postCreate.isEmpty ? [] : wisp.postCreate.components(separatedBy: "\n"))
        }
    }

    public func instances() async throws -> [Instance] {
        try await database.read { db in
            try Row.fetchAll(db, sql: Self.instanceQuery + " ORDER BY instance.name").map(Self.instance)
        }
    }

    // MARK: Helpers

    /// A write in one transaction, with SQLite's uniqueness failures turned
    /// into ``PoolError/alreadyExists(what:name:)``.
    private func write<T: Sendable>(
        what: String, name: String, _ body: @escaping @Sendable (Database) throws -> T
    ) async throws -> T {
        do {
            return try await database.write(body)
        } catch let error as DatabaseError where error.extendedResultCode == .SQLITE_CONSTRAINT_UNIQUE {
            throw PoolError.alreadyExists(what: what, name: name)
        }
    }

    private static func userID(_ db: Database, named name: String) throws -> Int64 {
        guard let id = try Int64.fetchOne(db, sql: "SELECT id FROM user WHERE name = ?", arguments: [name]) else {
            throw PoolError.notFound(what: "user", name: name)
        }
        return id
    }

    private static func image(_ row: Row) -> Image {
        Image(name: row["name"], url: row["url"], sha256: row["sha256"], diskFormat: row["diskFormat"])
    }

    private static func wisp(_ row: Row) -> Wisp {
        let keys: String = row["sshKeys"]
        return Wisp(
            name: row["name"], owner: row["owner"], image: row["image"], dynamicImageURL: row["dynamicImageURL"],
            sshKeys: keys.isEmpty ? [] : keys.components(separatedBy: "\n"), postCreate: row["postCreate"],
            callbackURL: row["callbackURL"], isDefault: row["isDefault"], isSystemDefault: row["isSystemDefault"])
    }

    private static func instance(_ row: Row) -> Instance {
        let decoder = JSONDecoder()
        func decode<T: Decodable>(_ column: String, as type: T.Type) -> T? {
            (row[column] as String?).flatMap { try? decoder.decode(T.self, from: Data($0.utf8)) }
        }
        return Instance(
            name: row["name"], appliance: row["appliance"], owner: row["owner"], wisp: row["wisp"],
            state: InstanceState(rawValue: row["state"]) ?? .inactive, flavor: decode("flavor", as: InstanceFlavor.self),
            ask: row["ask"], expires: row["expires"], address: row["address"],
            ipAddresses: decode("ipAddresses", as: [IPAddress].self) ?? [],
            consoleTail: decode("consoleTail", as: [String].self) ?? [], updatedAt: row["updatedAt"])
    }

    private static func instance(_ db: Database, named name: String) throws -> Instance {
        guard let row = try Row.fetchOne(db, sql: instanceQuery + " WHERE instance.name = ?", arguments: [name]) else {
            throw PoolError.notFound(what: "instance", name: name)
        }
        return instance(row)
    }

    private static func user(_ row: Row) -> User {
        User(name: row["name"], superuser: row["superuser"], maxInstances: row["maxInstances"], createdAt: row["createdAt"])
    }

    private static func appliance(_ row: Row) -> Appliance {
        Appliance(
            name: row["name"], owner: row["owner"], enabled: row["enabled"], version: row["version"],
            latitude: row["latitude"], longitude: row["longitude"], dynamicImages: row["dynamicImages"],
            lastSeen: row["lastSeen"], createdAt: row["createdAt"])
    }

    private static func appliance(_ db: Database, named name: String) throws -> Appliance {
        guard let row = try Row.fetchOne(db, sql: applianceQuery + " WHERE appliance.name = ?", arguments: [name]) else {
            throw PoolError.notFound(what: "appliance", name: name)
        }
        return appliance(row)
    }
}
