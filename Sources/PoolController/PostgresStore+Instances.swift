import Foundation
import PoolAPI
import PostgresNIO

/// Instances on PostgreSQL: appliances' reports and check-ins, actions,
/// reservations, housekeeping.
extension PostgresStore {
    static let instanceQuery = """
        SELECT instance.*, appliance.name AS appliance, "user".name AS owner, "user".uuid AS ownerUUID, wisp.name AS wisp,
        COALESCE(image.name, wispImage.name) AS image, template.name AS template,
        CASE WHEN image.id IS NOT NULL THEN image.loginUser ELSE wispImage.loginUser END AS loginUser,
        (instance.handOutAction IS NOT NULL AND instance.handOutAction IS DISTINCT FROM instance.keysApplied) AS rekeying,
        ARRAY(SELECT granted.uuid FROM instanceUser JOIN "user" AS granted ON granted.id = instanceUser.userID
              WHERE instanceUser.instanceID = instance.id ORDER BY instanceUser.addedAt, granted.name) AS grantedUsers
        FROM instance
        JOIN appliance ON appliance.id = instance.applianceID JOIN "user" ON "user".id = instance.ownerID
        LEFT JOIN wisp ON wisp.id = instance.wispID LEFT JOIN image ON image.id = instance.imageID
        LEFT JOIN image AS wispImage ON wispImage.id = wisp.imageID LEFT JOIN template ON template.id = instance.templateID
        """

    static func instance(_ row: Row) throws -> Instance { try row.decode(InstanceRecord.self).model }

    static func instance(_ session: Session, named name: String) async throws -> Instance {
        guard let row = try await session.row("\(unescaped: instanceQuery) WHERE instance.name = \(name)") else {
            throw PoolError.notFound(what: "instance", name: name)
        }
        return try instance(row)
    }

    static func instance(_ session: Session, id: Int) async throws -> Instance {
        guard let row = try await session.row("\(unescaped: instanceQuery) WHERE instance.id = \(id)") else {
            throw PoolError.storage("instance \(id) vanished")
        }
        return try instance(row)
    }

    /// The column that finds a record by what a caller calls it: an id
    /// (32 hex digits) by its `uuid`, anything else by its `name`.
    static func idColumn(_ text: String) -> String {
        ResourceName.hasIDForm(text) ? "uuid" : "name"
    }

    public func instances() async throws -> [Instance] {
        try await read { session in try await session.rows("\(unescaped: Self.instanceQuery) ORDER BY instance.name").map(Self.instance) }
    }

    public func instance(id: String) async throws -> Instance? {
        try await read { session in
            try await session.row("\(unescaped: Self.instanceQuery) WHERE instance.\(unescaped: Self.idColumn(id)) = \(id)")
                .map(Self.instance)
        }
    }

    public func instancesPage(
        owners: Set<String>?, sharedWith: String?, includeWarm: Bool, ownerID: String?, after marker: String?, limit: Int
    ) async throws -> [Instance] {
        let ownerNames = owners.map { Array($0).sorted() }
        return try await read { session in
            try await session.rows(
                """
                \(unescaped: Self.instanceQuery)
                WHERE (\(ownerNames)::text[] IS NULL OR "user".name = ANY(\(ownerNames)::text[])
                       OR EXISTS (SELECT 1 FROM instanceUser JOIN "user" AS shared ON shared.id = instanceUser.userID
                                  WHERE instanceUser.instanceID = instance.id AND shared.uuid = \(sharedWith)::text))
                AND (\(includeWarm) OR NOT instance.warm)
                AND (\(ownerID)::text IS NULL OR "user".uuid = \(ownerID)::text)
                AND (\(marker)::text IS NULL OR instance.uuid > \(marker)::text)
                ORDER BY instance.uuid LIMIT \(limit)
                """
            ).map(Self.instance)
        }
    }

    public func setLastError(_ message: String?, forInstance name: String) async throws {
        try await write { session in
            guard try await session.execute("UPDATE instance SET lastError = \(message) WHERE name = \(name) RETURNING id") == 1 else {
                throw PoolError.notFound(what: "instance", name: name)
            }
        }
    }

    // MARK: Reports and check-ins

