import Foundation
import Support
import GRDB
import PoolAPI

/// What the agent knows about one of its instances, kept in its SQLite file
/// so that a restart (even after `kill -9`) picks up where it stopped.
public struct LocalInstance: Sendable, Equatable, Codable, FetchableRecord, PersistableRecord {
    public static let databaseTableName = "instance"

    /// Where the instance is in its life on this appliance.
    public enum Phase: String, Sendable, Codable, CaseIterable {
        /// A start was accepted; the build runs (again, after a restart).
        case building
        /// The domain was started; waiting for the guest to come up.
        case booting
        /// Built; libvirt's state says what to report.
        case active
        /// A build or boot failed; what was made is kept for inspection.
        case errored
        /// The lease ended and the VM was suspended; decommissioned after
        /// the grace period.
        case expired
        /// A delete was accepted (or the grace period ended); decommission
        /// runs (again, after a restart).
        case deleting
    }

    public var name: String
    public var phase: Phase
    /// The state last reported to the pool.
    public var state: InstanceState
    public var flavor: InstanceFlavor
    /// When the lease ends (nil: never).
    public var expires: Date?
    /// The libvirt domain's UUID, chosen before it is defined.
    public var uuid: String
    public var macAddress: String
    /// The loopback port forwarded to the guest's port 22 (user-mode
    /// networking with `ssh_forward_ports`).
    public var sshPort: Int?
    public var lastError: String?
    /// When the domain was started (for the boot timeout).
    public var bootedAt: Date?
    /// When the lease's end suspended the VM.
    public var expiredAt: Date?
    /// When the pool last accepted a report of this instance.
    public var reportedAt: Date?
    public var createdAt: Date
    /// The newest key list the pool sent (a `keys` action) for the guest's
    /// login user `keysUser`, and that action's id.
    public var authorizedKeys: [String]?
    public var keysUser: String?
    public var keysAction: String?
    /// The id of the newest `keys` action carried out (or given up on).
    public var keysApplied: String?
    /// Why the newest key list could not be set in the guest.
    public var keysError: String?
    /// A script to start once in the guest after its keys are set.
    public var runOnce: String?

    /// Whether the guest still has to get the newest key list.
    public var keysPending: Bool { keysAction != nil && keysAction != keysApplied }

    public init(
        name: String, phase: Phase, state: InstanceState, flavor: InstanceFlavor, expires: Date?, uuid: String,
        macAddress: String, sshPort: Int? = nil, createdAt: Date
    ) {
        self.name = name
        self.phase = phase
        self.state = state
        self.flavor = flavor
        self.expires = expires
        self.uuid = uuid
        self.macAddress = macAddress
        self.sshPort = sshPort
        self.createdAt = createdAt
    }
}

/// A report waiting to be sent, in the order it was made.
public struct PendingReport: Sendable, Equatable {
    public var sequence: Int64
    public var report: InstanceReport
    public var createdAt: Date
}

/// A cached image file: what URL it came from and where it is.
struct CachedFile: Sendable, Equatable, Codable, FetchableRecord, PersistableRecord {
    static let databaseTableName = "cachedFile"
    var url: String
    var sha256: String
    var format: String
    var bytes: Int64
    var fetchedAt: Date
}

/// The agent's durable state: its instances, the action ids it applied
/// (so each is applied once), and the reports not yet delivered.
public final class AgentStore: Sendable {
    let database: DatabaseQueue

    public init(path: String) throws {
        let directory = URL(fileURLWithPath: path).deletingLastPathComponent()
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        var configuration = Configuration()
        configuration.busyMode = .timeout(10)
        database = try DatabaseQueue(path: path, configuration: configuration)
        try Self.migrator.migrate(database)
        // Root's alone (SQLite gives its journal files the same mode).
        for file in [path, path + "-wal", path + "-shm"] where FileManager.default.fileExists(atPath: file) {
            try FileModes.set(file, mode: 0o600)
        }
    }

