import Crypto
import Foundation
import Support
import GRDB
import PoolAPI

/// The embedded default store: one SQLite file in WAL mode (readers never
/// wait for the writer). Migrations run when it opens. Every change is one
/// transaction, so a request that fails leaves nothing half-written.
public final class SQLiteStore: PoolStore {
    let database: DatabasePool
    public let actionsChanged: ChangeSignal
    private let actionObserver: NewActionObserver

    /// Opens (creating when missing) the database at `path`.
    public init(path: String) throws {
        do {
            let directory = URL(fileURLWithPath: path).deletingLastPathComponent()
            try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
            var configuration = Configuration()
            configuration.busyMode = .timeout(10)
            database = try DatabasePool(path: path, configuration: configuration)
            try Self.migrator.migrate(database)
            // Token digests, callbacks and scripts: the pool's alone (SQLite
            // gives its -wal and -shm files the same mode).
            for file in [path, path + "-wal", path + "-shm"] where FileManager.default.fileExists(atPath: file) {
                try FileModes.set(file, mode: 0o600)
            }
        } catch {
            throw PoolError.storage("cannot open the pool database at \(path): \(error)")
        }
        // A committed new action wakes the held check-ins of its appliance only.
        let signal = ChangeSignal()
        actionsChanged = signal
        actionObserver = NewActionObserver(signal: signal)
        database.add(transactionObserver: actionObserver, extent: .databaseLifetime)
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
        migrator.registerMigration("3-check-ins-actions-reservations") { db in
            try db.alter(table: "appliance") { table in
                table.add(column: "stats", .jsonText)
            }
            try db.alter(table: "instance") { table in
                table.add(column: "callbackURL", .text)
                table.add(column: "lastError", .text)
                table.add(column: "reportedAt", .datetime)
            }
            try db.execute(sql: "UPDATE instance SET reportedAt = updatedAt")
            try db.create(table: "action") { table in
                table.primaryKey("id", .text)
                table.column("instanceID", .integer).notNull().indexed().references("instance", onDelete: .cascade)
                table.column("applianceID", .integer).notNull().indexed().references("appliance", onDelete: .cascade)
                table.column("kind", .text).notNull()
                table.column("flavor", .jsonText)
                table.column("expires", .datetime)
                table.column("createdAt", .datetime).notNull()
                table.column("doneAt", .datetime)
            }
            try db.create(table: "reservation") { table in
                table.primaryKey("id", .text)
                table.column("userID", .integer).notNull().references("user")
                // One reservation per instance at a time.
                table.column("instanceID", .integer).notNull().unique().references("instance", onDelete: .cascade)
                table.column("flavor", .text)
                table.column("wispID", .integer).references("wisp")
                table.column("callbackURL", .text)
                table.column("createdAt", .datetime).notNull()
                table.column("expiresAt", .datetime).notNull()
            }
        }
        migrator.registerMigration("4-image-kernel-boot-state-reason") { db in
            try db.alter(table: "image") { table in
                table.add(column: "kernelBoot", .jsonText)
            }
            try db.alter(table: "instance") { table in
                table.add(column: "stateReason", .text)
            }
        }
        migrator.registerMigration("5-user-api-templates") { db in
            try db.alter(table: "user") { table in
                table.add(column: "uuid", .text)
                table.add(column: "managerID", .integer).references("user")
                table.add(column: "leaseSeconds", .integer)
            }
            try db.execute(sql: "UPDATE user SET uuid = lower(hex(randomblob(16)))")
            try db.create(index: "user_uuid", on: "user", columns: ["uuid"], unique: true)
            try db.alter(table: "appliance") { table in
                table.add(column: "region", .text)
            }
            try db.create(table: "template") { table in
                table.autoIncrementedPrimaryKey("id")
                table.column("name", .text).notNull().unique()
                table.column("wispID", .integer).notNull().references("wisp")
                table.column("flavorID", .integer).notNull().references("flavor")
                table.column("hotStarts", .integer).notNull()
                table.column("createdAt", .datetime).notNull()
            }
            try db.alter(table: "instance") { table in
                table.add(column: "uuid", .text)
                table.add(column: "imageID", .integer).references("image")
                table.add(column: "templateID", .integer).references("template", onDelete: .setNull)
                table.add(column: "warm", .boolean).notNull().defaults(to: false)
                table.add(column: "preemptible", .boolean).notNull().defaults(to: true)
                table.add(column: "topic", .text)
            }
            try db.execute(sql: "UPDATE instance SET uuid = lower(hex(randomblob(16)))")
            try db.create(index: "instance_uuid", on: "instance", columns: ["uuid"], unique: true)
            // Users given access to an instance besides its owner.
            try db.create(table: "instanceUser") { table in
                table.column("instanceID", .integer).notNull().references("instance", onDelete: .cascade)
                table.column("userID", .integer).notNull().references("user", onDelete: .cascade)
                table.column("addedAt", .datetime).notNull()
                table.primaryKey(["instanceID", "userID"])
            }
        }
        migrator.registerMigration("6-launch-timeline") { db in
            // When each instance reached each launch phase (see LaunchPhase).
            try db.create(table: "timelineEntry") { table in
                table.column("instanceID", .integer).notNull().references("instance", onDelete: .cascade)
                table.column("phase", .text).notNull()
                table.column("at", .double).notNull()
                table.column("detail", .text)
                table.primaryKey(["instanceID", "phase"])
            }
        }
        migrator.registerMigration("7-user-enabled") { db in
            try db.alter(table: "user") { table in
                table.add(column: "enabled", .boolean).notNull().defaults(to: true)
            }
        }
        migrator.registerMigration("8-signing-key") { db in
            // The pool's Ed25519 key, which signs what appliances are told.
            try db.create(table: "signingKey") { table in
                table.column("id", .integer).primaryKey().check { $0 == 1 }
                table.column("privateKey", .blob).notNull()
                table.column("createdAt", .datetime).notNull()
            }
        }
        migrator.registerMigration("9-ssh-keys-user-data") { db in
            // Users' own SSH public keys (`/v1/ssh-key`).
            try db.create(table: "sshKey") { table in
                table.autoIncrementedPrimaryKey("id")
                table.column("uuid", .text).notNull().unique()
                table.column("userID", .integer).notNull().references("user", onDelete: .cascade)
                table.column("name", .text).notNull()
                table.column("publicKey", .text).notNull()
                table.column("fingerprint", .text).notNull()
                table.column("createdAt", .datetime).notNull()
                table.uniqueKey(["userID", "name"])
                table.uniqueKey(["userID", "fingerprint"])
            }
            // What a create asked for: the chosen keys' lines (newline-separated,
            // copied at the create) and the user-data part.
            try db.alter(table: "instance") { table in
                table.add(column: "sshKeys", .text)
                table.add(column: "userData", .text)
                // Where its appliance says users reach its SSH server (JSON).
                table.add(column: "ssh", .text)
            }
        }
        migrator.registerMigration("10-guest-keys-catalogue-edits") { db in
            try db.alter(table: "image") { table in
                // The guest user cloud-init gives the SSH keys to (nil: unknown,
                // so keys are not changed in running guests).
                table.add(column: "loginUser", .text)
                // Inactive images take no new instances; running ones keep theirs.
                table.add(column: "active", .boolean).notNull().defaults(to: true)
            }
            // A `keys` action: the login user's whole key list, and a script to
            // start once after it.
            try db.alter(table: "action") { table in
                table.add(column: "keys", .jsonText)
                table.add(column: "user", .text)
                table.add(column: "run", .text)
            }
            try db.alter(table: "instance") { table in
                // The `keys` action that re-keys a handed-out warm instance; until
                // its appliance reports it applied, the new owner sees BUILD.
                table.add(column: "handOutAction", .text)
                // The newest `keys` action its appliance reported applied.
                table.add(column: "keysApplied", .text)
            }
        }
        return migrator
    }