    /// The instance named `name` if it exists and is the appliance's; nil if
    /// it does not exist; ``PoolError/forbidden(_:)`` if it is another's.
    static func ownedInstance(_ session: Session, named name: String, applianceID: Int) async throws -> (id: Int, state: Int)? {
        guard let row = try await session.row("SELECT id, applianceID, state FROM instance WHERE name = \(name)") else { return nil }
        guard try row.get("applianceID", as: Int.self) == applianceID else {
            throw PoolError.forbidden("instance '\(name)' belongs to another appliance")
        }
        return (try row.get("id"), try row.get("state"))
    }

    static func checkRecordRoom(_ session: Session, applianceID: Int, appliance: String, adding: Int, most: Int) async throws {
        let held = try await session.value("SELECT COUNT(*) FROM instance WHERE applianceID = \(applianceID)", as: Int.self) ?? 0
        try StoreRules.checkRecordRoom(appliance: appliance, held: held, adding: adding, most: most)
    }

    public func recordReport(_ report: InstanceReport, appliance: String, consoleLimit: Int, maxInstances: Int, at date: Date)
        async throws -> RecordedReport
    {
        let flavor = try report.flavor.map { try StoreRules.json($0) }
        let addresses = try StoreRules.json(report.ipAddresses ?? [])
        let tail = try StoreRules.json(Array((report.consoleOutput ?? []).suffix(consoleLimit)))
        let expires = report.expires.map { Date(timeIntervalSince1970: TimeInterval($0)) }
        let ssh = try report.ssh.map { try StoreRules.json($0) }
        return try await write(isolation: .readCommitted) { session in
            let (applianceID, ownerID) = try await Self.lockAppliance(session, named: appliance)
            let previous = try await Self.ownedInstance(session, named: report.name, applianceID: applianceID)
            if let previous {
                try await session.execute(
                    """
                    UPDATE instance SET state = \(report.state.rawValue), flavor = COALESCE(flavor, \(flavor)), ask = \(report.ask),
                    expires = \(expires), address = \(report.address), ipAddresses = \(addresses), consoleTail = \(tail),
                    lastError = \(report.error), stateReason = \(report.reason), reportedAt = \(date), updatedAt = \(date),
                    ssh = COALESCE(\(ssh), ssh), keysApplied = COALESCE(\(report.keysApplied), keysApplied) WHERE id = \(previous.id)
                    """)
            } else {
                try await Self.checkRecordRoom(session, applianceID: applianceID, appliance: appliance, adding: 1, most: maxInstances)
                try await session.execute(
                    """
                    INSERT INTO instance (name, uuid, applianceID, ownerID, state, flavor, ask, expires, address, ipAddresses,
                    consoleTail, lastError, stateReason, createdAt, reportedAt, updatedAt, ssh)
                    VALUES (\(report.name), \(StoreRules.newID()), \(applianceID), \(ownerID), \(report.state.rawValue), \(flavor),
                    \(report.ask), \(expires), \(report.address), \(addresses), \(tail), \(report.error), \(report.reason),
                    \(date), \(date), \(date), \(ssh))
                    """)
            }
            try await Self.claimReservation(session, instance: report.name, at: date)
            guard let instanceID = try await Self.ownedInstance(session, named: report.name, applianceID: applianceID)?.id else {
                throw PoolError.storage("instance '\(report.name)' vanished while its report was recorded")
            }
            try await Self.recordTimeline(session, instanceID: instanceID, agentEntries: report.timeline ?? [])
            if report.state == .running {
                try await Self.recordPhase(session, .runningReported, instanceID: instanceID, at: date, replacing: false)
            }
            return RecordedReport(
                instance: try await Self.instance(session, named: report.name), stateChanged: previous?.state != report.state.rawValue)
        }
    }

    /// The instances named, by name: what a check-in's summary is compared with.
    static func reportedInstances(_ session: Session, named names: [String]) async throws
        -> [String: (id: Int, applianceID: Int, state: Int, reportedAt: Date?)]
    {
        var known: [String: (id: Int, applianceID: Int, state: Int, reportedAt: Date?)] = [:]
        guard !names.isEmpty else { return known }
        for row in try await session.rows("SELECT id, name, applianceID, state, reportedAt FROM instance WHERE name = ANY(\(names))") {
            known[try row.get("name")] = (try row.get("id"), try row.get("applianceID"), try row.get("state"), try row.get("reportedAt"))
        }
        return known
    }

