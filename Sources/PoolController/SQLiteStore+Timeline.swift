import Foundation
import GRDB
import PoolAPI

/// Launch timelines and the pending actions a held check-in waits for.
extension SQLiteStore {
    public func timeline(ofInstance id: String) async throws -> [TimelineEntry] {
        try await database.read { db in try Self.timeline(db, instanceID: try Self.instanceIDs(db, id).id) }
    }

    public func pendingActions(appliance: String) async throws -> [Action] {
        try await database.read { db in
            try Self.pendingActions(db, applianceID: try Self.applianceIDs(db, named: appliance).id)
        }
    }

    /// The appliance's actions not yet done, oldest first; a `start`
    /// carries the phases the pool recorded for its instance.
    static func pendingActions(_ db: Database, applianceID: Int64) throws -> [Action] {
        try Row.fetchAll(
            db,
            sql: """
                SELECT action.*, instance.name AS instance FROM action JOIN instance ON instance.id = action.instanceID
                WHERE action.applianceID = ? AND action.doneAt IS NULL ORDER BY action.createdAt, action.rowid
                """,
            arguments: [applianceID]
        ).map { row in
            var action = try Self.action(row)
            if action.kind == .start {
                let timeline = try Self.timeline(db, instanceID: try row.decode(forColumn: "instanceID")).filter { LaunchPhase.recordedByPool.contains($0.phase) }
                if !timeline.isEmpty { action.timeline = timeline }
            }
            return action
        }
    }

    static func timeline(_ db: Database, instanceID: Int64) throws -> [TimelineEntry] {
        try Row.fetchAll(db, sql: "SELECT * FROM timelineEntry WHERE instanceID = ?", arguments: [instanceID])
            .compactMap { row in
                guard let phase = LaunchPhase(rawValue: try row.decode(forColumn: "phase")) else { return nil }
                return TimelineEntry(phase: phase, at: Date(timeIntervalSince1970: try row.decode(forColumn: "at")), detail: try row.decode(forColumn: "detail"))
            }
            .sorted()
    }

    /// Records a phase; an earlier time for it stays unless `replacing`.
    static func recordPhase(
        _ db: Database, _ phase: LaunchPhase, instanceID: Int64, at date: Date, detail: String? = nil, replacing: Bool
    ) throws {
        try insert(db, TimelineEntry(phase: phase, at: date, detail: detail), instanceID: instanceID, replacing: replacing)
    }

    /// Takes an agent's times for the phases it records (its newest word
    /// wins: a build that started over records them again).
    static func recordTimeline(_ db: Database, instanceID: Int64, agentEntries: [TimelineEntry]) throws {
        for entry in agentEntries where !LaunchPhase.recordedByPool.contains(entry.phase) {
            try insert(db, entry, instanceID: instanceID, replacing: true)
        }
    }

    private static func insert(_ db: Database, _ entry: TimelineEntry, instanceID: Int64, replacing: Bool) throws {
        try db.execute(
            sql: "INSERT OR \(replacing ? "REPLACE" : "IGNORE") INTO timelineEntry (instanceID, phase, at, detail) VALUES (?, ?, ?, ?)",
            arguments: [instanceID, entry.phase.rawValue, entry.at, entry.detail])
    }
}
