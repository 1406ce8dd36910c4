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
            guard let ownerID = try Int64.fetchOne(db, sql: "SELECT id FROM user WHERE name = ?", arguments: [owner])
            else { throw PoolError.notFound(what: "user", name: owner) }
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
        try await write(what: "flavor", name: flavor.name) { db in
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

    // MARK: Helpers

    /// A write in one transaction, with SQLite's uniqueness failures turned
    /// into ``PoolError/alreadyExists(what:name:)``.
    private func write<T: Sendable>(
        what: String, name: String, _ body: @escaping @Sendable (Database) throws -> T
    ) async throws -> T {
        do {
            return try await database.write(body)
        } catch let error as DatabaseError where error.extendedResultCode == .SQLITE_CONSTRAINT_UNIQUE {
            if what == "flavor", error.message?.contains("flavor.name") == false {
                throw PoolError.alreadyExists(what: "flavor with these specs", name: name)
            }
            throw PoolError.alreadyExists(what: what, name: name)
        }
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