    /// The reply to a check-in that would change nothing, or nil when it
    /// would (the write transaction then does and checks everything again).
    static func unchangedCheckIn(_ session: Session, _ appliance: String, request: CheckInRequest, stats: String, at date: Date)
        async throws -> RecordedCheckIn?
    {
        guard let row = try await session.row("SELECT id, lastSeen, stats FROM appliance WHERE name = \(appliance)") else {
            throw PoolError.notFound(what: "appliance", name: appliance)
        }
        let applianceID: Int = try row.get("id")
        guard Appliance.isFresh(try row.get("lastSeen"), at: date), try row.get("stats", as: String?.self) == stats else { return nil }
        if !request.done.isEmpty {
            let undone =
                try await session.value(
                    "SELECT COUNT(*) FROM action WHERE applianceID = \(applianceID) AND doneAt IS NULL AND id = ANY(\(request.done))",
                    as: Int.self) ?? 0
            guard undone == 0 else { return nil }
        }
        let known = try await reportedInstances(session, named: request.instances.map(\.name))
        for summary in request.instances {
            guard let instance = known[summary.name] else { return nil }  // a new record
            // Another appliance's, or decommissioned: the write would skip it too.
            guard instance.applianceID == applianceID, instance.state != InstanceState.decommissioned.rawValue else { continue }
            guard instance.state == summary.state.rawValue, Appliance.isFresh(instance.reportedAt, at: date) else { return nil }
        }
        return RecordedCheckIn(actions: try await pendingActions(session, applianceID: applianceID), changes: [])
    }

    public func checkIn(_ appliance: String, request: CheckInRequest, maxInstances: Int, at date: Date) async throws
        -> RecordedCheckIn
    {
        // Sorted keys: the same stats are the same text.
        let stats = try StoreRules.json(request.stats, sortedKeys: true)
        if let unchanged = try await read({ session in
            try await Self.unchangedCheckIn(session, appliance, request: request, stats: stats, at: date)
        }) {
            return unchanged
        }
        return try await write(isolation: .readCommitted) { session in
            let (applianceID, ownerID) = try await Self.lockAppliance(session, named: appliance)
            try await session.execute("UPDATE appliance SET lastSeen = \(date), stats = \(stats) WHERE id = \(applianceID)")
            if !request.done.isEmpty {
                try await session.execute(
                    "UPDATE action SET doneAt = \(date) WHERE id = ANY(\(request.done)) AND applianceID = \(applianceID) AND doneAt IS NULL")
            }
            let names = request.instances.map(\.name)
            var known = try await Self.reportedInstances(session, named: names)
            var seen: [Int] = []
            var recorded: [String] = []
            for summary in request.instances {
                if let existing = known[summary.name] {
                    // Another appliance's instance: its report is not this one's to make.
                    guard existing.applianceID == applianceID else { continue }
                    // Decommissioned is final (a late summary must not bring it back).
                    guard existing.state != InstanceState.decommissioned.rawValue else { continue }
                    if !Appliance.isFresh(existing.reportedAt, at: date) { seen.append(existing.id) }
                    guard existing.state != summary.state.rawValue else { continue }
                    try await session.execute(
                        "UPDATE instance SET state = \(summary.state.rawValue), updatedAt = \(date) WHERE id = \(existing.id)")
                    known[summary.name]?.state = summary.state.rawValue
                    recorded.append(summary.name)
                } else {
                    try await Self.checkRecordRoom(session, applianceID: applianceID, appliance: appliance, adding: 1, most: maxInstances)
                    guard
                        let id = try await session.value(
                            """
                            INSERT INTO instance (name, uuid, applianceID, ownerID, state, ipAddresses, consoleTail, createdAt,
                            reportedAt, updatedAt) VALUES (\(summary.name), \(StoreRules.newID()), \(applianceID), \(ownerID),
                            \(summary.state.rawValue), '[]', '[]', \(date), \(date), \(date)) RETURNING id
                            """, as: Int.self)
                    else { throw PoolError.storage("instance '\(summary.name)' was not recorded") }
                    known[summary.name] = (id, applianceID, summary.state.rawValue, date)
                    recorded.append(summary.name)
                }
            }
            // Pending reservations of the new and changed instances become their owners.
            if !recorded.isEmpty,
                try await session.row(
                    "SELECT 1 FROM reservation JOIN instance ON instance.id = reservation.instanceID WHERE instance.name = ANY(\(recorded))"
                ) != nil
            {
                for name in recorded { try await Self.claimReservation(session, instance: name, at: date) }
            }
            if !seen.isEmpty { try await session.execute("UPDATE instance SET reportedAt = \(date) WHERE id = ANY(\(seen))") }
            // Each new or changed instance as it is now, in the summary's order.
            var events: [String: InstanceEvent] = [:]
            if !recorded.isEmpty {
                for row in try await session.rows(
                    """
                    SELECT instance.name, instance.state, "user".name AS owner FROM instance JOIN "user" ON "user".id = instance.ownerID
                    WHERE instance.name = ANY(\(recorded))
                    """)
                {
                    let name: String = try row.get("name")
                    events[name] = InstanceEvent(
                        name: name, state: InstanceState(rawValue: try row.get("state")) ?? .inactive, appliance: appliance, owner: try row.get("owner"))
                }
            }
            return RecordedCheckIn(
                actions: try await Self.pendingActions(session, applianceID: applianceID), changes: recorded.compactMap { events[$0] })
        }
    }

