import Foundation
import PoolAPI
import PostgresNIO

/// The user-facing side on PostgreSQL: creating instances (placement,
/// limits, leases, warm instances), their users, templates and warm pools.
extension PostgresStore {
    public func createInstance(_ request: InstanceRequest, defaultLeaseSeconds: Int, applianceStaleAfter: Int, at date: Date)
        async throws -> Instance
    {
        try await write { session in
            guard let owner = try await session.row("SELECT * FROM \"user\" WHERE name = \(request.owner)") else {
                throw PoolError.notFound(what: "user", name: request.owner)
            }
            let ownerID: Int = try owner.get("id")
            let granted = try await Self.userIDs(session, request.users, field: "users")
            try await Self.checkLimit(session, userID: ownerID, name: request.owner, limit: try owner.get("maxInstances"), at: date)
            let leaseSeconds = try owner.get("leaseSeconds", as: Int?.self) ?? defaultLeaseSeconds
            let expires = date.addingTimeInterval(TimeInterval(leaseSeconds))

            var wispID: Int?
            var templateID: Int?
            var flavorName = request.flavor
            if let name = request.template {
                guard let template = try await session.row("\(unescaped: Self.templateQuery) WHERE template.name = \(name)") else {
                    throw PoolError.notFound(what: "template", name: name)
                }
                wispID = try template.get("wispID")
                templateID = try template.get("id")
                flavorName = try template.get("flavor")
                // A warm instance is re-keyed for its new owner; a
                // `#cloud-config` needs a first boot and launches cold (as on SQLite).
                let keys = try await Self.chosenKeys(session, ownerID: ownerID, request.sshKeys)
                if request.requireSSHKey, keys.isEmpty { throw StoreRules.noKeyRefusal(request) }
                if request.userData.map(UserData.isScript) ?? true,
                    let warm = try await Self.claimWarm(session, templateID: try template.get("id"), region: request.region)
                {
                    guard
                        try await session.execute(
                            """
                            UPDATE instance SET warm = false, ownerID = \(ownerID), expires = \(expires), preemptible = \(request.preemptible),
                            topic = \(request.topic), updatedAt = \(date), sshKeys = \(keys.joined(separator: "\n")),
                            userData = \(request.userData) WHERE id = \(warm.id) AND warm RETURNING id
                            """) == 1
                    else { throw PoolError.storage("warm instance \(warm.id) was taken twice") }
                    try await Self.grant(session, instanceID: warm.id, users: granted, ownerID: ownerID, at: date)
                    _ = try await Self.insertAction(
                        session, kind: .lease, instanceID: warm.id, applianceID: warm.applianceID, flavor: nil, expires: expires, at: date)
                    // Marked before the list is made, so the template's keys are left out of it.
                    try await session.execute("UPDATE instance SET handOutAction = '' WHERE id = \(warm.id)")
                    guard let rekey = try await Self.queueKeys(session, instanceID: warm.id, run: request.userData, at: date) else {
                        throw PoolError.storage("warm instance \(warm.id) could not be re-keyed")
                    }
                    try await session.execute("UPDATE instance SET handOutAction = \(rekey.id) WHERE id = \(warm.id)")
                    // Its build phases predate the request: it was built warm.
                    try await Self.recordPhase(session, .requested, instanceID: warm.id, at: date, replacing: true)
                    try await Self.recordPhase(
                        session, .placed, instanceID: warm.id, at: Date(), detail: "a warm instance, built before the request", replacing: true)
                    return try await Self.instance(session, id: warm.id)
                }
            }
            guard let flavorName else { throw PoolError.invalid(field: "server-flavor", reason: "give a flavor") }
            var imageID: Int?
            if let image = request.image {
                guard let id = try await session.value("SELECT id FROM image WHERE name = \(image) AND active", as: Int.self) else {
                    throw StoreRules.unknownImage(image)
                }
                imageID = id
            }
            let keys = try await Self.chosenKeys(session, ownerID: ownerID, request.sshKeys)
            if request.requireSSHKey, keys.isEmpty {
                let wisp = try await Self.bootWisp(session, wispID: wispID, ownerID: ownerID)
                guard !StoreRules.wispKeysForCreate(wisp, fromTemplate: templateID != nil, owner: request.owner).isEmpty else {
                    throw StoreRules.noKeyRefusal(request)
                }
            }
            let id = try await Self.place(
                session,
                PlacementRequest(
                    flavor: flavorName, region: request.region, ownerID: ownerID, wispID: wispID, imageID: imageID,
                    templateID: templateID, warm: false, preemptible: request.preemptible, topic: request.topic, expires: expires),
                staleAfter: applianceStaleAfter, at: date)
            if !keys.isEmpty || request.userData != nil {
                try await session.execute(
                    "UPDATE instance SET sshKeys = \(keys.isEmpty ? nil : keys.joined(separator: "\n")), userData = \(request.userData) WHERE id = \(id)")
            }
            try await Self.recordPhase(session, .requested, instanceID: id, at: date, replacing: false)
            try await Self.recordPhase(session, .placed, instanceID: id, at: Date(), replacing: false)
            try await Self.grant(session, instanceID: id, users: granted, ownerID: ownerID, at: date)
            return try await Self.instance(session, id: id)
        }
    }

