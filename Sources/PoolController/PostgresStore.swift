import Crypto
import Foundation
import Logging
import PoolAPI
import PostgresNIO

/// The pool's store on a PostgreSQL server, for a fleet that outgrows one
/// pool machine: several `corral pool serve` replicas share one database.
///
/// Every write is one transaction, retried when PostgreSQL reports a
/// serialization failure or a deadlock:
/// - what users and the pool's passes change (creates and their limits,
///   placements and room, warm claims, reservations, catalogue edits,
///   housekeeping) runs SERIALIZABLE, so each rule that spans rows holds
///   across replicas exactly as under SQLite's single writer;
/// - what an appliance reports (check-ins, instance reports) runs READ
///   COMMITTED holding its appliance's row lock (`FOR UPDATE`): one
///   appliance's reports apply one at a time, different appliances' in
///   parallel. Instance ownership rests on the unique instance name: of two
///   appliances recording one name at once, the second waits, fails on the
///   constraint, runs again and finds the instance is another's.
/// Unique constraints back every name. Reads run outside transactions.
///
/// Held check-ins wake across replicas through LISTEN/NOTIFY on
/// `corral_actions`; the pool-wide passes run on the replica that holds an
/// advisory lock (see ``leads()``).
public final class PostgresStore: PoolStore {
    let client: PostgresClient
    let location: PostgresLocation
    let logger: Logger
    public let actionsChanged = ChangeSignal()
    private let running: Task<Void, Never>
    let leadership: Leadership
    /// This replica, as its announced events name it.
    let replicaID = UUID().uuidString

    /// How often a write is tried when PostgreSQL reports a serialization
    /// failure or a deadlock (each a sign another replica's write won).
    static let maximumAttempts = 40

    /// Connects and migrates the database to this build's schema.
    public static func open(url: String, logger: Logger, maximumConnections: Int = 20) async throws -> PostgresStore {
        let location = try PostgresLocation(url: url)
        let store = try PostgresStore(location: location, logger: logger, maximumConnections: maximumConnections)
        do {
            // One connection of its own first: the pool's errors hide the server's reason.
            let connection = try await PostgresConnection.connect(
                configuration: try location.connectionConfiguration(), id: 0, logger: logger)
            try await connection.close()
            try await store.migrate()
        } catch {
            store.close()
            throw PoolError.storage("cannot open the pool database at \(location.redacted): \(Self.describe(error))")
        }
        return store
    }

    init(location: PostgresLocation, logger: Logger, maximumConnections: Int) throws {
        var configuration = PostgresClient.Configuration(
            host: location.host, port: location.port, username: location.user, password: location.password,
            database: location.database, tls: try location.clientTLS())
        configuration.options.maximumConnections = maximumConnections
        configuration.options.connectionIdleTimeout = .seconds(20)
        let client = PostgresClient(configuration: configuration, backgroundLogger: logger)
        self.client = client
        self.location = location
        self.logger = logger
        leadership = Leadership(location: location, logger: logger)
        running = Task { await client.run() }
    }

    deinit { close() }

    /// Closes the store's connections (and gives up leadership).
    public func close() {
        running.cancel()
        Task { [leadership] in await leadership.resign() }
    }

    /// One line for a database error (PostgresNIO's own description hides the server's message).
    static func describe(_ error: any Error) -> String {
        guard let error = error as? PSQLError else { return "\(error)" }
        if let message = error.serverInfo?[.message] {
            return "\(message) (SQLSTATE \(error.serverInfo?[.sqlState] ?? "?"))"
        }
        let underlying = error.underlying.map { "\($0)" } ?? ""
        if underlying.contains("CERTIFICATE_VERIFY_FAILED") {
            return "the server's TLS certificate was not accepted (CERTIFICATE_VERIFY_FAILED): with sslmode=verify-full, sslrootcert "
                + "(else the system's CAs) must hold the CA that signed it and the URL's host must be a name or address in it; "
                + "sslmode=require encrypts without checking"
        }
        if underlying.contains("handshake") || "\(error.code)".contains("sslUnsupported") {
            return "\(error.code): \(underlying.prefix(300)) (does the server serve TLS? sslmode=disable connects without it)"
        }
        return "\(error.code)" + (underlying.isEmpty ? "" : ": \(underlying)")
    }

    // MARK: Sessions

    /// The queries of one connection (inside a transaction for writes).
    final class Session {
        let connection: PostgresConnection
        let logger: Logger
        /// Appliances whose actions this transaction added: their held
        /// check-ins are woken once it commits.
        var woken: Set<String> = []

