import Foundation
import GRDB
import PoolAPI

/// Check-ins: what an appliance holds, what it has done, and the actions queued for it.
extension SQLiteStore {
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
}