    public func changeUsers(ofInstance id: String, _ change: UsersChange, users: [String], at date: Date) async throws -> Instance {
        try await write { session in
            let (instanceID, ownerID) = try await Self.instanceIDs(session, id)
            let userIDs = try await Self.userIDs(session, users, field: "task.users")
            func granted() async throws -> [Int] {
                try await session.rows("SELECT userID FROM instanceUser WHERE instanceID = \(instanceID) ORDER BY userID").map {
                    try $0.get("userID")
                }
            }
            let before = try await granted()
            switch change {
            case .add:
                try await Self.grant(session, instanceID: instanceID, users: userIDs, ownerID: ownerID, at: date)
            case .replace:
                try await session.execute("DELETE FROM instanceUser WHERE instanceID = \(instanceID)")
                try await Self.grant(session, instanceID: instanceID, users: userIDs, ownerID: ownerID, at: date)
            case .delete:
                try await session.execute("DELETE FROM instanceUser WHERE instanceID = \(instanceID) AND userID = ANY(\(userIDs))")
            }
            try await session.execute("UPDATE instance SET updatedAt = \(date) WHERE id = \(instanceID)")
            // The guest's keys follow the list.
            if try await granted() != before { _ = try await Self.queueKeys(session, instanceID: instanceID, run: nil, at: date) }
            return try await Self.instance(session, id: instanceID)
        }
    }

    public func extendLease(ofInstance id: String, bySeconds seconds: Int, atMost most: Int, at date: Date) async throws -> Instance {
        try await write { session in
            guard let row = try await session.row("SELECT * FROM instance WHERE instance.\(unescaped: Self.idColumn(id)) = \(id)") else {
                throw PoolError.notFound(what: "instance", name: id)
            }
            let instanceID: Int = try row.get("id")
            guard try row.get("state", as: Int.self) != InstanceState.decommissioned.rawValue else {
                throw PoolError.conflict("instance '\(id)' is decommissioned")
            }
            let current: Date? = try row.get("expires")
            let expires = max(current ?? date, date).addingTimeInterval(TimeInterval(seconds))
            try StoreRules.checkLeaseEnd(expires, atMost: most, at: date)
            try await session.execute("UPDATE instance SET expires = \(expires), updatedAt = \(date) WHERE id = \(instanceID)")
            _ = try await Self.insertAction(
                session, kind: .lease, instanceID: instanceID, applianceID: try row.get("applianceID"), flavor: nil, expires: expires,
                at: date)
            return try await Self.instance(session, id: instanceID)
        }
    }

    // MARK: Templates and warm pools