        init(connection: PostgresConnection, logger: Logger) {
            self.connection = connection
            self.logger = logger
        }

        func rows(_ query: PostgresQuery) async throws -> [Row] {
            var rows: [Row] = []
            for try await row in try await connection.query(query, logger: logger) { rows.append(Row(row.makeRandomAccess())) }
            return rows
        }

        func row(_ query: PostgresQuery) async throws -> Row? { try await rows(query).first }

        /// The first column of the first row, or nil when there is no row.
        func value<T: PostgresDecodable>(_ query: PostgresQuery, as type: T.Type = T.self) async throws -> T? {
            try await row(query).map { try $0.first(T.self) }
        }

        /// Runs a statement; how many rows it returned (use `RETURNING` to count changes).
        @discardableResult
        func execute(_ query: PostgresQuery) async throws -> Int { try await rows(query).count }
    }

    /// A row, its columns looked up by name (PostgreSQL folds unquoted names to lower case).
    struct Row {
        let row: PostgresRandomAccessRow
        init(_ row: PostgresRandomAccessRow) { self.row = row }

        func get<T: PostgresDecodable>(_ column: String, as type: T.Type = T.self) throws -> T {
            let name = column.lowercased()
            guard row.contains(name) else { throw PoolError.storage("the pool database answered without column '\(column)'") }
            return try row[name].decode(T.self)
        }

        func first<T: PostgresDecodable>(_ type: T.Type) throws -> T {
            guard row.count > 0 else { throw PoolError.storage("the pool database answered with no columns") }
            return try row[0].decode(T.self)
        }
    }

    /// Runs reads on one connection, each statement on its own.
    func read<T: Sendable>(_ body: (Session) async throws -> T) async throws -> T {
        do {
            return try await client.withConnection { connection in
                try await body(Session(connection: connection, logger: logger))
            }
        } catch let error as PoolError {
            throw error
        } catch {
            throw PoolError.storage("the pool database failed: \(Self.describe(error))")
        }
    }

    enum Isolation: String {
        case serializable = "SERIALIZABLE"
        /// For an appliance's own reports, which lock their appliance's row.
        case readCommitted = "READ COMMITTED"
    }

    /// Runs `body` in one transaction, again from the start when another
    /// transaction's commit made it fail to serialize (or, under READ
    /// COMMITTED, made an insert fail on a unique name). A uniqueness
    /// failure is ``PoolError/alreadyExists(what:name:)`` when `what` is given.
    func write<T: Sendable>(
        what: String? = nil, name: String = "", isolation: Isolation = .serializable, _ body: (Session) async throws -> T
    ) async throws -> T {
        var attempt = 0
        while true {
            attempt += 1
            do {
                let (value, woken) = try await client.withConnection { connection in
                    let session = Session(connection: connection, logger: logger)
                    try await session.execute("BEGIN ISOLATION LEVEL \(unescaped: isolation.rawValue)")
                    do {
                        let value = try await body(session)
                        try await session.execute("COMMIT")
                        return (value, session.woken)
                    } catch {
                        _ = try? await session.execute("ROLLBACK")
                        throw error
                    }
                }
                for appliance in woken { actionsChanged.signal(appliance) }
                return value
            } catch let error as PSQLError {
                let state = error.serverInfo?[.sqlState]
                let lostRace = state == "40001" || state == "40P01" || (state == "23505" && isolation == .readCommitted)
                if lostRace, attempt < Self.maximumAttempts {
                    // Back off a little, more each time, so the winners finish.
                    try await Task.sleep(for: .microseconds(Int.random(in: 100...(500 * min(attempt, 20)))))
                    continue
                }
                if state == "23505", let what { throw PoolError.alreadyExists(what: what, name: name) }
                throw PoolError.storage("the pool database failed: \(Self.describe(error))")
            }
        }
    }

    // MARK: Migrations

    /// This build's migrations, by identifier, in order; each a list of statements.
    static let migrations: [(identifier: String, statements: [String])] = [("1-pool", PostgresSchema.initial)]

