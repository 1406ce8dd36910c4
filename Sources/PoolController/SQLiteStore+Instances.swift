import Foundation
import GRDB
import PoolAPI

/// The user-facing side of the store: creating instances (placement,
/// limits, leases, warm instances), their users, and the warm pools.
extension SQLiteStore {
    /// Creates an instance for a request that arrived at `date`.
    public func createInstance(_ request: InstanceRequest, defaultLeaseSeconds: Int, applianceStaleAfter: Int, at date: Date)
        async throws -> Instance
    {
        try await database.write { db in
            guard let owner = try Row.fetchOne(db, sql: "SELECT * FROM user WHERE name = ?", arguments: [request.owner]) else {
                throw PoolError.notFound(what: "user", name: request.owner)
            }
            let ownerID: Int64 = try owner.decode(forColumn: "id")
            let granted = try Self.userIDs(db, request.users, field: "users")
            try Self.checkLimit(db, userID: ownerID, name: request.owner, limit: try owner.decode(forColumn: "maxInstances"), at: date)
            let leaseSeconds = (try owner.decode(forColumn: "leaseSeconds") as Int?) ?? defaultLeaseSeconds
            let expires = date.addingTimeInterval(TimeInterval(leaseSeconds))

            var wispID: Int64?
            var templateID: Int64?
            var flavorName = request.flavor
            if let name = request.template {
                guard let template = try Row.fetchOne(db, sql: Self.templateQuery + " WHERE template.name = ?", arguments: [name])
                else { throw PoolError.notFound(what: "template", name: name) }
                wispID = try template.decode(forColumn: "wispID")
                templateID = try template.decode(forColumn: "id")
                flavorName = try template.decode(forColumn: "flavor")
                // A warm instance booted long ago: the new owner's keys replace
                // the template's through the guest agent and a `#!` user-data
                // starts once. A `#cloud-config` needs a first boot, and an
                // image with no login user cannot be re-keyed: both launch cold.
                let keys = try Self.chosenKeys(db, ownerID: ownerID, request.sshKeys)
                if request.requireSSHKey, keys.isEmpty { throw StoreRules.noKeyRefusal(request) }
                if request.userData.map(UserData.isScript) ?? true,
                    let warm = try Self.claimWarm(db, templateID: try template.decode(forColumn: "id"), region: request.region)
                {
                    try db.execute(
                        sql: """
                            UPDATE instance SET warm = 0, ownerID = ?, expires = ?, preemptible = ?, topic = ?, updatedAt = ?,
                            sshKeys = ?, userData = ? WHERE id = ? AND warm = 1
                            """,
                        arguments: [
                            ownerID, expires, request.preemptible, request.topic, date, keys.joined(separator: "\n"), request.userData,
                            warm.id,
                        ])
                    // The claim above picked it in this transaction; a
                    // second writer cannot have taken it meanwhile.
                    guard db.changesCount == 1 else { throw PoolError.storage("warm instance \(warm.id) was taken twice") }
                    try Self.grant(db, instanceID: warm.id, users: granted, ownerID: ownerID, at: date)
                    _ = try Self.insertAction(
                        db, kind: .lease, instanceID: warm.id, applianceID: warm.applianceID, flavor: nil, expires: expires, at: date)
                    // Marked before the list is made, so the template's keys are left out of it.
                    try db.execute(sql: "UPDATE instance SET handOutAction = '' WHERE id = ?", arguments: [warm.id])
                    guard let rekey = try Self.queueKeys(db, instanceID: warm.id, run: request.userData, at: date) else {
                        throw PoolError.storage("warm instance \(warm.id) could not be re-keyed")
                    }
                    try db.execute(sql: "UPDATE instance SET handOutAction = ? WHERE id = ?", arguments: [rekey.id, warm.id])
                    // Its build phases predate the request: it was built warm.
                    try Self.recordPhase(db, .requested, instanceID: warm.id, at: date, replacing: true)
                    try Self.recordPhase(
                        db, .placed, instanceID: warm.id, at: Date(), detail: "a warm instance, built before the request", replacing: true)
                    return try Self.instance(db, id: warm.id)
                }
            }
            guard let flavorName else { throw PoolError.invalid(field: "server-flavor", reason: "give a flavor") }
            var imageID: Int64?
            if let image = request.image {
                guard let id = try Int64.fetchOne(db, sql: "SELECT id FROM image WHERE name = ? AND active", arguments: [image]) else {
                    throw StoreRules.unknownImage(image)
                }
                imageID = id
            }
            let keys = try Self.chosenKeys(db, ownerID: ownerID, request.sshKeys)
            if request.requireSSHKey, keys.isEmpty {
                // The wisp it boots from gives keys only when it has no callback.
                // (A template's wisp gives keys only to its own owner's instances.)
                let wisp = try Self.bootWisp(db, wispID: wispID, ownerID: ownerID)
                let wispKeys = StoreRules.wispKeysForCreate(wisp, fromTemplate: templateID != nil, owner: request.owner)
                guard !wispKeys.isEmpty else { throw StoreRules.noKeyRefusal(request) }
            }
            let id = try Self.place(
                db,
                PlacementRequest(
                    flavor: flavorName, region: request.region, ownerID: ownerID, wispID: wispID, imageID: imageID,
                    templateID: templateID, warm: false, preemptible: request.preemptible, topic: request.topic,
                    expires: expires),
                staleAfter: applianceStaleAfter, at: date)
            if !keys.isEmpty || request.userData != nil {
                try db.execute(
                    sql: "UPDATE instance SET sshKeys = ?, userData = ? WHERE id = ?",
                    arguments: [keys.isEmpty ? nil : keys.joined(separator: "\n"), request.userData, id])
            }
            try Self.recordPhase(db, .requested, instanceID: id, at: date, replacing: false)
            try Self.recordPhase(db, .placed, instanceID: id, at: Date(), replacing: false)
            try Self.grant(db, instanceID: id, users: granted, ownerID: ownerID, at: date)
            return try Self.instance(db, id: id)
        }
    }

