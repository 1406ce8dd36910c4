import Foundation
import GRDB
import PoolAPI

/// Reservations of instances on offer, and the housekeeping pass.
extension SQLiteStore {
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
}