    /// Applies the migrations this database lacks, one replica at a time.
    func migrate() async throws {
        try await client.withConnection { connection in
            let session = Session(connection: connection, logger: logger)
            try await session.execute("BEGIN")
            do {
                try await session.execute("SELECT pg_advisory_xact_lock(\(Self.migrationLock))")
                try await session.execute(
                    "CREATE TABLE IF NOT EXISTS corral_migration (identifier text PRIMARY KEY, appliedAt timestamptz NOT NULL)")
                let applied = Set(try await session.rows("SELECT identifier FROM corral_migration").map { try $0.get("identifier", as: String.self) })
                for migration in Self.migrations where !applied.contains(migration.identifier) {
                    for statement in migration.statements { try await session.execute(PostgresQuery(unsafeSQL: statement)) }
                    try await session.execute("INSERT INTO corral_migration (identifier, appliedAt) VALUES (\(migration.identifier), \(Date()))")
                    logger.info("pool database migrated", metadata: ["migration": "\(migration.identifier)"])
                }
                try await session.execute("COMMIT")
            } catch {
                _ = try? await session.execute("ROLLBACK")
                throw error
            }
        }
    }

    /// The identifiers of the migrations applied to the database, in order.
    public func appliedMigrations() async throws -> [String] {
        try await read { session in
            try await session.rows("SELECT identifier FROM corral_migration ORDER BY appliedAt, identifier").map { try $0.get("identifier") }
        }
    }

    /// Advisory lock keys (one space per database): migrations, and the leader's.
    static let migrationLock: Int = 0x636f_7272_616c_01
    static let leaderLock: Int = 0x636f_7272_616c_02

    public func readinessProblem() async -> String? {
        do {
            let applied = try await appliedMigrations()
            let known = Self.migrations.map(\.identifier)
            if applied.contains(where: { !known.contains($0) }) {
                return "the database has migrations this build of corral does not know (a newer corral migrated it); run the newer corral"
            }
            if known.contains(where: { !applied.contains($0) }) {
                return "the database's migrations are not all applied; run `corral pool migrate` or restart the pool"
            }
            return nil
        } catch {
            return "the database cannot be read: \(error)"
        }
    }

    public func instanceCountsByState() async throws -> [InstanceState: Int] {
        try await read { session in
            var counts: [InstanceState: Int] = [:]
            for row in try await session.rows("SELECT state, COUNT(*) AS count FROM instance GROUP BY state") {
                guard let state = InstanceState(rawValue: try row.get("state")) else { continue }
                counts[state] = try row.get("count")
            }
            return counts
        }
    }

    // MARK: Users

    static let userQuery = """
        SELECT "user".*, manager.name AS manager FROM "user" LEFT JOIN "user" AS manager ON manager.id = "user".managerID
        """

    static func user(_ row: Row) throws -> User { try row.decode(UserRecord.self).model }

    public func addUser(
        name: String, superuser: Bool, maxInstances: Int, tokenDigest: String, manager: String?, leaseSeconds: Int?
    ) async throws -> User {
        try await write(what: "user", name: name) { session in
            let managerID = try await manager.asyncMap { try await Self.userID(session, named: $0) }
            try await session.execute(
                """
                INSERT INTO "user" (name, uuid, superuser, maxInstances, tokenDigest, managerID, leaseSeconds, enabled, createdAt)
                VALUES (\(name), \(StoreRules.newID()), \(superuser), \(maxInstances), \(tokenDigest), \(managerID), \(leaseSeconds), true, \(Date()))
                """)
            return try await Self.user(session, named: name)
        }
    }

    public func users() async throws -> [User] {
        try await read { session in try await session.rows("\(unescaped: Self.userQuery) ORDER BY \"user\".name").map(Self.user) }
    }

    public func user(tokenDigest: String) async throws -> User? {
        try await read { session in
            try await session.row("\(unescaped: Self.userQuery) WHERE \"user\".tokenDigest = \(tokenDigest)").map(Self.user)
        }
    }

    public func user(named name: String) async throws -> User {
        try await read { session in try await Self.user(session, named: name) }
    }

    static func user(_ session: Session, named name: String) async throws -> User {
        guard let row = try await session.row("\(unescaped: userQuery) WHERE \"user\".name = \(name)") else {
            throw PoolError.notFound(what: "user", name: name)
        }
        return try user(row)
    }

    public func setUser(_ name: String, enabled: Bool) async throws -> User {
        try await write { session in
            guard try await session.execute("UPDATE \"user\" SET enabled = \(enabled) WHERE name = \(name) RETURNING id") == 1 else {
                throw PoolError.notFound(what: "user", name: name)
            }
            return try await Self.user(session, named: name)
        }
    }

    public func setUserToken(_ name: String, tokenDigest: String) async throws -> User {
        try await write { session in
            guard try await session.execute("UPDATE \"user\" SET tokenDigest = \(tokenDigest) WHERE name = \(name) RETURNING id") == 1 else {
                throw PoolError.notFound(what: "user", name: name)
            }
            return try await Self.user(session, named: name)
        }
    }