    /// Locks the appliance's row for this transaction (its reports apply one
    /// at a time); its id and owner's id.
    static func lockAppliance(_ session: Session, named name: String) async throws -> (id: Int, ownerID: Int) {
        guard let row = try await session.row("SELECT id, ownerID FROM appliance WHERE name = \(name) FOR UPDATE") else {
            throw PoolError.notFound(what: "appliance", name: name)
        }
        return (try row.get("id"), try row.get("ownerID"))
    }

    // MARK: Actions

    static func action(_ row: Row) throws -> Action { try row.decode(ActionRecord.self).model }

    /// Queues an action; its appliance's held check-ins wake when the
    /// transaction commits (this replica's at once, the others' through NOTIFY).
    static func insertAction(
        _ session: Session, kind: Action.Kind, instanceID: Int, applianceID: Int, flavor: String?, expires: Date?, at date: Date,
        keys: [String]? = nil, user: String? = nil, run: String? = nil
    ) async throws -> Action {
        let id = UUID().uuidString.lowercased()
        let keyList = try keys.map { try StoreRules.json($0) }
        try await session.execute(
            """
            INSERT INTO action (id, instanceID, applianceID, kind, flavor, expires, createdAt, keys, "user", run)
            VALUES (\(id), \(instanceID), \(applianceID), \(kind.rawValue), \(flavor), \(expires), \(date), \(keyList), \(user), \(run))
            """)
        if let appliance = try await session.value(
            "SELECT name FROM appliance, pg_notify('corral_actions', appliance.name) WHERE id = \(applianceID)", as: String.self)
        {
            session.woken.insert(appliance)
        }
        guard
            let row = try await session.row(
                "SELECT action.*, instance.name AS instance FROM action JOIN instance ON instance.id = action.instanceID WHERE action.id = \(id)")
        else { throw PoolError.storage("action \(id) vanished") }
        return try action(row)
    }

    public func pendingActions(appliance: String) async throws -> [Action] {
        try await read { session in
            try await Self.pendingActions(session, applianceID: try await Self.applianceIDs(session, named: appliance).id)
        }
    }

    /// The appliance's actions not yet done, oldest first; a `start`
    /// carries the phases the pool recorded for its instance.
    static func pendingActions(_ session: Session, applianceID: Int) async throws -> [Action] {
        var actions: [Action] = []
        for row in try await session.rows(
            """
            SELECT action.*, instance.name AS instance FROM action JOIN instance ON instance.id = action.instanceID
            WHERE action.applianceID = \(applianceID) AND action.doneAt IS NULL ORDER BY action.createdAt, action.seq
            """)
        {
            var action = try action(row)
            if action.kind == .start {
                let timeline = try await timeline(session, instanceID: try row.get("instanceID")).filter {
                    LaunchPhase.recordedByPool.contains($0.phase)
                }
                if !timeline.isEmpty { action.timeline = timeline }
            }
            actions.append(action)
        }
        return actions
    }