    public func instance(id: String) async throws -> Instance? {
        try await database.read { db in
            try Row.fetchOne(
                db, sql: Self.instanceQuery + " WHERE instance.\(Self.idOrName(id))", arguments: [id]
            ).map(Self.instance)
        }
    }

    public func changeUsers(ofInstance id: String, _ change: UsersChange, users: [String], at date: Date) async throws -> Instance {
        try await database.write { db in
            let (instanceID, ownerID) = try Self.instanceIDs(db, id)
            let userIDs = try Self.userIDs(db, users, field: "task.users")
            func granted() throws -> [Int64] {
                try Int64.fetchAll(db, sql: "SELECT userID FROM instanceUser WHERE instanceID = ? ORDER BY userID", arguments: [instanceID])
            }
            let before = try granted()
            switch change {
            case .add:
                try Self.grant(db, instanceID: instanceID, users: userIDs, ownerID: ownerID, at: date)
            case .replace:
                try db.execute(sql: "DELETE FROM instanceUser WHERE instanceID = ?", arguments: [instanceID])
                try Self.grant(db, instanceID: instanceID, users: userIDs, ownerID: ownerID, at: date)
            case .delete:
                for userID in userIDs {
                    try db.execute(
                        sql: "DELETE FROM instanceUser WHERE instanceID = ? AND userID = ?", arguments: [instanceID, userID])
                }
            }
            try db.execute(sql: "UPDATE instance SET updatedAt = ? WHERE id = ?", arguments: [date, instanceID])
            // The guest's keys follow the list (a guest not yet booted gets
            // them in its seed as well).
            if try granted() != before { _ = try Self.queueKeys(db, instanceID: instanceID, run: nil, at: date) }
            return try Self.instance(db, id: instanceID)
        }
    }