    static let templateQuery = """
        SELECT template.*, wisp.name AS wisp, flavor.name AS flavor, "user".name AS owner FROM template
        JOIN wisp ON wisp.id = template.wispID JOIN flavor ON flavor.id = template.flavorID JOIN "user" ON "user".id = wisp.ownerID
        """

    static func template(_ row: Row) throws -> Template {
        Template(
            name: try row.get("name"), wisp: try row.get("wisp"), flavor: try row.get("flavor"), hotStarts: try row.get("hotStarts"),
            owner: try row.get("owner"))
    }

    public func addTemplate(_ template: Template) async throws {
        guard template.hotStarts >= 0 else { throw PoolError.invalid(field: "hot_starts", reason: "must be 0 or more") }
        try await write(what: "template", name: template.name) { session in
            guard let wispID = try await session.value("SELECT id FROM wisp WHERE name = \(template.wisp)", as: Int.self) else {
                throw PoolError.notFound(what: "wisp", name: template.wisp)
            }
            guard let flavorID = try await session.value("SELECT id FROM flavor WHERE name = \(template.flavor) AND active", as: Int.self)
            else { throw PoolError.notFound(what: "flavor", name: template.flavor) }
            try await session.execute(
                """
                INSERT INTO template (name, wispID, flavorID, hotStarts, createdAt)
                VALUES (\(template.name), \(wispID), \(flavorID), \(template.hotStarts), \(Date()))
                """)
        }
    }

    public func templates() async throws -> [Template] {
        try await read { session in try await session.rows("\(unescaped: Self.templateQuery) ORDER BY template.name").map(Self.template) }
    }

    /// SQL: the instance has a delete queued that its appliance has not done.
    static let deletePending = """
        EXISTS (SELECT 1 FROM action WHERE action.instanceID = instance.id AND action.kind = 'delete' AND action.doneAt IS NULL)
        """

    public func maintainWarmPools(maxAgeSeconds: Int, applianceStaleAfter: Int, at date: Date) async throws -> WarmPoolPass {
        try await write { session in
            var pass = WarmPoolPass()
            let oldest = date.addingTimeInterval(-TimeInterval(maxAgeSeconds))
            let candidates = try await session.rows(
                """
                SELECT id, name, applianceID, state, lastError, createdAt FROM instance
                WHERE warm AND state != \(InstanceState.decommissioned.rawValue) AND NOT \(unescaped: Self.deletePending) ORDER BY id
                """)
            for row in candidates {
                let created: Date = try row.get("createdAt")
                let failed = try row.get("lastError", as: String?.self) != nil || row.get("state", as: Int.self) == InstanceState.inactive.rawValue
                guard created < oldest || failed else { continue }
                _ = try await Self.insertAction(
                    session, kind: .delete, instanceID: try row.get("id"), applianceID: try row.get("applianceID"), flavor: nil,
                    expires: nil, at: date)
                if failed { pass.dropped.append(try row.get("name")) } else { pass.retired.append(try row.get("name")) }
            }
            for template in try await session.rows("\(unescaped: Self.templateQuery) WHERE template.hotStarts > 0 ORDER BY template.name") {
                let templateID: Int = try template.get("id")
                let live =
                    try await session.value(
                        """
                        SELECT COUNT(*) FROM instance WHERE warm AND templateID = \(templateID)
                        AND state NOT IN (\(InstanceState.inactive.rawValue), \(InstanceState.decommissioned.rawValue))
                        AND lastError IS NULL AND NOT \(unescaped: Self.deletePending)
                        """, as: Int.self) ?? 0
                let hotStarts: Int = try template.get("hotStarts")
                let ownerID = try await Self.userID(session, named: try template.get("owner"))
                for _ in live..<max(live, hotStarts) {
                    // Each placement in its own savepoint: a template that
                    // cannot be filled leaves the others' work intact.
                    try await session.execute("SAVEPOINT placement")
                    do {
                        let id = try await Self.place(
                            session,
                            PlacementRequest(
                                flavor: try template.get("flavor"), region: nil, ownerID: ownerID, wispID: try template.get("wispID"),
                                imageID: nil, templateID: templateID, warm: true, preemptible: true, topic: nil, expires: nil),
                            staleAfter: applianceStaleAfter, at: date)
                        try await session.execute("RELEASE SAVEPOINT placement")
                        pass.started.append(try await Self.instance(session, id: id))
                    } catch let error as PoolError {
                        try await session.execute("ROLLBACK TO SAVEPOINT placement")
                        pass.shortfalls.append("template '\(try template.get("name", as: String.self))': \(error)")
                        break
                    }
                }
            }
            return pass
        }
    }