    public func enqueueAction(_ kind: Action.Kind, instance name: String, expires: Date?, at date: Date) async throws -> Action {
        try await write { session in
            guard let instance = try await session.row("SELECT id, applianceID, state, flavor FROM instance WHERE name = \(name)") else {
                throw PoolError.notFound(what: "instance", name: name)
            }
            guard try instance.get("state", as: Int.self) != InstanceState.decommissioned.rawValue else {
                throw PoolError.conflict("instance '\(name)' is decommissioned")
            }
            return try await Self.insertAction(
                session, kind: kind, instanceID: try instance.get("id"), applianceID: try instance.get("applianceID"),
                flavor: kind == .start ? try instance.get("flavor") : nil, expires: expires, at: date)
        }
    }

    /// Wakes the held check-ins of the appliances whose actions another
    /// replica (or `corral pool` command) committed, until cancelled: their
    /// transactions NOTIFY `corral_actions` with the appliance's name.
    public func followOtherWriters(every interval: Duration) async throws {
        let signal = actionsChanged
        try await listen(on: "corral_actions", retryingEvery: interval) { payload in
            if let payload { signal.signal(payload) } else { signal.signal() }
        }
    }

    /// Hands each notification on `channel` to `handle` until cancelled, on a
    /// connection of the store's own; after a lost connection it listens
    /// again `interval` later and calls `handle(nil)`: notifications may
    /// have been missed meanwhile.
    func listen(on channel: String, retryingEvery interval: Duration, _ handle: @escaping @Sendable (String?) -> Void) async throws {
        while !Task.isCancelled {
            do {
                let connection = try await PostgresConnection.connect(
                    configuration: try location.connectionConfiguration(), id: 0, logger: logger)
                defer { Task { try? await connection.close() } }
                try await connection.listen(on: channel) { notifications in
                    for try await notification in notifications { handle(notification.payload) }
                }
            } catch where !Task.isCancelled {
                logger.warning(
                    "lost the pool database's notifications; listening again", metadata: ["channel": "\(channel)", "error": "\(Self.describe(error))"])
                handle(nil)
            }
            try await Task.sleep(for: interval)
        }
    }

    /// An event as other replicas hear of it: which replica announced it, and the event.
    struct Announcement: Codable {
        var replica: String
        var event: InstanceEvent
    }

    public func announce(_ event: InstanceEvent) async {
        do {
            let payload = try StoreRules.json(Announcement(replica: replicaID, event: event))
            try await read { session in try await session.execute("SELECT pg_notify('corral_events', \(payload))") }
        } catch {
            logger.warning("could not tell the other replicas of an event", metadata: ["instance": "\(event.name)", "error": "\(error)"])
        }
    }

    public func followAnnouncements(_ deliver: @escaping @Sendable (InstanceEvent) -> Void) async throws {
        let replicaID = self.replicaID
        try await listen(on: "corral_events", retryingEvery: .seconds(1)) { payload in
            guard let announcement = StoreRules.decodeJSON(Announcement.self, payload), announcement.replica != replicaID else { return }
            deliver(announcement.event)
        }
    }

    /// NOTIFY `corral_warm`: the leader runs a warm-pool pass (the others ignore it).
    public func askForWarmPoolPass() async {
        do {
            try await read { session in try await session.execute("SELECT pg_notify('corral_warm', \(replicaID))") }
        } catch {
            logger.warning("could not ask the leading replica for a warm-pool pass", metadata: ["error": "\(error)"])
        }
    }

    public func followWarmPoolAsks(_ wake: @escaping @Sendable () -> Void) async throws {
        let replicaID = self.replicaID
        try await listen(on: "corral_warm", retryingEvery: .seconds(1)) { payload in
            guard payload != replicaID else { return }
            wake()
        }
    }

    // MARK: Reservations

    static let reservationQuery = """
        SELECT reservation.*, "user".name AS user, instance.name AS instance, appliance.name AS appliance, wisp.name AS wisp
        FROM reservation JOIN "user" ON "user".id = reservation.userID JOIN instance ON instance.id = reservation.instanceID
        JOIN appliance ON appliance.id = instance.applianceID LEFT JOIN wisp ON wisp.id = reservation.wispID
        """

    static func reservation(_ row: Row) throws -> Reservation { try row.decode(ReservationRecord.self).model }