    static var migrator: DatabaseMigrator {
        var migrator = DatabaseMigrator()
        migrator.registerMigration("1-instances-actions-outbox-images") { db in
            try db.create(table: "instance") { table in
                table.primaryKey("name", .text)
                table.column("phase", .text).notNull()
                table.column("state", .integer).notNull()
                table.column("flavor", .jsonText).notNull()
                table.column("expires", .datetime)
                table.column("uuid", .text).notNull().unique()
                table.column("macAddress", .text).notNull()
                table.column("sshPort", .integer).unique()
                table.column("lastError", .text)
                table.column("bootedAt", .datetime)
                table.column("expiredAt", .datetime)
                table.column("reportedAt", .datetime)
                table.column("createdAt", .datetime).notNull()
            }
            try db.create(table: "appliedAction") { table in
                table.primaryKey("id", .text)
                table.column("instance", .text).notNull()
                table.column("kind", .text).notNull()
                table.column("appliedAt", .datetime).notNull()
                // Set once a check-in told the pool; kept a while after, so a
                // late resend is still recognised.
                table.column("acknowledgedAt", .datetime)
            }
            try db.create(table: "outbox") { table in
                table.autoIncrementedPrimaryKey("sequence")
                table.column("instance", .text).notNull()
                table.column("report", .jsonText).notNull()
                table.column("createdAt", .datetime).notNull()
            }
            try db.create(table: "cachedFile") { table in
                table.primaryKey("url", .text)
                table.column("sha256", .text).notNull()
                table.column("format", .text).notNull()
                table.column("bytes", .integer).notNull()
                table.column("fetchedAt", .datetime).notNull()
            }
        }
        migrator.registerMigration("2-launch-timeline") { db in
            // When each instance reached each launch phase (see LaunchPhase).
            try db.create(table: "timelineEntry") { table in
                table.column("instance", .text).notNull()
                table.column("phase", .text).notNull()
                table.column("at", .double).notNull()
                table.column("detail", .text)
                table.primaryKey(["instance", "phase"])
            }
        }
        migrator.registerMigration("3-image-use") { db in
            // Which cached files (by digest) each instance was built from:
            // eviction never removes a file an existing instance uses.
            try db.create(table: "imageUse") { table in
                table.column("instance", .text).notNull()
                table.column("sha256", .text).notNull()
                table.primaryKey(["instance", "sha256"])
            }
        }
        migrator.registerMigration("4-guest-keys") { db in
            try db.alter(table: "instance") { table in
                table.add(column: "authorizedKeys", .jsonText)
                table.add(column: "keysUser", .text)
                table.add(column: "keysAction", .text)
                table.add(column: "keysApplied", .text)
                table.add(column: "keysError", .text)
                table.add(column: "runOnce", .text)
            }
        }
        return migrator
    }

    // MARK: Instances

    public func instances() async throws -> [LocalInstance] {
        try await database.read { db in try LocalInstance.order(Column("createdAt")).fetchAll(db) }
    }

    public func instance(named name: String) async throws -> LocalInstance? {
        try await database.read { db in try LocalInstance.fetchOne(db, key: name) }
    }

    /// Saves `instance` (inserting or replacing it).
    public func save(_ instance: LocalInstance) async throws {
        try await database.write { db in try instance.save(db) }
    }

    /// Changes the stored instance named `name`, if there is one, and
    /// returns it as changed.
    @discardableResult
    public func update(_ name: String, _ change: @escaping @Sendable (inout LocalInstance) -> Void) async throws -> LocalInstance? {
        try await database.write { db in
            guard var instance = try LocalInstance.fetchOne(db, key: name) else { return nil }
            change(&instance)
            try instance.update(db)
            return instance
        }
    }

    /// Records that the guest got the key list of action `id` (or, with
    /// `error`, that it could not); the run-once script is done with either
    /// way. Nothing changes when a newer list arrived meanwhile.
    public func keysApplied(_ name: String, action id: String, error: String?) async throws {
        try await database.write { db in
            try db.execute(
                sql: "UPDATE instance SET keysApplied = ?, keysError = ?, runOnce = NULL WHERE name = ? AND keysAction = ?",
                arguments: [id, error, name, id])
        }
    }

    public func remove(_ name: String) async throws {
        try await database.write { db in
            _ = try LocalInstance.deleteOne(db, key: name)
            try db.execute(sql: "DELETE FROM timelineEntry WHERE instance = ?", arguments: [name])
        }
    }