    static func userID(_ session: Session, named name: String) async throws -> Int {
        guard let id = try await session.value("SELECT id FROM \"user\" WHERE name = \(name)", as: Int.self) else {
            throw PoolError.notFound(what: "user", name: name)
        }
        return id
    }

    public func signingKey() async throws -> Data {
        try await write { session in
            if let key = try await session.value("SELECT privateKey FROM signingKey WHERE id = 1", as: Data.self) { return key }
            let key = Curve25519.Signing.PrivateKey().rawRepresentation
            try await session.execute("INSERT INTO signingKey (id, privateKey, createdAt) VALUES (1, \(key), \(Date()))")
            return key
        }
    }

    // MARK: Appliances

    static let applianceQuery = """
        SELECT appliance.*, "user".name AS owner FROM appliance JOIN "user" ON "user".id = appliance.ownerID
        """

    static func appliance(_ row: Row) throws -> Appliance { try row.decode(ApplianceRecord.self).model }

    static func appliance(_ session: Session, named name: String) async throws -> Appliance {
        guard let row = try await session.row("\(unescaped: applianceQuery) WHERE appliance.name = \(name)") else {
            throw PoolError.notFound(what: "appliance", name: name)
        }
        return try appliance(row)
    }

    public func addAppliance(name: String, owner: String, tokenDigest: String) async throws -> Appliance {
        try await write(what: "appliance", name: name) { session in
            let ownerID = try await Self.userID(session, named: owner)
            try await session.execute(
                """
                INSERT INTO appliance (name, ownerID, enabled, tokenDigest, dynamicImages, createdAt)
                VALUES (\(name), \(ownerID), true, \(tokenDigest), false, \(Date()))
                """)
            return try await Self.appliance(session, named: name)
        }
    }

    public func appliances() async throws -> [Appliance] {
        try await read { session in try await session.rows("\(unescaped: Self.applianceQuery) ORDER BY appliance.name").map(Self.appliance) }
    }

    public func setAppliance(_ name: String, enabled: Bool) async throws -> Appliance {
        try await write { session in
            guard try await session.execute("UPDATE appliance SET enabled = \(enabled) WHERE name = \(name) RETURNING id") == 1 else {
                throw PoolError.notFound(what: "appliance", name: name)
            }
            return try await Self.appliance(session, named: name)
        }
    }

    public func setAppliance(_ name: String, region: String?) async throws -> Appliance {
        try await write { session in
            guard try await session.execute("UPDATE appliance SET region = \(region) WHERE name = \(name) RETURNING id") == 1 else {
                throw PoolError.notFound(what: "appliance", name: name)
            }
            return try await Self.appliance(session, named: name)
        }
    }

    public func setApplianceToken(_ name: String, tokenDigest: String) async throws {
        try await write { session in
            guard try await session.execute("UPDATE appliance SET tokenDigest = \(tokenDigest) WHERE name = \(name) RETURNING id") == 1 else {
                throw PoolError.notFound(what: "appliance", name: name)
            }
        }
    }

    public func appliance(tokenDigest: String) async throws -> Appliance? {
        try await read { session in
            try await session.row("\(unescaped: Self.applianceQuery) WHERE appliance.tokenDigest = \(tokenDigest)").map(Self.appliance)
        }
    }

    public func recordCheckIn(_ name: String, block: ApplianceBlock, at date: Date) async throws -> Appliance {
        try await write(isolation: .readCommitted) { session in
            guard
                try await session.execute(
                    """
                    UPDATE appliance SET version = COALESCE(\(block.version), version), latitude = COALESCE(\(block.latitude), latitude),
                    longitude = COALESCE(\(block.longitude), longitude), dynamicImages = COALESCE(\(block.dynamicimages), dynamicImages),
                    lastSeen = \(date) WHERE name = \(name) RETURNING id
                    """) == 1
            else { throw PoolError.notFound(what: "appliance", name: name) }
            return try await Self.appliance(session, named: name)
        }
    }

    /// The id and owner's id of the appliance named `name`.
    static func applianceIDs(_ session: Session, named name: String) async throws -> (id: Int, ownerID: Int) {
        guard let row = try await session.row("SELECT id, ownerID FROM appliance WHERE name = \(name)") else {
            throw PoolError.notFound(what: "appliance", name: name)
        }
        return (try row.get("id"), try row.get("ownerID"))
    }

