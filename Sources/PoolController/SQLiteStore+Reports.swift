import Foundation
import GRDB
import PoolAPI

/// Instances as their appliances report them, and the lists of them.
extension SQLiteStore {
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
}