    /// The lowest port of `range` no instance forwards yet.
    func freePort(in range: ClosedRange<Int>) async throws -> Int? {
        try await database.read { db in
            let used = Set(try Int.fetchAll(db, sql: "SELECT sshPort FROM instance WHERE sshPort IS NOT NULL"))
            return range.first { !used.contains($0) }
        }
    }

    // MARK: Launch timeline

    /// Records when the instance reached a phase; an earlier time for it
    /// stays unless `replacing` (a build that starts over replaces its own).
    public func record(_ phase: LaunchPhase, of name: String, at date: Date, detail: String? = nil, replacing: Bool = true)
        async throws
    {
        let entry = TimelineEntry(phase: phase, at: date, detail: detail)
        try await database.write { db in try Self.record(db, entry, of: name, replacing: replacing) }
    }

    static func record(_ db: Database, _ entry: TimelineEntry, of name: String, replacing: Bool) throws {
        try db.execute(
            sql: "INSERT OR \(replacing ? "REPLACE" : "IGNORE") INTO timelineEntry (instance, phase, at, detail) VALUES (?, ?, ?, ?)",
            arguments: [name, entry.phase.rawValue, entry.at, entry.detail])
    }

    /// The instance's launch phases so far, in order.
    public func timeline(of name: String) async throws -> [TimelineEntry] {
        try await database.read { db in
            try Row.fetchAll(db, sql: "SELECT * FROM timelineEntry WHERE instance = ?", arguments: [name]).compactMap { row in
                LaunchPhase(rawValue: row["phase"]).map { TimelineEntry(phase: $0, at: Date(timeIntervalSince1970: row["at"]), detail: row["detail"]) }
            }
            .sorted()
        }
    }

    // MARK: Actions

    /// Whether the action `id` was applied already.
    public func wasApplied(_ id: String) async throws -> Bool {
        try await database.read { db in
            try Bool.fetchOne(db, sql: "SELECT 1 FROM appliedAction WHERE id = ?", arguments: [id]) ?? false
        }
    }

    /// What applying an action changes in the agent's records, written in
    /// the transaction that marks the action applied.
    public enum ActionEffect: Sendable {
        /// Only the record that it was applied (power actions, refusals).
        case none
        /// A new instance, with the launch phases known so far.
        case start(LocalInstance, timeline: [TimelineEntry])
        /// The instance is to be decommissioned.
        case delete
        /// The instance's lease now ends at this time (nil: never).
        case lease(Date?)
        /// The guest's login user is to hold exactly these keys, then start
        /// `run` once (a script kept until it ran).
        case keys([String], user: String, run: String?)
    }

    /// Records the action as applied, together with its effect, in one
    /// transaction; false (and nothing changed) when it was applied before.
    public func apply(_ action: Action, _ effect: ActionEffect, at date: Date) async throws -> Bool {
        try await database.write { db in
            guard try Bool.fetchOne(db, sql: "SELECT 1 FROM appliedAction WHERE id = ?", arguments: [action.id]) == nil
            else { return false }
            switch effect {
            case .none:
                break
            case .start(let instance, let timeline):
                try instance.insert(db)
                for entry in timeline { try Self.record(db, entry, of: instance.name, replacing: true) }
            case .delete:
                try db.execute(
                    sql: "UPDATE instance SET phase = ? WHERE name = ?", arguments: [LocalInstance.Phase.deleting.rawValue, action.instance])
            case .lease(let expires):
                try db.execute(sql: "UPDATE instance SET expires = ? WHERE name = ?", arguments: [expires, action.instance])
            case .keys(let keys, let user, let run):
                try db.execute(
                    sql: """
                        UPDATE instance SET authorizedKeys = ?, keysUser = ?, keysAction = ?, runOnce = COALESCE(?, runOnce),
                        keysError = NULL WHERE name = ?
                        """,
                    arguments: [String(decoding: try JSONEncoder().encode(keys), as: UTF8.self), user, action.id, run, action.instance])
            }
            try db.execute(
                sql: "INSERT INTO appliedAction (id, instance, kind, appliedAt) VALUES (?, ?, ?, ?)",
                arguments: [action.id, action.instance, action.kind.rawValue, date])
            return true
        }
    }