    // MARK: Flavors, images, wisps

    static func flavor(_ row: Row) throws -> Flavor { try row.decode(FlavorRecord.self).model }

    public func addFlavor(_ flavor: Flavor) async throws {
        // Unique twice over: by name (checked here) and by specs (the constraint the insert hits).
        try await write(what: "flavor with these specs", name: flavor.name) { session in
            if try await session.row("SELECT 1 FROM flavor WHERE name = \(flavor.name)") != nil {
                throw PoolError.alreadyExists(what: "flavor", name: flavor.name)
            }
            try await session.execute(
                """
                INSERT INTO flavor (name, description, vcpus, memory, disk, networkUp, networkDown, rate, ask, hot, active)
                VALUES (\(flavor.name), \(flavor.description), \(flavor.vcpus), \(flavor.memory), \(flavor.disk), \(flavor.networkUp),
                \(flavor.networkDown), \(flavor.rate), \(flavor.ask), \(flavor.hot), \(flavor.active))
                """)
        }
    }

    public func flavors() async throws -> [Flavor] {
        try await read { session in try await session.rows("SELECT * FROM flavor ORDER BY name").map(Self.flavor) }
    }

    static func image(_ row: Row) throws -> Image { try row.decode(ImageRecord.self).model }

    public func addImage(_ image: Image) async throws {
        let kernelBoot = try image.kernelBoot.map { try StoreRules.json($0) }
        try await write(what: "image", name: image.name) { session in
            try await session.execute(
                """
                INSERT INTO image (name, url, sha256, diskFormat, kernelBoot, loginUser, active)
                VALUES (\(image.name), \(image.url), \(image.sha256), \(image.diskFormat), \(kernelBoot), \(image.loginUser), \(image.active))
                """)
        }
    }

    public func images() async throws -> [Image] {
        try await read { session in try await session.rows("SELECT * FROM image ORDER BY name").map(Self.image) }
    }

    static let wispQuery = """
        SELECT wisp.*, "user".name AS owner, image.name AS image FROM wisp
        JOIN "user" ON "user".id = wisp.ownerID LEFT JOIN image ON image.id = wisp.imageID
        """

    static func wisp(_ row: Row) throws -> Wisp { try row.decode(WispRecord.self).model }

    public func addWisp(_ wisp: Wisp) async throws {
        try await write(what: "wisp", name: wisp.name) { session in
            let ownerID = try await Self.userID(session, named: wisp.owner)
            var imageID: Int?
            if let image = wisp.image {
                guard let id = try await session.value("SELECT id FROM image WHERE name = \(image)", as: Int.self) else {
                    throw PoolError.notFound(what: "image", name: image)
                }
                imageID = id
            }
            if wisp.isDefault { try await session.execute("UPDATE wisp SET isDefault = false WHERE ownerID = \(ownerID)") }
            if wisp.isSystemDefault { try await session.execute("UPDATE wisp SET isSystemDefault = false WHERE isSystemDefault") }
            try await session.execute(
                """
                INSERT INTO wisp (name, ownerID, imageID, dynamicImageURL, sshKeys, postCreate, callbackURL, isDefault, isSystemDefault)
                VALUES (\(wisp.name), \(ownerID), \(imageID), \(wisp.dynamicImageURL), \(wisp.sshKeys.joined(separator: "\n")),
                \(wisp.postCreate), \(wisp.callbackURL), \(wisp.isDefault), \(wisp.isSystemDefault))
                """)
        }
    }

    public func wisps() async throws -> [Wisp] {
        try await read { session in try await session.rows("\(unescaped: Self.wispQuery) ORDER BY wisp.name").map(Self.wisp) }
    }
}

extension Optional {
    /// The value mapped by an async function, or nil.
    func asyncMap<T>(_ transform: (Wrapped) async throws -> T) async rethrows -> T? {
        guard let value = self else { return nil }
        return try await transform(value)
    }
}

/// Opens the pool's store where `configuration.database` says: a
/// `postgres://` URL opens a ``PostgresStore``, anything else is a SQLite
/// file's path. Either is migrated to this build's schema.
public func openPoolStore(_ configuration: PoolConfiguration, logger: Logger) async throws -> any PoolStore {
    if PostgresLocation.isURL(configuration.database) {
        return try await PostgresStore.open(
            url: configuration.database, logger: logger, maximumConnections: configuration.databaseConnections)
    }
    return try SQLiteStore(path: configuration.database)
}