    public func extendLease(ofInstance id: String, bySeconds seconds: Int, atMost most: Int, at date: Date) async throws
        -> Instance
    {
        try await database.write { db in
            guard
                let row = try Row.fetchOne(
                    db, sql: "SELECT * FROM instance WHERE \(Self.idOrName(id))", arguments: [id])
            else { throw PoolError.notFound(what: "instance", name: id) }
            let instanceID: Int64 = try row.decode(forColumn: "id")
            guard try row.decode(forColumn: "state") as Int != InstanceState.decommissioned.rawValue else {
                throw PoolError.conflict("instance '\(id)' is decommissioned")
            }
            let current: Date? = try row.decode(forColumn: "expires")
            let expires = max(current ?? date, date).addingTimeInterval(TimeInterval(seconds))
            try StoreRules.checkLeaseEnd(expires, atMost: most, at: date)
            try db.execute(
                sql: "UPDATE instance SET expires = ?, updatedAt = ? WHERE id = ?", arguments: [expires, date, instanceID])
            _ = try Self.insertAction(
                db, kind: .lease, instanceID: instanceID, applianceID: try row.decode(forColumn: "applianceID"), flavor: nil, expires: expires, at: date)
            return try Self.instance(db, id: instanceID)
        }
    }

    // MARK: Templates and warm pools

    static let templateQuery = """
        SELECT template.*, wisp.name AS wisp, flavor.name AS flavor, user.name AS owner FROM template
        JOIN wisp ON wisp.id = template.wispID JOIN flavor ON flavor.id = template.flavorID JOIN user ON user.id = wisp.ownerID
        """

    public func addTemplate(_ template: Template) async throws {
        guard template.hotStarts >= 0 else { throw PoolError.invalid(field: "hot_starts", reason: "must be 0 or more") }
        try await write(what: "template", name: template.name) { db in
            guard let wispID = try Int64.fetchOne(db, sql: "SELECT id FROM wisp WHERE name = ?", arguments: [template.wisp]) else {
                throw PoolError.notFound(what: "wisp", name: template.wisp)
            }
            guard
                let flavorID = try Int64.fetchOne(
                    db, sql: "SELECT id FROM flavor WHERE name = ? AND active", arguments: [template.flavor])
            else { throw PoolError.notFound(what: "flavor", name: template.flavor) }
            try db.execute(
                sql: "INSERT INTO template (name, wispID, flavorID, hotStarts, createdAt) VALUES (?, ?, ?, ?, ?)",
                arguments: [template.name, wispID, flavorID, template.hotStarts, Date()])
        }
    }

    public func templates() async throws -> [Template] {
        try await database.read { db in
            try Row.fetchAll(db, sql: Self.templateQuery + " ORDER BY template.name").map(Self.template)
        }
    }

    static func template(_ row: Row) throws -> Template {
        Template(
            name: try row.decode(forColumn: "name"), wisp: try row.decode(forColumn: "wisp"), flavor: try row.decode(forColumn: "flavor"),
            hotStarts: try row.decode(forColumn: "hotStarts"), owner: try row.decode(forColumn: "owner"))
    }