    public func reservations() async throws -> [Reservation] {
        try await read { session in
            try await session.rows("\(unescaped: Self.reservationQuery) ORDER BY reservation.createdAt").map(Self.reservation)
        }
    }

    /// Turns a pending reservation of the instance into its owner, wisp and callback.
    static func claimReservation(_ session: Session, instance name: String, at date: Date) async throws {
        guard
            let reservation = try await session.row(
                """
                SELECT reservation.* FROM reservation JOIN instance ON instance.id = reservation.instanceID
                WHERE instance.name = \(name) AND reservation.expiresAt > \(date)
                """)
        else { return }
        try await session.execute(
            """
            UPDATE instance SET ownerID = \(try reservation.get("userID", as: Int.self)), wispID = \(try reservation.get("wispID", as: Int?.self)),
            callbackURL = \(try reservation.get("callbackURL", as: String?.self)) WHERE id = \(try reservation.get("instanceID", as: Int.self))
            """)
        try await session.execute("DELETE FROM reservation WHERE id = \(try reservation.get("id", as: String.self))")
    }

    /// Refuses an appliance row that is disabled or stale.
    static func checkPlaceable(_ row: Row, name: String, staleAfter: Int, at date: Date) throws {
        try StoreRules.checkPlaceable(
            name: name, enabled: try row.get("enabled"), lastSeen: try row.get("lastSeen"), staleAfter: staleAfter, at: date)
    }

    /// What an appliance has free (see ``StoreRules/freeRoom(stats:pending:)``).
    static func freeRoom(_ session: Session, applianceID: Int, stats: String?) async throws -> InstanceFlavor? {
        guard stats != nil else { return nil }
        let pending = try await session.rows(
            """
            SELECT instance.flavor FROM action JOIN instance ON instance.id = action.instanceID
            WHERE action.applianceID = \(applianceID) AND action.kind = 'start' AND action.doneAt IS NULL AND instance.flavor IS NOT NULL
            """
        ).map { try $0.get("flavor", as: String.self) }
        return StoreRules.freeRoom(stats: stats, pending: pending)
    }

