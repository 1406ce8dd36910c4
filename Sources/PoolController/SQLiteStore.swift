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

    static func action(_ row: Row) throws -> Action { try ActionRecord(row: row).model }

    static func reservation(_ row: Row) throws -> Reservation { try ReservationRecord(row: row).model }

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

    static func image(_ row: Row) throws -> Image { try ImageRecord(row: row).model }

    static func wisp(_ row: Row) throws -> Wisp { try WispRecord(row: row).model }

    static func instance(_ row: Row) throws -> Instance { try InstanceRecord(row: row).model }

    static func instance(_ db: Database, named name: String) throws -> Instance {
        guard let row = try Row.fetchOne(db, sql: instanceQuery + " WHERE instance.name = ?", arguments: [name]) else {
            throw PoolError.notFound(what: "instance", name: name)
        }
        return try instance(row)
    }

    static func user(_ row: Row) throws -> User { try UserRecord(row: row).model }

    static func appliance(_ row: Row) throws -> Appliance { try ApplianceRecord(row: row).model }

    static func appliance(_ db: Database, named name: String) throws -> Appliance {
        guard let row = try Row.fetchOne(db, sql: applianceQuery + " WHERE appliance.name = ?", arguments: [name]) else {
            throw PoolError.notFound(what: "appliance", name: name)
        }
        return try appliance(row)
    }
}

// Each store row's record, decoded by GRDB (a JSON array column into `[String]`).
extension UserRecord: FetchableRecord {}
extension ApplianceRecord: FetchableRecord {}
extension FlavorRecord: FetchableRecord {}
extension ImageRecord: FetchableRecord {}
extension WispRecord: FetchableRecord {}
extension ActionRecord: FetchableRecord {}
extension ReservationRecord: FetchableRecord {}
extension InstanceRecord: FetchableRecord {}

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