    // MARK: Users

    public func addUser(
        name: String, superuser: Bool, maxInstances: Int, tokenDigest: String, manager: String?, leaseSeconds: Int?
    ) async throws -> User {
        try await write(what: "user", name: name) { db in
            let managerID = try manager.map { try Self.userID(db, named: $0) }
            try db.execute(
                sql: """
                    INSERT INTO user (name, uuid, superuser, maxInstances, tokenDigest, managerID, leaseSeconds, createdAt)
                    VALUES (?, ?, ?, ?, ?, ?, ?, ?)
                    """,
                arguments: [name, StoreRules.newID(), superuser, maxInstances, tokenDigest, managerID, leaseSeconds, Date()])
            guard let row = try Row.fetchOne(db, sql: Self.userQuery + " WHERE user.name = ?", arguments: [name]) else {
                throw PoolError.storage("user \(name) vanished")
            }
            return try Self.user(row)
        }
    }

    static let userQuery = """
        SELECT user.*, manager.name AS manager FROM user LEFT JOIN user AS manager ON manager.id = user.managerID
        """

    public func users() async throws -> [User] {
        try await database.read { db in
            try Row.fetchAll(db, sql: Self.userQuery + " ORDER BY user.name").map(Self.user)
        }
    }

    // MARK: Appliances