    public func reserve(_ request: ReservationRequest, user: String, lifetime: Int, applianceStaleAfter: Int, at date: Date)
        async throws -> Reservation
    {
        try await write { session in
            guard let userRow = try await session.row("SELECT * FROM \"user\" WHERE name = \(user)") else {
                throw PoolError.notFound(what: "user", name: user)
            }
            let userID: Int = try userRow.get("id")
            let superuser: Bool = try userRow.get("superuser")
            var wispID: Int?
            if let wisp = request.wisp {
                let row = try await session.row("SELECT id, ownerID FROM wisp WHERE name = \(wisp)")
                // Another user's wisp is reported as missing, not as forbidden.
                guard let row, try superuser || row.get("ownerID", as: Int.self) == userID else {
                    throw PoolError.notFound(what: "wisp", name: wisp)
                }
                wispID = try row.get("id")
            }
            let limit: Int = try userRow.get("maxInstances")
            let instanceID: Int
            if let name = request.instance {
                guard
                    let row = try await session.row(
                        """
                        SELECT instance.id, instance.state, appliance.name AS appliance, appliance.enabled, appliance.lastSeen
                        FROM instance JOIN appliance ON appliance.id = instance.applianceID WHERE instance.name = \(name)
                        """)
                else { throw PoolError.notFound(what: "instance", name: name) }
                guard try row.get("state", as: Int.self) == InstanceState.onOffer.rawValue else {
                    throw PoolError.conflict("instance '\(name)' is not on offer")
                }
                try Self.checkPlaceable(row, name: try row.get("appliance"), staleAfter: applianceStaleAfter, at: date)
                instanceID = try row.get("id")
                try await session.execute("DELETE FROM reservation WHERE instanceID = \(instanceID) AND expiresAt <= \(date)")
                if try await session.row("SELECT 1 FROM reservation WHERE instanceID = \(instanceID)") != nil {
                    throw PoolError.conflict("instance '\(name)' is reserved already")
                }
                try await Self.checkLimit(session, userID: userID, name: user, limit: limit, at: date)
            } else {
                guard let appliance = request.appliance, let flavorName = request.flavor else {
                    throw PoolError.invalid(field: "instance", reason: "give either 'instance' or both 'appliance' and 'flavor'")
                }
                guard let flavor = try await session.row("SELECT * FROM flavor WHERE name = \(flavorName) AND active") else {
                    throw PoolError.notFound(what: "flavor", name: flavorName)
                }
                guard let row = try await session.row("SELECT * FROM appliance WHERE name = \(appliance)") else {
                    throw PoolError.notFound(what: "appliance", name: appliance)
                }
                try Self.checkPlaceable(row, name: appliance, staleAfter: applianceStaleAfter, at: date)
                let size = InstanceFlavor(
                    name: flavorName, vcpus: try flavor.get("vcpus"), memory: try flavor.get("memory"), disk: try flavor.get("disk"))
                let applianceID: Int = try row.get("id")
                try StoreRules.checkRoom(
                    try await Self.freeRoom(session, applianceID: applianceID, stats: try row.get("stats")), for: size, appliance: appliance)
                try await Self.checkLimit(session, userID: userID, name: user, limit: limit, at: date)
                let flavorJSON = try StoreRules.json(size)
                guard
                    let id = try await session.value(
                        """
                        INSERT INTO instance (name, uuid, applianceID, ownerID, wispID, state, flavor, ipAddresses, consoleTail,
                        callbackURL, createdAt, updatedAt) VALUES (\(StoreRules.newInstanceName()), \(StoreRules.newID()), \(applianceID),
                        \(userID), \(wispID), \(InstanceState.leased.rawValue), \(flavorJSON), '[]', '[]', \(request.callbackURL), \(date), \(date))
                        RETURNING id
                        """, as: Int.self)
                else { throw PoolError.storage("the reserved instance was not recorded") }
                instanceID = id
                _ = try await Self.insertAction(
                    session, kind: .start, instanceID: instanceID, applianceID: applianceID, flavor: flavorJSON,
                    expires: request.leaseSeconds.map { date.addingTimeInterval(TimeInterval($0)) }, at: date)
            }
            let id = UUID().uuidString.lowercased()
            try await session.execute(
                """
                INSERT INTO reservation (id, userID, instanceID, flavor, wispID, callbackURL, createdAt, expiresAt)
                VALUES (\(id), \(userID), \(instanceID), \(request.flavor), \(wispID), \(request.callbackURL), \(date),
                \(date.addingTimeInterval(TimeInterval(lifetime))))
                """)
            guard let row = try await session.row("\(unescaped: Self.reservationQuery) WHERE reservation.id = \(id)") else {
                throw PoolError.storage("reservation \(id) vanished")
            }
            return try Self.reservation(row)
        }
    }

    // MARK: Housekeeping

    public func housekeep(at date: Date, offerStaleAfter: Int, purgeAfter: Int) async throws -> HousekeepingResult {
        try await write { session in
            var result = HousekeepingResult()
            result.lapsed = try await session.value("SELECT COUNT(*) FROM reservation WHERE expiresAt <= \(date)", as: Int.self) ?? 0
            // A flavor slot never reported by its appliance goes with its reservation.
            try await session.execute(
                "DELETE FROM instance WHERE reportedAt IS NULL AND id IN (SELECT instanceID FROM reservation WHERE expiresAt <= \(date))")
            try await session.execute("DELETE FROM reservation WHERE expiresAt <= \(date)")
            let silentSince = date.addingTimeInterval(-TimeInterval(offerStaleAfter))
            let withdrawn = try await session.rows(
                """
                UPDATE instance SET state = \(InstanceState.inactive.rawValue), updatedAt = \(date)
                WHERE state = \(InstanceState.onOffer.rawValue) AND COALESCE(reportedAt, updatedAt) < \(silentSince) RETURNING name
                """
            ).map { try $0.get("name", as: String.self) }
            for name in withdrawn.sorted() { result.withdrawn.append(try await Self.instance(session, named: name).event) }
            let deadSince = date.addingTimeInterval(-TimeInterval(purgeAfter))
            result.purged = try await session.execute(
                """
                DELETE FROM instance WHERE state IN (\(InstanceState.inactive.rawValue), \(InstanceState.decommissioned.rawValue))
                AND updatedAt < \(deadSince) RETURNING id
                """)
            try await session.execute("DELETE FROM action WHERE doneAt < \(deadSince)")
            return result
        }
    }
}