    public func maintainWarmPools(maxAgeSeconds: Int, applianceStaleAfter: Int, at date: Date) async throws -> WarmPoolPass {
        try await database.write { db in
            var pass = WarmPoolPass()
            let oldest = date.addingTimeInterval(-TimeInterval(maxAgeSeconds))
            let candidates = try Row.fetchAll(
                db,
                sql: """
                    SELECT instance.id, instance.name, instance.applianceID, instance.state, instance.lastError, instance.createdAt
                    FROM instance WHERE warm AND state != ? AND NOT \(Self.deletePending)
                    """,
                arguments: [InstanceState.decommissioned.rawValue])
            for row in candidates {
                let created: Date = try row.decode(forColumn: "createdAt")
                let lastError: String? = try row.decode(forColumn: "lastError")
                let state: Int = try row.decode(forColumn: "state")
                let failed = lastError != nil || state == InstanceState.inactive.rawValue
                guard created < oldest || failed else { continue }
                _ = try Self.insertAction(
                    db, kind: .delete, instanceID: try row.decode(forColumn: "id"), applianceID: try row.decode(forColumn: "applianceID"), flavor: nil, expires: nil, at: date)
                if failed { pass.dropped.append(try row.decode(forColumn: "name")) } else { pass.retired.append(try row.decode(forColumn: "name")) }
            }
            for template in try Row.fetchAll(db, sql: Self.templateQuery + " WHERE template.hotStarts > 0 ORDER BY template.name") {
                let live =
                    try Int.fetchOne(
                        db,
                        sql: """
                            SELECT COUNT(*) FROM instance WHERE warm AND templateID = ? AND state NOT IN (?, ?)
                            AND lastError IS NULL AND NOT \(Self.deletePending)
                            """,
                        arguments: [try template.decode(Int64.self, forColumn: "id"), InstanceState.inactive.rawValue, InstanceState.decommissioned.rawValue]) ?? 0
                let hotStarts: Int = try template.decode(forColumn: "hotStarts")
                let ownerID = try Self.userID(db, named: try template.decode(forColumn: "owner"))
                for _ in live..<max(live, hotStarts) {
                    do {
                        // Each placement in its own savepoint: a template that
                        // cannot be filled leaves the others' work intact.
                        var id: Int64 = 0
                        try db.inSavepoint {
                            id = try Self.place(
                                db,
                                PlacementRequest(
                                    flavor: try template.decode(forColumn: "flavor"), region: nil, ownerID: ownerID, wispID: try template.decode(forColumn: "wispID"),
                                    imageID: nil, templateID: try template.decode(forColumn: "id"), warm: true, preemptible: true, topic: nil,
                                    expires: nil),
                                staleAfter: applianceStaleAfter, at: date)
                            return .commit
                        }
                        pass.started.append(try Self.instance(db, id: id))
                    } catch let error as PoolError {
                        pass.shortfalls.append("template '\(try template.decode(forColumn: "name") as String)': \(error)")
                        break
                    }
                }
            }
            return pass
        }
    }

    // MARK: Helpers

    /// SQL: the instance has a delete queued that its appliance has not done.
    static let deletePending = """
        EXISTS (SELECT 1 FROM action WHERE action.instanceID = instance.id AND action.kind = 'delete' AND action.doneAt IS NULL)
        """

    /// Refuses a user at their limit. They hold their instances that are
    /// not withdrawn, on offer, decommissioned or being deleted, plus the
    /// offered instances they reserved. Run inside the transaction that
    /// adds the instance, so concurrent requests cannot overshoot.
    static func checkLimit(_ db: Database, userID: Int64, name: String, limit: Int, at date: Date) throws {
        let held =
            try Int.fetchOne(
                db,
                sql: """
                    SELECT (SELECT COUNT(*) FROM instance WHERE ownerID = ?1 AND NOT warm AND state NOT IN (0, 1, 7)
                            AND NOT \(deletePending))
                    + (SELECT COUNT(*) FROM reservation JOIN instance ON instance.id = reservation.instanceID
                       WHERE reservation.userID = ?1 AND instance.state = 1 AND reservation.expiresAt > ?2)
                    """,
                arguments: [userID, date]) ?? 0
        try StoreRules.checkLimit(name: name, held: held, limit: limit)
    }

    struct PlacementRequest {
        var flavor: String
        var region: String?
        var ownerID: Int64
        var wispID: Int64?
        var imageID: Int64?
        var templateID: Int64?
        var warm: Bool
        var preemptible: Bool
        var topic: String?
        var expires: Date?
    }