    /// Writes what reconciling owns (phase, state, last error, lease end
    /// seen) only if the phase is still `from`: an action that changed it
    /// since reconciling read it (a delete, a lease) wins. True when written.
    public func reconciled(
        _ name: String, from: LocalInstance.Phase, to phase: LocalInstance.Phase, state: InstanceState, lastError: String?,
        expiredAt: Date?
    ) async throws -> Bool {
        try await database.write { db in
            guard var stored = try LocalInstance.fetchOne(db, key: name), stored.phase == from else { return false }
            stored.phase = phase
            stored.state = state
            stored.lastError = lastError
            stored.expiredAt = expiredAt
            try stored.update(db)
            return true
        }
    }

    /// Action ids applied but not yet acknowledged by a check-in.
    public func unacknowledgedActions() async throws -> [String] {
        try await database.read { db in
            try String.fetchAll(db, sql: "SELECT id FROM appliedAction WHERE acknowledgedAt IS NULL ORDER BY appliedAt")
        }
    }

    /// Marks ids as told to the pool; forgets acknowledged ids older than a week.
    public func acknowledge(_ ids: [String], at date: Date) async throws {
        try await database.write { db in
            for id in ids {
                try db.execute(sql: "UPDATE appliedAction SET acknowledgedAt = ? WHERE id = ?", arguments: [date, id])
            }
            try db.execute(
                sql: "DELETE FROM appliedAction WHERE acknowledgedAt < ?", arguments: [date.addingTimeInterval(-7 * 86_400)])
        }
    }

    // MARK: Outbox

    /// Queues a report for delivery; returns its sequence number.
    @discardableResult
    public func enqueue(_ report: InstanceReport, at date: Date) async throws -> Int64 {
        let json = String(decoding: try JSONEncoder().encode(report), as: UTF8.self)
        return try await database.write { db in
            try db.execute(
                sql: "INSERT INTO outbox (instance, report, createdAt) VALUES (?, ?, ?)",
                arguments: [report.name, json, date])
            return db.lastInsertedRowID
        }
    }

    /// The oldest undelivered report.
    public func nextPending() async throws -> PendingReport? {
        try await pending(limit: 1).first
    }

    public func pending(limit: Int = 1000) async throws -> [PendingReport] {
        try await database.read { db in
            try Row.fetchAll(db, sql: "SELECT * FROM outbox ORDER BY sequence LIMIT ?", arguments: [limit]).map { row in
                let json: String = row["report"]
                return PendingReport(
                    sequence: row["sequence"], report: try JSONDecoder().decode(InstanceReport.self, from: Data(json.utf8)),
                    createdAt: row["createdAt"])
            }
        }
    }

    /// Removes a delivered report and notes when its instance was reported
    /// (the first report of it running is a phase of its launch).
    public func delivered(_ pending: PendingReport, at date: Date) async throws {
        try await database.write { db in
            try db.execute(sql: "DELETE FROM outbox WHERE sequence = ?", arguments: [pending.sequence])
            try db.execute(sql: "UPDATE instance SET reportedAt = ? WHERE name = ?", arguments: [date, pending.report.name])
            if pending.report.state == .running, db.changesCount > 0 {
                try Self.record(db, TimelineEntry(phase: .runningReported, at: date), of: pending.report.name, replacing: false)
            }
        }
    }

    // MARK: Image cache index

    func cachedFile(url: String) async throws -> CachedFile? {
        try await database.read { db in try CachedFile.fetchOne(db, key: url) }
    }

    func recordCachedFile(_ file: CachedFile) async throws {
        try await database.write { db in try file.save(db) }
    }

    /// Records that `instance` uses the cached file with this digest.
    func recordImageUse(instance: String, sha256: String) async throws {
        try await database.write { db in
            try db.execute(sql: "INSERT OR IGNORE INTO imageUse (instance, sha256) VALUES (?, ?)", arguments: [instance, sha256])
        }
    }

    /// The digests existing instances use; uses of instances that are gone are forgotten.
    func digestsInUse() async throws -> Set<String> {
        try await database.write { db in
            try db.execute(sql: "DELETE FROM imageUse WHERE instance NOT IN (SELECT name FROM instance)")
            return Set(try String.fetchAll(db, sql: "SELECT DISTINCT sha256 FROM imageUse"))
        }
    }
}