    static let applianceQuery = """
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

    public func setAppliance(_ name: String, region: String?) async throws -> Appliance {
        try await database.write { db in
            try db.execute(sql: "UPDATE appliance SET region = ? WHERE name = ?", arguments: [region, name])
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
                    UPDATE appliance SET version = COALESCE(?, version), latitude = COALESCE(?, latitude),
                    longitude = COALESCE(?, longitude), dynamicImages = COALESCE(?, dynamicImages), lastSeen = ?
                    WHERE name = ?
                    """,
                arguments: [block.version, block.latitude, block.longitude, block.dynamicimages, date, name])
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
            try Row.fetchAll(db, sql: "SELECT * FROM flavor ORDER BY name").map(Self.flavor)
        }
    }

    static func flavor(_ row: Row) throws -> Flavor {
        Flavor(
            name: try row.decode(forColumn: "name"), description: try row.decode(forColumn: "description"), vcpus: try row.decode(forColumn: "vcpus"), memory: try row.decode(forColumn: "memory"),
            disk: try row.decode(forColumn: "disk"), networkUp: try row.decode(forColumn: "networkUp"), networkDown: try row.decode(forColumn: "networkDown"), rate: try row.decode(forColumn: "rate"),
            ask: try row.decode(forColumn: "ask"), hot: try row.decode(forColumn: "hot"), active: try row.decode(forColumn: "active"))
    }

    // MARK: Images and wisps

    public func addImage(_ image: Image) async throws {
        try await write(what: "image", name: image.name) { db in
            try db.execute(
                sql: "INSERT INTO image (name, url, sha256, diskFormat, kernelBoot, loginUser, active) VALUES (?, ?, ?, ?, ?, ?, ?)",
                arguments: [
                    image.name, image.url, image.sha256, image.diskFormat,
                    try image.kernelBoot.map { String(decoding: try JSONEncoder().encode($0), as: UTF8.self) }, image.loginUser,
                    image.active,
                ])
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

    static let wispQuery = """
        SELECT wisp.*, user.name AS owner, image.name AS image FROM wisp
        JOIN user ON user.id = wisp.ownerID LEFT JOIN image ON image.id = wisp.imageID
        """

    public func wisps() async throws -> [Wisp] {
        try await database.read { db in
            try Row.fetchAll(db, sql: Self.wispQuery + " ORDER BY wisp.name").map(Self.wisp)
        }
    }

    // MARK: Instances

    static let instanceQuery = """
        SELECT instance.*, appliance.name AS appliance, user.name AS owner, user.uuid AS ownerUUID, wisp.name AS wisp,
        COALESCE(image.name, wispImage.name) AS image, template.name AS template,
        CASE WHEN image.id IS NOT NULL THEN image.loginUser ELSE wispImage.loginUser END AS loginUser,
        (instance.handOutAction IS NOT NULL AND instance.handOutAction IS NOT instance.keysApplied) AS rekeying,
        (SELECT json_group_array(uuid) FROM (SELECT granted.uuid FROM instanceUser
         JOIN user AS granted ON granted.id = instanceUser.userID WHERE instanceUser.instanceID = instance.id
         ORDER BY instanceUser.addedAt, granted.name)) AS grantedUsers
        FROM instance
        JOIN appliance ON appliance.id = instance.applianceID JOIN user ON user.id = instance.ownerID
        LEFT JOIN wisp ON wisp.id = instance.wispID LEFT JOIN image ON image.id = instance.imageID
        LEFT JOIN image AS wispImage ON wispImage.id = wisp.imageID LEFT JOIN template ON template.id = instance.templateID
        """

    public func recordReport(_ report: InstanceReport, appliance: String, consoleLimit: Int, maxInstances: Int, at date: Date)
        async throws
        -> RecordedReport
    {
        let encoder = JSONEncoder()
        let flavor = try report.flavor.map { String(decoding: try encoder.encode($0), as: UTF8.self) }
        let addresses = String(decoding: try encoder.encode(report.ipAddresses ?? []), as: UTF8.self)
        let tail = String(decoding: try encoder.encode(Array((report.consoleOutput ?? []).suffix(consoleLimit))), as: UTF8.self)
        let expires = report.expires.map { Date(timeIntervalSince1970: TimeInterval($0)) }
        let ssh = try report.ssh.map { String(decoding: try encoder.encode($0), as: UTF8.self) }
        return try await database.write { db in
            let (applianceID, ownerID) = try Self.applianceIDs(db, named: appliance)
            let previous = try Self.ownedInstance(db, named: report.name, applianceID: applianceID)
            if let previous {
                try db.execute(
                    sql: """
                        UPDATE instance SET state = ?, flavor = COALESCE(flavor, ?), ask = ?, expires = ?, address = ?,
                        ipAddresses = ?, consoleTail = ?, lastError = ?, stateReason = ?, reportedAt = ?, updatedAt = ?,
                        ssh = COALESCE(?, ssh), keysApplied = COALESCE(?, keysApplied) WHERE id = ?
                        """,
                    arguments: [
                        report.state.rawValue, flavor, report.ask, expires, report.address, addresses, tail, report.error,
                        report.reason, date, date, ssh, report.keysApplied, previous.id,
                    ])
            } else {
                try Self.checkRecordRoom(db, applianceID: applianceID, appliance: appliance, adding: 1, most: maxInstances)
                try db.execute(
                    sql: """
                        INSERT INTO instance (name, uuid, applianceID, ownerID, state, flavor, ask, expires, address, ipAddresses,
                        consoleTail, lastError, stateReason, createdAt, reportedAt, updatedAt, ssh)
                        VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                        """,
                    arguments: [
                        report.name, StoreRules.newID(), applianceID, ownerID, report.state.rawValue, flavor, report.ask, expires,
                        report.address, addresses, tail, report.error, report.reason, date, date, date, ssh,
                    ])
            }
            try Self.claimReservation(db, instance: report.name, at: date)
            guard let instanceID = try Self.ownedInstance(db, named: report.name, applianceID: applianceID)?.id else {
                throw PoolError.storage("instance '\(report.name)' vanished while its report was recorded")
            }
            try Self.recordTimeline(db, instanceID: instanceID, agentEntries: report.timeline ?? [])
            if report.state == .running {
                try Self.recordPhase(db, .runningReported, instanceID: instanceID, at: date, replacing: false)
            }
            return RecordedReport(
                instance: try Self.instance(db, named: report.name), stateChanged: previous?.state != report.state.rawValue)
        }
    }

    public func bootSource(forInstance name: String) async throws -> BootSource {
        try await database.read { db in
            guard
                let instance = try Row.fetchOne(
                    db, sql: "SELECT id, wispID, ownerID, callbackURL, imageID, sshKeys, userData FROM instance WHERE name = ?",
                    arguments: [name])
            else { throw PoolError.notFound(what: "instance", name: name) }
            // The keys and user-data its create asked for come after the
            // wisp's, then the keys of the users it was shared with.
            let id: Int64 = try instance.decode(forColumn: "id")
            let callbackURL: String? = try instance.decode(forColumn: "callbackURL")
            if let callbackURL, !callbackURL.isEmpty { return .callback(callbackURL) }
            let wisp = try Self.bootWisp(db, wispID: try instance.decode(forColumn: "wispID"), ownerID: try instance.decode(forColumn: "ownerID"))
            var ownImage: Image?
            if let imageID: Int64 = try instance.decode(forColumn: "imageID") {
                guard let imageRow = try Row.fetchOne(db, sql: "SELECT * FROM image WHERE id = ?", arguments: [imageID]) else {
                    throw PoolError.storage("image \(imageID) of instance '\(name)' vanished")
                }
                ownImage = try Self.image(imageRow)
            }
            let wispImage = try wisp?.image.flatMap {
                try Row.fetchOne(db, sql: "SELECT * FROM image WHERE name = ?", arguments: [$0]).map(Self.image)
            }
            return try StoreRules.bootSource(
                instance: name, callbackURL: callbackURL, ownImage: ownImage, wisp: wisp, wispImage: wispImage,
                wispKeys: try Self.wispKeys(db, wisp, instanceID: id),
                ownKeys: StoreRules.scriptLines(try instance.decode(forColumn: "sshKeys") as String? ?? "")
                    + (try Self.grantedKeys(db, instanceID: id)),
                userData: try instance.decode(forColumn: "userData"))
        }
    }

    public func setLastError(_ message: String?, forInstance name: String) async throws {
        try await database.write { db in
            try db.execute(sql: "UPDATE instance SET lastError = ? WHERE name = ?", arguments: [message, name])
            guard db.changesCount == 1 else { throw PoolError.notFound(what: "instance", name: name) }
        }
    }

    public func instances() async throws -> [Instance] {
        try await database.read { db in
            try Row.fetchAll(db, sql: Self.instanceQuery + " ORDER BY instance.name").map(Self.instance)
        }
    }

    public func user(tokenDigest: String) async throws -> User? {
        try await database.read { db in
            try Row.fetchOne(db, sql: Self.userQuery + " WHERE user.tokenDigest = ?", arguments: [tokenDigest]).map(Self.user)
        }
    }

    public func signingKey() async throws -> Data {
        try await database.write { db in
            if let key = try Data.fetchOne(db, sql: "SELECT privateKey FROM signingKey WHERE id = 1") { return key }
            let key = Curve25519.Signing.PrivateKey().rawRepresentation
            try db.execute(sql: "INSERT INTO signingKey (id, privateKey, createdAt) VALUES (1, ?, ?)", arguments: [key, Date()])
            return key
        }
    }

    public func user(named name: String) async throws -> User {
        try await database.read { db in
            guard let row = try Row.fetchOne(db, sql: Self.userQuery + " WHERE user.name = ?", arguments: [name]) else {
                throw PoolError.notFound(what: "user", name: name)
            }
            return try Self.user(row)
        }
    }

    public func setUser(_ name: String, enabled: Bool) async throws -> User {
        try await updateUser(name, set: "enabled = ?", enabled)
    }

    public func setUserToken(_ name: String, tokenDigest: String) async throws -> User {
        try await updateUser(name, set: "tokenDigest = ?", tokenDigest)
    }

    /// Sets one column of the user named `name`; the user as changed.
    private func updateUser(_ name: String, set assignment: String, _ value: some DatabaseValueConvertible & Sendable) async throws -> User {
        try await database.write { db in
            try db.execute(sql: "UPDATE user SET \(assignment) WHERE name = ?", arguments: [value, name])
            guard db.changesCount == 1,
                let row = try Row.fetchOne(db, sql: Self.userQuery + " WHERE user.name = ?", arguments: [name])
            else { throw PoolError.notFound(what: "user", name: name) }
            return try Self.user(row)
        }
    }

    /// A page of instances by id: those of `owners` (nil: everyone's) and
    /// those shared with the user `sharedWith` (a user id).
    public func instancesPage(
        owners: Set<String>?, sharedWith: String? = nil, includeWarm: Bool, ownerID: String?, after marker: String?, limit: Int
    ) async throws -> [Instance] {
        try await database.read { db in
            var conditions: [String] = []
            var arguments: StatementArguments = []
            if let owners {
                var either = owners.isEmpty ? "0" : "user.name IN (\(owners.map { _ in "?" }.joined(separator: ",")))"
                for owner in owners.sorted() { arguments += [owner] }
                if let sharedWith {
                    either += """
                         OR EXISTS (SELECT 1 FROM instanceUser JOIN user AS shared ON shared.id = instanceUser.userID
                        WHERE instanceUser.instanceID = instance.id AND shared.uuid = ?)
                        """
                    arguments += [sharedWith]
                }
                conditions.append("(\(either))")
            }
            if !includeWarm { conditions.append("instance.warm = 0") }
            if let ownerID {
                conditions.append("user.uuid = ?")
                arguments += [ownerID]
            }
            if let marker {
                conditions.append("instance.uuid > ?")
                arguments += [marker]
            }
            let filter = conditions.isEmpty ? "" : " WHERE " + conditions.joined(separator: " AND ")
            arguments += [limit]
            return try Row.fetchAll(db, sql: Self.instanceQuery + filter + " ORDER BY instance.uuid LIMIT ?", arguments: arguments)
                .map(Self.instance)
        }
    }

    // MARK: Check-ins and actions

    public func checkIn(_ appliance: String, request: CheckInRequest, maxInstances: Int, at date: Date) async throws
        -> RecordedCheckIn
    {
        // Sorted keys: the same stats are the same text (the encoder's key order varies).
        let encoder = JSONEncoder()
        encoder.outputFormatting = .sortedKeys
        let stats = String(decoding: try encoder.encode(request.stats), as: UTF8.self)
        // A check-in that changes nothing (the same stats and states, nothing
        // newly done, all seen moments ago) is answered from a read.
        if let unchanged = try await database.read({ db in try Self.unchangedCheckIn(db, appliance, request: request, stats: stats, at: date) }) {
            return unchanged
        }
        return try await database.write { db in
            let (applianceID, ownerID) = try Self.applianceIDs(db, named: appliance)
            // The appliance block itself was recorded when the request authenticated.
            try db.execute(
                sql: "UPDATE appliance SET lastSeen = ?, stats = ? WHERE id = ?", arguments: [date, stats, applianceID])
            for id in request.done {
                try db.execute(
                    sql: "UPDATE action SET doneAt = ? WHERE id = ? AND applianceID = ? AND doneAt IS NULL",
                    arguments: [date, id, applianceID])
            }
            var changes: [InstanceEvent] = []
            // The summarized instances in one query; their `reportedAt` in one update.
            var known = try Self.reportedInstances(db, named: request.instances.map(\.name))
            var seen: [Int64] = []
            for summary in request.instances {
                if let existing = known[summary.name] {
                    // Another appliance's instance: its report is not this one's to make.
                    guard existing.applianceID == applianceID else { continue }
                    // Decommissioned is final: a summary the agent took just
                    // before it decommissioned the VM can arrive after the
                    // report that said so, and must not bring it back.
                    guard existing.state != InstanceState.decommissioned.rawValue else { continue }
                    if !Appliance.isFresh(existing.reportedAt, at: date) { seen.append(existing.id) }
                    guard existing.state != summary.state.rawValue else { continue }
                    try db.execute(
                        sql: "UPDATE instance SET state = ?, updatedAt = ? WHERE id = ?",
                        arguments: [summary.state.rawValue, date, existing.id])
                    known[summary.name]?.state = summary.state.rawValue
                } else {
                    try Self.checkRecordRoom(db, applianceID: applianceID, appliance: appliance, adding: 1, most: maxInstances)
                    try db.execute(
                        sql: """
                            INSERT INTO instance (name, uuid, applianceID, ownerID, state, ipAddresses, consoleTail, createdAt,
                            reportedAt, updatedAt) VALUES (?, ?, ?, ?, ?, '[]', '[]', ?, ?, ?)
                            """,
                        arguments: [summary.name, StoreRules.newID(), applianceID, ownerID, summary.state.rawValue, date, date, date])
                    known[summary.name] = (db.lastInsertedRowID, applianceID, summary.state.rawValue, date)
                }
                try Self.claimReservation(db, instance: summary.name, at: date)
                changes.append(try Self.instance(db, named: summary.name).event)
            }
            for ids in seen.chunked(by: 500) {
                try db.execute(
                    sql: "UPDATE instance SET reportedAt = ? WHERE id IN (\(databaseQuestionMarks(count: ids.count)))",
                    arguments: StatementArguments([date] + Array(ids)))
            }
            return RecordedCheckIn(actions: try Self.pendingActions(db, applianceID: applianceID), changes: changes)
        }
    }

    /// The instances named, by name: what a check-in's summary is compared with.
    static func reportedInstances(_ db: Database, named names: [String]) throws
        -> [String: (id: Int64, applianceID: Int64, state: Int, reportedAt: Date?)]
    {
        var known: [String: (id: Int64, applianceID: Int64, state: Int, reportedAt: Date?)] = [:]
        for chunk in names.chunked(by: 500) {
            for row in try Row.fetchAll(
                db, sql: "SELECT id, name, applianceID, state, reportedAt FROM instance WHERE name IN (\(databaseQuestionMarks(count: chunk.count)))",
                arguments: StatementArguments(Array(chunk)))
            {
                known[try row.decode(forColumn: "name")] = (
                    try row.decode(forColumn: "id"), try row.decode(forColumn: "applianceID"), try row.decode(forColumn: "state"),
                    try row.decode(forColumn: "reportedAt")
                )
            }
        }
        return known
    }

    /// The reply to a check-in that would change nothing, or nil when it
    /// would (the write transaction then does and checks everything again).
    static func unchangedCheckIn(_ db: Database, _ appliance: String, request: CheckInRequest, stats: String, at date: Date) throws
        -> RecordedCheckIn?
    {
        guard let row = try Row.fetchOne(db, sql: "SELECT id, lastSeen, stats FROM appliance WHERE name = ?", arguments: [appliance]) else {
            throw PoolError.notFound(what: "appliance", name: appliance)
        }
        let applianceID: Int64 = try row.decode(forColumn: "id")
        guard Appliance.isFresh(try row.decode(forColumn: "lastSeen"), at: date), try row.decode(forColumn: "stats") as String? == stats else { return nil }
        if !request.done.isEmpty {
            let undone = try Int.fetchOne(
                db,
                sql: "SELECT COUNT(*) FROM action WHERE applianceID = ? AND doneAt IS NULL AND id IN (\(databaseQuestionMarks(count: request.done.count)))",
                arguments: StatementArguments([applianceID] + request.done)) ?? 0
            guard undone == 0 else { return nil }
        }
        if !request.instances.isEmpty {
            let known = try reportedInstances(db, named: request.instances.map(\.name))
            for summary in request.instances {
                guard let instance = known[summary.name] else { return nil }  // a new record
                // Another appliance's, or decommissioned: the write would skip it too.
                guard instance.applianceID == applianceID, instance.state != InstanceState.decommissioned.rawValue else { continue }
                guard instance.state == summary.state.rawValue, Appliance.isFresh(instance.reportedAt, at: date) else { return nil }
            }
        }
        return RecordedCheckIn(actions: try pendingActions(db, applianceID: applianceID), changes: [])
    }

    public func enqueueAction(_ kind: Action.Kind, instance name: String, expires: Date?, at date: Date) async throws -> Action {
        try await database.write { db in
            guard
                let instance = try Row.fetchOne(
                    db, sql: "SELECT id, applianceID, state, flavor FROM instance WHERE name = ?", arguments: [name])
            else { throw PoolError.notFound(what: "instance", name: name) }
            guard try instance.decode(forColumn: "state") as Int != InstanceState.decommissioned.rawValue else {
                throw PoolError.conflict("instance '\(name)' is decommissioned")
            }
            return try Self.insertAction(
                db, kind: kind, instanceID: try instance.decode(forColumn: "id"), applianceID: try instance.decode(forColumn: "applianceID"),
                flavor: kind == .start ? try instance.decode(forColumn: "flavor") : nil, expires: expires, at: date)
        }
    }

    // MARK: Reservations

    public func reserve(
        _ request: ReservationRequest, user: String, lifetime: Int, applianceStaleAfter: Int, at date: Date
    ) async throws -> Reservation {
        try await database.write { db in
            guard let userRow = try Row.fetchOne(db, sql: "SELECT * FROM user WHERE name = ?", arguments: [user]) else {
                throw PoolError.notFound(what: "user", name: user)
            }
            let userID: Int64 = try userRow.decode(forColumn: "id")
            let superuser: Bool = try userRow.decode(forColumn: "superuser")
            var wispID: Int64?
            if let wisp = request.wisp {
                let row = try Row.fetchOne(db, sql: "SELECT id, ownerID FROM wisp WHERE name = ?", arguments: [wisp])
                // Another user's wisp is reported as missing, not as forbidden.
                guard let row, try superuser || row.decode(Int64.self, forColumn: "ownerID") == userID else {
                    throw PoolError.notFound(what: "wisp", name: wisp)
                }
                wispID = try row.decode(forColumn: "id")
            }
            func checkLimit() throws {
                try Self.checkLimit(db, userID: userID, name: user, limit: try userRow.decode(forColumn: "maxInstances"), at: date)
            }
            let instanceID: Int64
            if let name = request.instance {
                guard
                    let row = try Row.fetchOne(
                        db,
                        sql: """
                            SELECT instance.id, instance.state, appliance.name AS appliance, appliance.enabled, appliance.lastSeen
                            FROM instance JOIN appliance ON appliance.id = instance.applianceID WHERE instance.name = ?
                            """,
                        arguments: [name])
                else { throw PoolError.notFound(what: "instance", name: name) }
                guard try row.decode(forColumn: "state") as Int == InstanceState.onOffer.rawValue else {
                    throw PoolError.conflict("instance '\(name)' is not on offer")
                }
                try Self.checkPlaceable(row, name: try row.decode(forColumn: "appliance"), staleAfter: applianceStaleAfter, at: date)
                instanceID = try row.decode(forColumn: "id")
                try db.execute(sql: "DELETE FROM reservation WHERE instanceID = ? AND expiresAt <= ?", arguments: [instanceID, date])
                if try Bool.fetchOne(db, sql: "SELECT 1 FROM reservation WHERE instanceID = ?", arguments: [instanceID]) ?? false {
                    throw PoolError.conflict("instance '\(name)' is reserved already")
                }
                try checkLimit()
            } else {
                guard let appliance = request.appliance, let flavorName = request.flavor else {
                    throw PoolError.invalid(field: "instance", reason: "give either 'instance' or both 'appliance' and 'flavor'")
                }
                guard let flavor = try Row.fetchOne(db, sql: "SELECT * FROM flavor WHERE name = ? AND active", arguments: [flavorName])
                else { throw PoolError.notFound(what: "flavor", name: flavorName) }
                guard let row = try Row.fetchOne(db, sql: "SELECT * FROM appliance WHERE name = ?", arguments: [appliance]) else {
                    throw PoolError.notFound(what: "appliance", name: appliance)
                }
                try Self.checkPlaceable(row, name: appliance, staleAfter: applianceStaleAfter, at: date)
                let size = InstanceFlavor(name: flavorName, vcpus: try flavor.decode(forColumn: "vcpus"), memory: try flavor.decode(forColumn: "memory"), disk: try flavor.decode(forColumn: "disk"))
                try Self.checkRoom(db, applianceID: try row.decode(forColumn: "id"), stats: try row.decode(forColumn: "stats"), for: size, appliance: appliance)
                try checkLimit()
                let instanceName = StoreRules.newInstanceName()
                let flavorJSON = String(decoding: try JSONEncoder().encode(size), as: UTF8.self)
                try db.execute(
                    sql: """
                        INSERT INTO instance (name, uuid, applianceID, ownerID, wispID, state, flavor, ipAddresses, consoleTail,
                        callbackURL, createdAt, updatedAt) VALUES (?, ?, ?, ?, ?, ?, ?, '[]', '[]', ?, ?, ?)
                        """,
                    arguments: [
                        instanceName, StoreRules.newID(), try row.decode(forColumn: "id") as Int64, userID, wispID, InstanceState.leased.rawValue, flavorJSON,
                        request.callbackURL, date, date,
                    ])
                instanceID = db.lastInsertedRowID
                _ = try Self.insertAction(
                    db, kind: .start, instanceID: instanceID, applianceID: try row.decode(forColumn: "id"), flavor: flavorJSON,
                    expires: request.leaseSeconds.map { date.addingTimeInterval(TimeInterval($0)) }, at: date)
            }
            let id = UUID().uuidString.lowercased()
            try db.execute(
                sql: """
                    INSERT INTO reservation (id, userID, instanceID, flavor, wispID, callbackURL, createdAt, expiresAt)
                    VALUES (?, ?, ?, ?, ?, ?, ?, ?)
                    """,
                arguments: [
                    id, userID, instanceID, request.flavor, wispID, request.callbackURL, date,
                    date.addingTimeInterval(TimeInterval(lifetime)),
                ])
            return try Self.reservation(db, id: id)
        }
    }

    static let reservationQuery = """
        SELECT reservation.*, user.name AS user, instance.name AS instance, appliance.name AS appliance, wisp.name AS wisp
        FROM reservation JOIN user ON user.id = reservation.userID JOIN instance ON instance.id = reservation.instanceID
        JOIN appliance ON appliance.id = instance.applianceID LEFT JOIN wisp ON wisp.id = reservation.wispID
        """

    public func reservations() async throws -> [Reservation] {
        try await database.read { db in
            try Row.fetchAll(db, sql: Self.reservationQuery + " ORDER BY reservation.createdAt").map(Self.reservation)
        }
    }

    // MARK: Housekeeping

    public func housekeep(at date: Date, offerStaleAfter: Int, purgeAfter: Int) async throws -> HousekeepingResult {
        try await database.write { db in
            var result = HousekeepingResult()
            result.lapsed = try Int.fetchOne(db, sql: "SELECT COUNT(*) FROM reservation WHERE expiresAt <= ?", arguments: [date]) ?? 0
            // A flavor slot never reported by its appliance goes with its reservation.
            try db.execute(
                sql: """
                    DELETE FROM instance WHERE reportedAt IS NULL AND id IN
                    (SELECT instanceID FROM reservation WHERE expiresAt <= ?)
                    """,
                arguments: [date])
            try db.execute(sql: "DELETE FROM reservation WHERE expiresAt <= ?", arguments: [date])
            let silentSince = date.addingTimeInterval(-TimeInterval(offerStaleAfter))
            let withdrawn = try String.fetchAll(
                db, sql: "SELECT name FROM instance WHERE state = ? AND COALESCE(reportedAt, updatedAt) < ?",
                arguments: [InstanceState.onOffer.rawValue, silentSince])
            for name in withdrawn {
                try db.execute(
                    sql: "UPDATE instance SET state = ?, updatedAt = ? WHERE name = ?",
                    arguments: [InstanceState.inactive.rawValue, date, name])
                result.withdrawn.append(try Self.instance(db, named: name).event)
            }
            let deadSince = date.addingTimeInterval(-TimeInterval(purgeAfter))
            try db.execute(
                sql: "DELETE FROM instance WHERE state IN (?, ?) AND updatedAt < ?",
                arguments: [InstanceState.inactive.rawValue, InstanceState.decommissioned.rawValue, deadSince])
            result.purged = db.changesCount
            try db.execute(sql: "DELETE FROM action WHERE doneAt < ?", arguments: [deadSince])
            return result
        }
    }

    // MARK: Helpers

    /// A write in one transaction, with SQLite's uniqueness failures turned
    /// into ``PoolError/alreadyExists(what:name:)``.
    func write<T: Sendable>(
        what: String, name: String, _ body: @escaping @Sendable (Database) throws -> T
    ) async throws -> T {
        do {
            return try await database.write(body)
        } catch let error as DatabaseError where error.extendedResultCode == .SQLITE_CONSTRAINT_UNIQUE {
            throw PoolError.alreadyExists(what: what, name: name)
        }
    }

    /// The id and owner's id of the appliance named `name`.
    static func applianceIDs(_ db: Database, named name: String) throws -> (id: Int64, ownerID: Int64) {
        guard let row = try Row.fetchOne(db, sql: "SELECT id, ownerID FROM appliance WHERE name = ?", arguments: [name]) else {
            throw PoolError.notFound(what: "appliance", name: name)
        }
        return (try row.decode(forColumn: "id"), try row.decode(forColumn: "ownerID"))
    }

    /// The instance named `name` if it exists and is the appliance's; nil if
    /// it does not exist; ``PoolError/forbidden(_:)`` if it is another's.
    static func ownedInstance(_ db: Database, named name: String, applianceID: Int64) throws -> (id: Int64, state: Int)? {
        guard let row = try Row.fetchOne(db, sql: "SELECT id, applianceID, state FROM instance WHERE name = ?", arguments: [name])
        else { return nil }
        guard try row.decode(forColumn: "applianceID") as Int64 == applianceID else {
            throw PoolError.forbidden("instance '\(name)' belongs to another appliance")
        }
        return (try row.decode(forColumn: "id"), try row.decode(forColumn: "state"))
    }

    /// Turns a pending reservation of the instance into its owner, wisp and callback.
    static func claimReservation(_ db: Database, instance name: String, at date: Date) throws {
        guard
            let reservation = try Row.fetchOne(
                db,
                sql: """
                    SELECT reservation.* FROM reservation JOIN instance ON instance.id = reservation.instanceID
                    WHERE instance.name = ? AND reservation.expiresAt > ?
                    """,
                arguments: [name, date])
        else { return }
        try db.execute(
            sql: "UPDATE instance SET ownerID = ?, wispID = ?, callbackURL = ? WHERE id = ?",
            arguments: [
                try reservation.decode(forColumn: "userID") as Int64, try reservation.decode(forColumn: "wispID") as Int64?, try reservation.decode(forColumn: "callbackURL") as String?,
                try reservation.decode(forColumn: "instanceID") as Int64,
            ])
        try db.execute(sql: "DELETE FROM reservation WHERE id = ?", arguments: [try reservation.decode(forColumn: "id") as String])
    }

    /// Refuses an appliance that is disabled or stale.
    static func checkPlaceable(_ row: Row, name: String, staleAfter: Int, at date: Date) throws {
        try StoreRules.checkPlaceable(
            name: name, enabled: try row.decode(forColumn: "enabled"), lastSeen: try row.decode(forColumn: "lastSeen"),
            staleAfter: staleAfter, at: date)
    }

    /// What an appliance has free (see ``StoreRules/freeRoom(stats:pending:)``).
    static func freeRoom(_ db: Database, applianceID: Int64, stats: String?) throws -> InstanceFlavor? {
        guard stats != nil else { return nil }
        let pending = try String.fetchAll(
            db,
            sql: """
                SELECT instance.flavor FROM action JOIN instance ON instance.id = action.instanceID
                WHERE action.applianceID = ? AND action.kind = 'start' AND action.doneAt IS NULL AND instance.flavor IS NOT NULL
                """,
            arguments: [applianceID])
        return StoreRules.freeRoom(stats: stats, pending: pending)
    }

    /// Refuses a new instance record of an appliance that holds `most` already.
    static func checkRecordRoom(_ db: Database, applianceID: Int64, appliance: String, adding: Int, most: Int) throws {
        let held = try Int.fetchOne(db, sql: "SELECT COUNT(*) FROM instance WHERE applianceID = ?", arguments: [applianceID]) ?? 0
        try StoreRules.checkRecordRoom(appliance: appliance, held: held, adding: adding, most: most)
    }

    /// Refuses a placement the appliance has no room for (see ``freeRoom(_:applianceID:stats:)``).
    static func checkRoom(_ db: Database, applianceID: Int64, stats: String?, for size: InstanceFlavor, appliance: String)
        throws
    {
        try StoreRules.checkRoom(try freeRoom(db, applianceID: applianceID, stats: stats), for: size, appliance: appliance)
    }

    static func insertAction(
        _ db: Database, kind: Action.Kind, instanceID: Int64, applianceID: Int64, flavor: String?, expires: Date?, at date: Date,
        keys: [String]? = nil, user: String? = nil, run: String? = nil
    ) throws -> Action {
        let id = UUID().uuidString.lowercased()
        let keyList = try keys.map { String(decoding: try JSONEncoder().encode($0), as: UTF8.self) }
        try db.execute(
            sql: """
                INSERT INTO action (id, instanceID, applianceID, kind, flavor, expires, createdAt, keys, user, run)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                """,
            arguments: [id, instanceID, applianceID, kind.rawValue, flavor, expires, date, keyList, user, run])
        guard
            let row = try Row.fetchOne(
                db,
                sql: "SELECT action.*, instance.name AS instance FROM action JOIN instance ON instance.id = action.instanceID WHERE action.id = ?",
                arguments: [id])
        else { throw PoolError.storage("action \(id) vanished") }
        return try action(row)
    }

    static func action(_ row: Row) throws -> Action {
        let flavor = (try row.decode(forColumn: "flavor") as String?).flatMap { try? JSONDecoder().decode(InstanceFlavor.self, from: Data($0.utf8)) }
        let expires: Date? = try row.decode(forColumn: "expires")
        return Action(
            id: try row.decode(forColumn: "id"), kind: Action.Kind(rawValue: try row.decode(forColumn: "kind")) ?? .reboot, instance: try row.decode(forColumn: "instance"), flavor: flavor,
            expires: expires.map { Int($0.timeIntervalSince1970) },
            keys: (try row.decode(forColumn: "keys") as String?).flatMap { try? JSONDecoder().decode([String].self, from: Data($0.utf8)) },
            user: try row.decode(forColumn: "user"), run: try row.decode(forColumn: "run"))
    }

    static func reservation(_ row: Row) throws -> Reservation {
        let expires: Date = try row.decode(forColumn: "expiresAt")
        return Reservation(
            id: try row.decode(forColumn: "id"), user: try row.decode(forColumn: "user"), instance: try row.decode(forColumn: "instance"), appliance: try row.decode(forColumn: "appliance"), flavor: try row.decode(forColumn: "flavor"),
            wisp: try row.decode(forColumn: "wisp"), callbackURL: try row.decode(forColumn: "callbackURL"), expires: Int(expires.timeIntervalSince1970))
    }

    static func reservation(_ db: Database, id: String) throws -> Reservation {
        guard let row = try Row.fetchOne(db, sql: reservationQuery + " WHERE reservation.id = ?", arguments: [id]) else {
            throw PoolError.storage("reservation \(id) vanished")
        }
        return try reservation(row)
    }

    static func userID(_ db: Database, named name: String) throws -> Int64 {
        guard let id = try Int64.fetchOne(db, sql: "SELECT id FROM user WHERE name = ?", arguments: [name]) else {
            throw PoolError.notFound(what: "user", name: name)
        }
        return id
    }

    static func image(_ row: Row) throws -> Image {
        let kernelBoot = (try row.decode(forColumn: "kernelBoot") as String?).flatMap { try? JSONDecoder().decode(KernelBoot.self, from: Data($0.utf8)) }
        return Image(
            name: try row.decode(forColumn: "name"), url: try row.decode(forColumn: "url"), sha256: try row.decode(forColumn: "sha256"),
            diskFormat: try row.decode(forColumn: "diskFormat"), kernelBoot: kernelBoot, loginUser: try row.decode(forColumn: "loginUser"),
            active: try row.decode(forColumn: "active"))
    }

    static func wisp(_ row: Row) throws -> Wisp {
        let keys: String = try row.decode(forColumn: "sshKeys")
        return Wisp(
            name: try row.decode(forColumn: "name"), owner: try row.decode(forColumn: "owner"), image: try row.decode(forColumn: "image"), dynamicImageURL: try row.decode(forColumn: "dynamicImageURL"),
            sshKeys: keys.isEmpty ? [] : keys.components(separatedBy: "\n"), postCreate: try row.decode(forColumn: "postCreate"),
            callbackURL: try row.decode(forColumn: "callbackURL"), isDefault: try row.decode(forColumn: "isDefault"), isSystemDefault: try row.decode(forColumn: "isSystemDefault"))
    }

    static func instance(_ row: Row) throws -> Instance {
        let decoder = JSONDecoder()
        func decode<T: Decodable>(_ column: String, as type: T.Type) -> T? {
            (row[column] as String?).flatMap { try? decoder.decode(T.self, from: Data($0.utf8)) }
        }
        let ownerID: String = try row.decode(forColumn: "ownerUUID")
        let granted = (decode("grantedUsers", as: [String].self) ?? []).filter { $0 != ownerID }
        return Instance(
            id: try row.decode(forColumn: "uuid"), name: try row.decode(forColumn: "name"), appliance: try row.decode(forColumn: "appliance"), owner: try row.decode(forColumn: "owner"), ownerID: ownerID,
            users: [ownerID] + granted, wisp: try row.decode(forColumn: "wisp"), image: try row.decode(forColumn: "image"), template: try row.decode(forColumn: "template"), warm: try row.decode(forColumn: "warm"),
            preemptible: try row.decode(forColumn: "preemptible"), topic: try row.decode(forColumn: "topic"),
            state: InstanceState(rawValue: try row.decode(forColumn: "state")) ?? .inactive, flavor: decode("flavor", as: InstanceFlavor.self),
            ask: try row.decode(forColumn: "ask"), expires: try row.decode(forColumn: "expires"), address: try row.decode(forColumn: "address"),
            ipAddresses: decode("ipAddresses", as: [IPAddress].self) ?? [],
            consoleTail: decode("consoleTail", as: [String].self) ?? [], ssh: decode("ssh", as: SSHEndpoint.self),
            loginUser: try row.decode(forColumn: "loginUser"), rekeying: try row.decode(forColumn: "rekeying"),
            callbackURL: try row.decode(forColumn: "callbackURL"),
            lastError: try row.decode(forColumn: "lastError"), stateReason: try row.decode(forColumn: "stateReason"), reportedAt: try row.decode(forColumn: "reportedAt"),
            createdAt: try row.decode(forColumn: "createdAt"), updatedAt: try row.decode(forColumn: "updatedAt"))
    }

    static func instance(_ db: Database, named name: String) throws -> Instance {
        guard let row = try Row.fetchOne(db, sql: instanceQuery + " WHERE instance.name = ?", arguments: [name]) else {
            throw PoolError.notFound(what: "instance", name: name)
        }
        return try instance(row)
    }

    static func user(_ row: Row) throws -> User {
        User(
            id: try row.decode(forColumn: "uuid"), name: try row.decode(forColumn: "name"), superuser: try row.decode(forColumn: "superuser"), maxInstances: try row.decode(forColumn: "maxInstances"),
            manager: try row.decode(forColumn: "manager"), leaseSeconds: try row.decode(forColumn: "leaseSeconds"), createdAt: try row.decode(forColumn: "createdAt"),
            enabled: try row.decode(forColumn: "enabled"))
    }

    static func appliance(_ row: Row) throws -> Appliance {
        Appliance(
            name: try row.decode(forColumn: "name"), owner: try row.decode(forColumn: "owner"), enabled: try row.decode(forColumn: "enabled"), version: try row.decode(forColumn: "version"),
            latitude: try row.decode(forColumn: "latitude"), longitude: try row.decode(forColumn: "longitude"), dynamicImages: try row.decode(forColumn: "dynamicImages"),
            region: try row.decode(forColumn: "region"), lastSeen: try row.decode(forColumn: "lastSeen"),
            stats: (try row.decode(forColumn: "stats") as String?).flatMap { try? JSONDecoder().decode(HypervisorStats.self, from: Data($0.utf8)) },
            createdAt: try row.decode(forColumn: "createdAt"))
    }

    static func appliance(_ db: Database, named name: String) throws -> Appliance {
        guard let row = try Row.fetchOne(db, sql: applianceQuery + " WHERE appliance.name = ?", arguments: [name]) else {
            throw PoolError.notFound(what: "appliance", name: name)
        }
        return try appliance(row)
    }
}

/// Wakes the held check-ins of the appliances whose actions were inserted
/// by a committed transaction of this process (those of a `corral pool`
/// command, another process, are found by `followOtherWriters`).
final class NewActionObserver: TransactionObserver, @unchecked Sendable {
    private let signal: ChangeSignal
    /// Row ids inserted by the current transaction; touched only on the
    /// database's writer, which runs one transaction at a time.
    private var inserted: [Int64] = []

    init(signal: ChangeSignal) { self.signal = signal }

    func observes(eventsOfKind eventKind: DatabaseEventKind) -> Bool {
        if case .insert(let table) = eventKind { return table == "action" }
        return false
    }

    func databaseDidChange(with event: DatabaseEvent) { inserted.append(event.rowID) }

    func databaseDidCommit(_ db: Database) {
        let rows = inserted
        inserted = []
        guard !rows.isEmpty else { return }
        let names = try? String.fetchAll(
            db,
            sql: """
                SELECT DISTINCT appliance.name FROM action JOIN appliance ON appliance.id = action.applianceID
                WHERE action.rowid IN (\(rows.map(String.init).joined(separator: ",")))
                """)
        guard let names else { return signal.signal() }  // cannot tell whose: wake all
        for name in names { signal.signal(name) }
    }

    func databaseDidRollback(_ db: Database) { inserted = [] }
}

extension Array {
    /// The elements in runs of at most `size` (the last one shorter).
    func chunked(by size: Int) -> [ArraySlice<Element>] {
        stride(from: 0, to: count, by: size).map { self[$0..<Swift.min($0 + size, count)] }
    }
}