    /// Places a new instance on the enabled, fresh appliance (in the
    /// region, when given) with the most room left after it: first how
    /// many more of the same size would still fit there, then the memory
    /// left. This spreads instances across appliances in proportion to
    /// their room. Queues its start and returns the new row's id.
    static func place(_ db: Database, _ request: PlacementRequest, staleAfter: Int, at date: Date) throws -> Int64 {
        guard let flavor = try Row.fetchOne(db, sql: "SELECT * FROM flavor WHERE name = ? AND active", arguments: [request.flavor])
        else { throw StoreRules.unknownFlavor(request.flavor) }
        let size = InstanceFlavor(name: request.flavor, vcpus: try flavor.decode(forColumn: "vcpus"), memory: try flavor.decode(forColumn: "memory"), disk: try flavor.decode(forColumn: "disk"))
        var sql = "SELECT id, name, stats FROM appliance WHERE enabled AND lastSeen >= ?"
        var arguments: StatementArguments = [date.addingTimeInterval(-TimeInterval(staleAfter))]
        if let region = request.region {
            sql += " AND region = ?"
            _ = arguments.append(contentsOf: [region])
        }
        var best: (id: Int64, score: (Int, Int))?
        for row in try Row.fetchAll(db, sql: sql + " ORDER BY name", arguments: arguments) {
            guard let free = try freeRoom(db, applianceID: try row.decode(forColumn: "id"), stats: try row.decode(forColumn: "stats")),
                let score = StoreRules.placementScore(of: size, in: free)
            else { continue }
            if let current = best, current.score >= score { continue }
            best = (try row.decode(forColumn: "id"), score)
        }
        guard let best else {
            let waiting = try unseenAppliances(db, region: request.region, staleAfter: staleAfter, at: date)
            throw StoreRules.noRoom(flavor: request.flavor, size: size, region: request.region, waiting: waiting)
        }
        let flavorJSON = String(decoding: try JSONEncoder().encode(size), as: UTF8.self)
        try db.execute(
            sql: """
                INSERT INTO instance (name, uuid, applianceID, ownerID, wispID, imageID, templateID, warm, preemptible, topic,
                state, flavor, expires, ipAddresses, consoleTail, createdAt, updatedAt)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, '[]', '[]', ?, ?)
                """,
            arguments: [
                StoreRules.newInstanceName(), StoreRules.newID(), best.id, request.ownerID, request.wispID, request.imageID,
                request.templateID, request.warm, request.preemptible, request.topic, InstanceState.leased.rawValue, flavorJSON,
                request.expires, date, date,
            ])
        let id = db.lastInsertedRowID
        _ = try insertAction(
            db, kind: .start, instanceID: id, applianceID: best.id, flavor: flavorJSON, expires: request.expires, at: date)
        return id
    }

    /// Why each enabled appliance (in the region, when given) that could
    /// take instances is not counted now: it has not checked in with its
    /// capacity since it was added, or it is stale. Placement waits for
    /// these, so the refusal names them ("appliance 'local' has not
    /// checked in yet").
    static func unseenAppliances(_ db: Database, region: String?, staleAfter: Int, at date: Date) throws -> [String] {
        var sql = "SELECT name, lastSeen, stats FROM appliance WHERE enabled"
        var arguments: StatementArguments = []
        if let region {
            sql += " AND region = ?"
            _ = arguments.append(contentsOf: [region])
        }
        return try Row.fetchAll(db, sql: sql + " ORDER BY name", arguments: arguments).compactMap { row in
            StoreRules.unseenReason(
                name: try row.decode(forColumn: "name"), lastSeen: try row.decode(forColumn: "lastSeen"),
                hasStats: try row.decode(forColumn: "stats") as String? != nil, staleAfter: staleAfter, at: date)
        }
    }