    // MARK: Helpers

    /// Refuses a user at their limit (what they hold: see the SQLite store's
    /// `checkLimit`). Run in the transaction that adds the instance: a
    /// concurrent create on another replica that read the same count fails
    /// to serialize and runs again, then sees this one.
    static func checkLimit(_ session: Session, userID: Int, name: String, limit: Int, at date: Date) async throws {
        let held =
            try await session.value(
                """
                SELECT (SELECT COUNT(*) FROM instance WHERE ownerID = \(userID) AND NOT warm AND state NOT IN (0, 1, 7)
                        AND NOT \(unescaped: deletePending))
                + (SELECT COUNT(*) FROM reservation JOIN instance ON instance.id = reservation.instanceID
                   WHERE reservation.userID = \(userID) AND instance.state = 1 AND reservation.expiresAt > \(date))
                """, as: Int.self) ?? 0
        try StoreRules.checkLimit(name: name, held: held, limit: limit)
    }

    struct PlacementRequest {
        var flavor: String
        var region: String?
        var ownerID: Int
        var wispID: Int?
        var imageID: Int?
        var templateID: Int?
        var warm: Bool
        var preemptible: Bool
        var topic: String?
        var expires: Date?
    }

    /// Places a new instance on the enabled, fresh appliance (in the region,
    /// when given) with the best ``StoreRules/placementScore(of:in:)``,
    /// queues its start and returns its row id.
    static func place(_ session: Session, _ request: PlacementRequest, staleAfter: Int, at date: Date) async throws -> Int {
        guard let flavor = try await session.row("SELECT * FROM flavor WHERE name = \(request.flavor) AND active") else {
            throw StoreRules.unknownFlavor(request.flavor)
        }
        let size = InstanceFlavor(
            name: request.flavor, vcpus: try flavor.get("vcpus"), memory: try flavor.get("memory"), disk: try flavor.get("disk"))
        let seenSince = date.addingTimeInterval(-TimeInterval(staleAfter))
        var best: (id: Int, score: (Int, Int))?
        // Every candidate with its unacknowledged starts' flavors, in one query.
        for row in try await session.rows(
            """
            SELECT appliance.id, appliance.stats,
            ARRAY(SELECT instance.flavor FROM action JOIN instance ON instance.id = action.instanceID
                  WHERE action.applianceID = appliance.id AND action.kind = 'start' AND action.doneAt IS NULL
                  AND instance.flavor IS NOT NULL) AS pending
            FROM appliance WHERE enabled AND lastSeen >= \(seenSince)
            AND (\(request.region)::text IS NULL OR region = \(request.region)::text) ORDER BY name
            """)
        {
            guard let free = StoreRules.freeRoom(stats: try row.get("stats"), pending: try row.get("pending")),
                let score = StoreRules.placementScore(of: size, in: free)
            else { continue }
            if let current = best, current.score >= score { continue }
            best = (try row.get("id"), score)
        }
        guard let best else {
            let waiting = try await session.rows(
                """
                SELECT name, lastSeen, stats FROM appliance WHERE enabled
                AND (\(request.region)::text IS NULL OR region = \(request.region)::text) ORDER BY name
                """
            ).compactMap { row in
                StoreRules.unseenReason(
                    name: try row.get("name"), lastSeen: try row.get("lastSeen"), hasStats: try row.get("stats", as: String?.self) != nil,
                    staleAfter: staleAfter, at: date)
            }
            throw StoreRules.noRoom(flavor: request.flavor, size: size, region: request.region, waiting: waiting)
        }
        let flavorJSON = try StoreRules.json(size)
        guard
            let id = try await session.value(
                """
                INSERT INTO instance (name, uuid, applianceID, ownerID, wispID, imageID, templateID, warm, preemptible, topic,
                state, flavor, expires, ipAddresses, consoleTail, createdAt, updatedAt)
                VALUES (\(StoreRules.newInstanceName()), \(StoreRules.newID()), \(best.id), \(request.ownerID), \(request.wispID),
                \(request.imageID), \(request.templateID), \(request.warm), \(request.preemptible), \(request.topic),
                \(InstanceState.leased.rawValue), \(flavorJSON), \(request.expires), '[]', '[]', \(date), \(date)) RETURNING id
                """, as: Int.self)
        else { throw PoolError.storage("the placed instance was not recorded") }
        _ = try await insertAction(
            session, kind: .start, instanceID: id, applianceID: best.id, flavor: flavorJSON, expires: request.expires, at: date)
        return id
    }

    /// The ready warm instance of the template to hand out (the rules are
    /// the SQLite store's `claimWarm`: settled ones first, then the oldest).
    static func claimWarm(_ session: Session, templateID: Int, region: String?) async throws -> (id: Int, applianceID: Int)? {
        guard
            let row = try await session.row(
                """
                SELECT instance.id, instance.applianceID FROM instance JOIN appliance ON appliance.id = instance.applianceID
                WHERE instance.warm AND instance.templateID = \(templateID) AND instance.state = \(InstanceState.running.rawValue)
                AND instance.lastError IS NULL AND appliance.enabled AND NOT \(unescaped: deletePending)
                AND EXISTS (SELECT 1 FROM wisp JOIN image ON image.id = wisp.imageID
                            WHERE wisp.id = instance.wispID AND image.loginUser IS NOT NULL)
                AND EXISTS (SELECT 1 FROM timelineEntry WHERE timelineEntry.instanceID = instance.id
                            AND timelineEntry.phase IN (\(LaunchPhase.sshReachable.rawValue), \(LaunchPhase.postCreateDone.rawValue)))
                AND (\(region)::text IS NULL OR appliance.region = \(region)::text)
                ORDER BY EXISTS (SELECT 1 FROM timelineEntry WHERE timelineEntry.instanceID = instance.id
                                 AND timelineEntry.phase = \(LaunchPhase.postCreateDone.rawValue)) DESC,
                         instance.createdAt, instance.id LIMIT 1
                """)
        else { return nil }
        return (try row.get("id"), try row.get("applianceID"))
    }

    /// Row ids of users named by id or name; an unknown one is an invalid `field`.
    static func userIDs(_ session: Session, _ users: [String], field: String) async throws -> [Int] {
        var ids: [Int] = []
        for user in users {
            guard let id = try await session.value("SELECT id FROM \"user\" WHERE \(unescaped: idColumn(user)) = \(user)", as: Int.self) else {
                throw PoolError.invalid(field: field, reason: "there is no user '\(user)'")
            }
            ids.append(id)
        }
        return ids
    }

    /// Gives users access to an instance (the owner has it already).
    static func grant(_ session: Session, instanceID: Int, users: [Int], ownerID: Int, at date: Date) async throws {
        for userID in users where userID != ownerID {
            try await session.execute(
                "INSERT INTO instanceUser (instanceID, userID, addedAt) VALUES (\(instanceID), \(userID), \(date)) ON CONFLICT DO NOTHING")
        }
    }

    /// The row id and owner's row id of the instance with this id or name.
    static func instanceIDs(_ session: Session, _ id: String) async throws -> (id: Int, ownerID: Int) {
        guard let row = try await session.row("SELECT id, ownerID FROM instance WHERE instance.\(unescaped: idColumn(id)) = \(id)") else {
            throw PoolError.notFound(what: "instance", name: id)
        }
        return (try row.get("id"), try row.get("ownerID"))
    }
}