    /// The oldest ready warm instance of the template, on an enabled
    /// appliance (in the region, when given). Ready: reported running with
    /// no error, its SSH server answered its appliance or cloud-init
    /// finished (so the first boot cannot race the hand-out's keys), and its
    /// image names the login user the keys go to. Settled ones, whose
    /// cloud-init finished, go first: a guest still running its first
    /// boot's last stages (seconds after SSH answers, under emulation)
    /// re-keys and logs in several times slower.
    static func claimWarm(_ db: Database, templateID: Int64, region: String?) throws -> (id: Int64, applianceID: Int64)? {
        var sql = """
            SELECT instance.id, instance.applianceID FROM instance JOIN appliance ON appliance.id = instance.applianceID
            WHERE instance.warm AND instance.templateID = ? AND instance.state = ? AND instance.lastError IS NULL
            AND appliance.enabled AND NOT \(deletePending)
            AND EXISTS (SELECT 1 FROM wisp JOIN image ON image.id = wisp.imageID
                        WHERE wisp.id = instance.wispID AND image.loginUser IS NOT NULL)
            AND EXISTS (SELECT 1 FROM timelineEntry WHERE timelineEntry.instanceID = instance.id
                        AND timelineEntry.phase IN ('\(LaunchPhase.sshReachable.rawValue)', '\(LaunchPhase.postCreateDone.rawValue)'))
            """
        var arguments: StatementArguments = [templateID, InstanceState.running.rawValue]
        if let region {
            sql += " AND appliance.region = ?"
            _ = arguments.append(contentsOf: [region])
        }
        let settledFirst = """
             ORDER BY EXISTS (SELECT 1 FROM timelineEntry WHERE timelineEntry.instanceID = instance.id
                              AND timelineEntry.phase = '\(LaunchPhase.postCreateDone.rawValue)') DESC,
                      instance.createdAt, instance.id LIMIT 1
            """
        guard let row = try Row.fetchOne(db, sql: sql + settledFirst, arguments: arguments)
        else { return nil }
        return (try row.decode(forColumn: "id"), try row.decode(forColumn: "applianceID"))
    }

    /// Row ids of users named by id (32 hex digits) or name; an unknown one
    /// is an invalid `field`.
    static func userIDs(_ db: Database, _ users: [String], field: String) throws -> [Int64] {
        try users.map { user in
            guard let id = try Int64.fetchOne(db, sql: "SELECT id FROM user WHERE \(idOrName(user))", arguments: [user])
            else { throw PoolError.invalid(field: field, reason: "there is no user '\(user)'") }
            return id
        }
    }

    /// The condition that finds a record by what a caller calls it: an id
    /// (32 hexadecimal digits) by its `uuid`, anything else by its `name`.
    /// Names are never of an id's form, so one text finds one record.
    static func idOrName(_ text: String) -> String {
        ResourceName.hasIDForm(text) ? "uuid = ?" : "name = ?"
    }

    /// Gives users access to an instance (the owner has it already).
    static func grant(_ db: Database, instanceID: Int64, users: [Int64], ownerID: Int64, at date: Date) throws {
        for userID in users where userID != ownerID {
            try db.execute(
                sql: "INSERT OR IGNORE INTO instanceUser (instanceID, userID, addedAt) VALUES (?, ?, ?)",
                arguments: [instanceID, userID, date])
        }
    }

    /// The row id and owner's row id of the instance with this id or name.
    static func instanceIDs(_ db: Database, _ id: String) throws -> (id: Int64, ownerID: Int64) {
        guard
            let row = try Row.fetchOne(
                db, sql: "SELECT id, ownerID FROM instance WHERE \(idOrName(id))", arguments: [id])
        else { throw PoolError.notFound(what: "instance", name: id) }
        return (try row.decode(forColumn: "id"), try row.decode(forColumn: "ownerID"))
    }

    static func instance(_ db: Database, id: Int64) throws -> Instance {
        guard let row = try Row.fetchOne(db, sql: instanceQuery + " WHERE instance.id = ?", arguments: [id]) else {
            throw PoolError.storage("instance \(id) vanished")
        }
        return try instance(row)
    }
}
