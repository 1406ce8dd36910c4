import Foundation
import PoolAPI
import PostgresNIO

/// Boot sources, SSH keys, launch timelines and catalogue edits on
/// PostgreSQL (the rules are the SQLite store's; see its extensions).
extension PostgresStore {
    // MARK: Boot sources and guest keys

    public func bootSource(forInstance name: String) async throws -> BootSource {
        try await read { session in
            guard
                let instance = try await session.row(
                    "SELECT id, wispID, ownerID, callbackURL, imageID, sshKeys, userData FROM instance WHERE name = \(name)")
            else { throw PoolError.notFound(what: "instance", name: name) }
            let id: Int = try instance.get("id")
            let callbackURL: String? = try instance.get("callbackURL")
            if let callbackURL, !callbackURL.isEmpty { return .callback(callbackURL) }
            let wisp = try await Self.bootWisp(session, wispID: try instance.get("wispID"), ownerID: try instance.get("ownerID"))
            var ownImage: Image?
            if let imageID = try instance.get("imageID", as: Int?.self) {
                guard let row = try await session.row("SELECT * FROM image WHERE id = \(imageID)") else {
                    throw PoolError.storage("image \(imageID) of instance '\(name)' vanished")
                }
                ownImage = try Self.image(row)
            }
            var wispImage: Image?
            if let imageName = wisp?.image {
                wispImage = try await session.row("SELECT * FROM image WHERE name = \(imageName)").map(Self.image)
            }
            return try StoreRules.bootSource(
                instance: name, callbackURL: callbackURL, ownImage: ownImage, wisp: wisp, wispImage: wispImage,
                wispKeys: try await Self.wispKeys(session, wisp, instanceID: id),
                ownKeys: StoreRules.scriptLines(try instance.get("sshKeys", as: String?.self) ?? "")
                    + (try await Self.grantedKeys(session, instanceID: id)),
                userData: try instance.get("userData"))
        }
    }

    /// The wisp an instance boots from: its own, else its owner's default, else the system default.
    static func bootWisp(_ session: Session, wispID: Int?, ownerID: Int) async throws -> Wisp? {
        if let wispID, let row = try await session.row("\(unescaped: wispQuery) WHERE wisp.id = \(wispID)") { return try wisp(row) }
        if let row = try await session.row("\(unescaped: wispQuery) WHERE wisp.ownerID = \(ownerID) AND wisp.isDefault") {
            return try wisp(row)
        }
        return try await session.row("\(unescaped: wispQuery) WHERE wisp.isSystemDefault").map(wisp)
    }

    /// Every key of the users an instance is shared with (not its owner), in the order they were granted.
    static func grantedKeys(_ session: Session, instanceID: Int) async throws -> [String] {
        try await session.rows(
            """
            SELECT sshKey.publicKey FROM instanceUser JOIN instance ON instance.id = instanceUser.instanceID
            JOIN sshKey ON sshKey.userID = instanceUser.userID
            WHERE instanceUser.instanceID = \(instanceID) AND instanceUser.userID != instance.ownerID
            ORDER BY instanceUser.addedAt, sshKey.createdAt, sshKey.id
            """
        ).map { try $0.get("publicKey") }
    }

    /// The boot wisp's keys that reach an instance: none from a wisp with a
    /// callback, none from a template's wisp when the instance is not its owner's.
    static func wispKeys(_ session: Session, _ wisp: Wisp?, instanceID: Int) async throws -> [String] {
        guard let wisp, wisp.callbackURL?.isEmpty ?? true else { return [] }
        let foreign = try await session.value(
            """
            SELECT instance.handOutAction IS NOT NULL OR (instance.templateID IS NOT NULL AND "user".name IS DISTINCT FROM \(wisp.owner))
            FROM instance JOIN "user" ON "user".id = instance.ownerID WHERE instance.id = \(instanceID)
            """, as: Bool.self)
        return foreign == false ? wisp.sshKeys : []
    }

    /// The keys an instance's login user should hold now.
    static func authorizedKeys(_ session: Session, instanceID: Int) async throws -> [String] {
        guard let row = try await session.row("SELECT wispID, ownerID, sshKeys FROM instance WHERE id = \(instanceID)") else {
            throw PoolError.storage("instance \(instanceID) vanished")
        }
        var keys: [String] = []
        func add(_ more: [String]) {
            for key in more where !keys.contains(key) { keys.append(key) }
        }
        let wisp = try await bootWisp(session, wispID: try row.get("wispID"), ownerID: try row.get("ownerID"))
        add(try await wispKeys(session, wisp, instanceID: instanceID))
        add(StoreRules.scriptLines(try row.get("sshKeys", as: String?.self) ?? ""))
        add(try await grantedKeys(session, instanceID: instanceID))
        return keys
    }

    /// Queues a `keys` action with the keys the guest should hold now (and
    /// `run` after), unless the instance is gone or has no login user.
    static func queueKeys(_ session: Session, instanceID: Int, run: String?, at date: Date) async throws -> Action? {
        guard let row = try await session.row("\(unescaped: instanceQuery) WHERE instance.id = \(instanceID)") else {
            throw PoolError.storage("instance \(instanceID) vanished")
        }
        let instance = try instance(row)
        guard let user = instance.loginUser, ![.decommissioned, .inactive].contains(instance.state) else { return nil }
        return try await insertAction(
            session, kind: .keys, instanceID: instanceID, applianceID: try row.get("applianceID"), flavor: nil, expires: nil, at: date,
            keys: try await authorizedKeys(session, instanceID: instanceID), user: user, run: run)
    }

    // MARK: Users' SSH keys

    static func sshKey(_ row: Row) throws -> SSHKey {
        SSHKey(
            id: try row.get("uuid"), name: try row.get("name"), publicKey: try row.get("publicKey"),
            fingerprint: try row.get("fingerprint"), createdAt: try row.get("createdAt"))
    }

    static func sshKeys(_ session: Session, userID: Int) async throws -> [SSHKey] {
        try await session.rows("SELECT * FROM sshKey WHERE userID = \(userID) ORDER BY createdAt, name").map(sshKey)
    }

    static func chosenKeys(_ session: Session, ownerID: Int, _ chosen: [String]?) async throws -> [String] {
        try StoreRules.chosenKeys(try await sshKeys(session, userID: ownerID), chosen)
    }

    public func addSSHKey(owner: String, name: String, key: SSHPublicKey, maxKeys: Int, at date: Date) async throws -> SSHKey {
        try await write(what: "SSH key", name: name) { session in
            let userID = try await Self.userID(session, named: owner)
            let count = try await session.value("SELECT COUNT(*) FROM sshKey WHERE userID = \(userID)", as: Int.self) ?? 0
            let clash = try await session.value(
                "SELECT name FROM sshKey WHERE userID = \(userID) AND fingerprint = \(key.fingerprint)", as: String.self)
            try StoreRules.checkNewKey(count: count, maxKeys: maxKeys, clash: clash, fingerprint: key.fingerprint)
            guard try await session.row("SELECT 1 FROM sshKey WHERE userID = \(userID) AND name = \(name)") == nil else {
                throw PoolError.alreadyExists(what: "SSH key", name: name)
            }
            let stored = SSHKey(id: StoreRules.newID(), name: name, publicKey: key.line, fingerprint: key.fingerprint, createdAt: date)
            try await session.execute(
                """
                INSERT INTO sshKey (uuid, userID, name, publicKey, fingerprint, createdAt)
                VALUES (\(stored.id), \(userID), \(name), \(stored.publicKey), \(stored.fingerprint), \(date))
                """)
            return stored
        }
    }

    public func sshKeys(owner: String) async throws -> [SSHKey] {
        try await read { session in try await Self.sshKeys(session, userID: try await Self.userID(session, named: owner)) }
    }

    public func deleteSSHKey(owner: String, key: String) async throws -> SSHKey {
        try await write { session in
            let userID = try await Self.userID(session, named: owner)
            guard
                let row = try await session.row(
                    "SELECT * FROM sshKey WHERE userID = \(userID) AND \(unescaped: Self.idColumn(key)) = \(key)")
            else { throw PoolError.notFound(what: "SSH key", name: key) }
            let stored = try Self.sshKey(row)
            try await session.execute("DELETE FROM sshKey WHERE uuid = \(stored.id)")
            return stored
        }
    }

    // MARK: Launch timelines

    public func timeline(ofInstance id: String) async throws -> [TimelineEntry] {
        try await read { session in try await Self.timeline(session, instanceID: try await Self.instanceIDs(session, id).id) }
    }

    static func timeline(_ session: Session, instanceID: Int) async throws -> [TimelineEntry] {
        try await session.rows("SELECT * FROM timelineEntry WHERE instanceID = \(instanceID)").compactMap { row in
            guard let phase = LaunchPhase(rawValue: try row.get("phase")) else { return nil }
            return TimelineEntry(phase: phase, at: Date(timeIntervalSince1970: try row.get("at")), detail: try row.get("detail"))
        }.sorted()
    }

    /// Records a phase; an earlier time for it stays unless `replacing`.
    static func recordPhase(
        _ session: Session, _ phase: LaunchPhase, instanceID: Int, at date: Date, detail: String? = nil, replacing: Bool
    ) async throws {
        try await insert(session, TimelineEntry(phase: phase, at: date, detail: detail), instanceID: instanceID, replacing: replacing)
    }

    /// Takes an agent's times for the phases it records (its newest word wins).
    static func recordTimeline(_ session: Session, instanceID: Int, agentEntries: [TimelineEntry]) async throws {
        for entry in agentEntries where !LaunchPhase.recordedByPool.contains(entry.phase) {
            try await insert(session, entry, instanceID: instanceID, replacing: true)
        }
    }

    private static func insert(_ session: Session, _ entry: TimelineEntry, instanceID: Int, replacing: Bool) async throws {
        try await session.execute(
            """
            INSERT INTO timelineEntry (instanceID, phase, at, detail) VALUES (\(instanceID), \(entry.phase.rawValue), \(entry.at), \(entry.detail))
            ON CONFLICT (instanceID, phase) DO \(unescaped: replacing ? "UPDATE SET at = EXCLUDED.at, detail = EXCLUDED.detail" : "NOTHING")
            """)
    }

    // MARK: Catalogue edits

    public func setFlavor(_ name: String, active: Bool) async throws -> Flavor {
        try await write { session in
            guard let row = try await session.row("UPDATE flavor SET active = \(active) WHERE name = \(name) RETURNING *") else {
                throw PoolError.notFound(what: "flavor", name: name)
            }
            return try Self.flavor(row)
        }
    }

    public func setImage(_ name: String, active: Bool?, loginUser: String??) async throws -> Image {
        try await write { session in
            guard let id = try await session.value("SELECT id FROM image WHERE name = \(name)", as: Int.self) else {
                throw PoolError.notFound(what: "image", name: name)
            }
            if let active { try await session.execute("UPDATE image SET active = \(active) WHERE id = \(id)") }
            if let loginUser { try await session.execute("UPDATE image SET loginUser = \(loginUser) WHERE id = \(id)") }
            guard let row = try await session.row("SELECT * FROM image WHERE id = \(id)") else {
                throw PoolError.storage("image '\(name)' vanished")
            }
            return try Self.image(row)
        }
    }

    public func setUserLimits(_ name: String, maxInstances: Int?, leaseSeconds: Int??) async throws -> User {
        try await write { session in
            let id = try await Self.userID(session, named: name)
            if let maxInstances { try await session.execute("UPDATE \"user\" SET maxInstances = \(maxInstances) WHERE id = \(id)") }
            if let leaseSeconds { try await session.execute("UPDATE \"user\" SET leaseSeconds = \(leaseSeconds) WHERE id = \(id)") }
            return try await Self.user(session, named: name)
        }
    }

    public func setTemplate(_ name: String, wisp: String?, flavor: String?, hotStarts: Int?, at date: Date) async throws -> Template {
        if let hotStarts, hotStarts < 0 { throw PoolError.invalid(field: "hot_starts", reason: "must be 0 or more") }
        return try await write { session in
            guard let templateID = try await session.value("SELECT id FROM template WHERE name = \(name)", as: Int.self) else {
                throw PoolError.notFound(what: "template", name: name)
            }
            if let wisp {
                guard let wispID = try await session.value("SELECT id FROM wisp WHERE name = \(wisp)", as: Int.self) else {
                    throw PoolError.notFound(what: "wisp", name: wisp)
                }
                try await session.execute("UPDATE template SET wispID = \(wispID) WHERE id = \(templateID)")
            }
            if let flavor {
                guard let flavorID = try await session.value("SELECT id FROM flavor WHERE name = \(flavor) AND active", as: Int.self) else {
                    throw PoolError.notFound(what: "flavor", name: flavor)
                }
                try await session.execute("UPDATE template SET flavorID = \(flavorID) WHERE id = \(templateID)")
            }
            let live = """
                warm AND templateID = $1 AND state NOT IN (0, 7) AND NOT \(Self.deletePending)
                """
            if let hotStarts {
                try await session.execute("UPDATE template SET hotStarts = \(hotStarts) WHERE id = \(templateID)")
                // Fewer warm instances: the newest beyond the number go (the oldest are likeliest ready).
                try await Self.retireWarm(
                    session,
                    PostgresQuery(
                        unsafeSQL: """
                            instance.id IN (SELECT id FROM instance WHERE \(live) ORDER BY createdAt DESC, id DESC
                            LIMIT GREATEST(0, (SELECT COUNT(*) FROM instance WHERE \(live)) - $2))
                            """,
                        binds: try Self.bindings(templateID, hotStarts)),
                    at: date)
            }
            // Warm instances made for what the template was are retired now.
            if wisp != nil || flavor != nil {
                try await Self.retireWarm(
                    session,
                    PostgresQuery(
                        unsafeSQL: """
                            instance.templateID = $1 AND (instance.wispID IS DISTINCT FROM (SELECT wispID FROM template WHERE id = $1)
                            OR (instance.flavor::json ->> 'name') IS DISTINCT FROM
                               (SELECT flavor.name FROM template JOIN flavor ON flavor.id = template.flavorID WHERE template.id = $1))
                            """,
                        binds: try Self.bindings(templateID)),
                    at: date)
            }
            guard let row = try await session.row("\(unescaped: Self.templateQuery) WHERE template.id = \(templateID)") else {
                throw PoolError.storage("template '\(name)' vanished")
            }
            return try Self.template(row)
        }
    }

    public func removeTemplate(_ name: String, at date: Date) async throws -> [String] {
        try await write { session in
            guard let templateID = try await session.value("SELECT id FROM template WHERE name = \(name)", as: Int.self) else {
                throw PoolError.notFound(what: "template", name: name)
            }
            let retired = try await Self.retireWarm(
                session, PostgresQuery(unsafeSQL: "instance.templateID = $1", binds: try Self.bindings(templateID)), at: date)
            try await session.execute("UPDATE instance SET templateID = NULL WHERE templateID = \(templateID)")
            try await session.execute("DELETE FROM template WHERE id = \(templateID)")
            return retired
        }
    }

    public func setWisp(_ name: String, _ change: WispChange, at date: Date) async throws -> (wisp: Wisp, retired: [String]) {
        if change.image != nil, change.dynamicImageURL != nil {
            throw PoolError.invalid(field: "image", reason: "give a catalogue image or a dynamic image URL, not both")
        }
        let result = try await write { session -> WispEdit in
            guard let wispID = try await session.value("SELECT id FROM wisp WHERE name = \(name)", as: Int.self) else {
                throw PoolError.notFound(what: "wisp", name: name)
            }
            if let image = change.image {
                guard let imageID = try await session.value("SELECT id FROM image WHERE name = \(image) AND active", as: Int.self) else {
                    throw PoolError.notFound(what: "image", name: image)
                }
                try await session.execute("UPDATE wisp SET imageID = \(imageID), dynamicImageURL = NULL WHERE id = \(wispID)")
            }
            if let url = change.dynamicImageURL {
                try await session.execute("UPDATE wisp SET imageID = NULL, dynamicImageURL = \(url) WHERE id = \(wispID)")
            }
            if let keys = change.sshKeys {
                try await session.execute("UPDATE wisp SET sshKeys = \(keys.joined(separator: "\n")) WHERE id = \(wispID)")
            }
            if let postCreate = change.postCreate {
                try await session.execute("UPDATE wisp SET postCreate = \(postCreate) WHERE id = \(wispID)")
            }
            if let callbackURL = change.callbackURL {
                try await session.execute("UPDATE wisp SET callbackURL = \(callbackURL) WHERE id = \(wispID)")
            }
            let retired =
                change.isEmpty
                ? []
                : try await Self.retireWarm(
                    session,
                    PostgresQuery(
                        unsafeSQL: "instance.templateID IN (SELECT id FROM template WHERE wispID = $1)", binds: try Self.bindings(wispID)),
                    at: date)
            guard let row = try await session.row("\(unescaped: Self.wispQuery) WHERE wisp.id = \(wispID)") else {
                throw PoolError.storage("wisp '\(name)' vanished")
            }
            return WispEdit(wisp: try Self.wisp(row), retired: retired)
        }
        return (result.wisp, result.retired)
    }

    struct WispEdit: Sendable {
        var wisp: Wisp
        var retired: [String]
    }

    public func removeWisp(_ name: String) async throws {
        try await write { session in
            guard let wispID = try await session.value("SELECT id FROM wisp WHERE name = \(name)", as: Int.self) else {
                throw PoolError.notFound(what: "wisp", name: name)
            }
            let templates = try await session.rows("SELECT name FROM template WHERE wispID = \(wispID) ORDER BY name").map {
                try $0.get("name", as: String.self)
            }
            guard templates.isEmpty else {
                throw PoolError.conflict(
                    "wisp '\(name)' is the wisp of template \(templates.map { "'\($0)'" }.joined(separator: ", ")); change or remove those first")
            }
            let live = try await session.rows(
                "SELECT name FROM instance WHERE wispID = \(wispID) AND state != \(InstanceState.decommissioned.rawValue) ORDER BY name LIMIT 5"
            ).map { try $0.get("name", as: String.self) }
            guard live.isEmpty else {
                throw PoolError.conflict("wisp '\(name)' is the wisp of live instance \(live.joined(separator: ", ")); delete those first")
            }
            try await session.execute("UPDATE instance SET wispID = NULL WHERE wispID = \(wispID)")
            try await session.execute("DELETE FROM wisp WHERE id = \(wispID)")
        }
    }

    /// Binds values as $1, $2, … for a condition written as text.
    static func bindings(_ values: Int...) throws -> PostgresBindings {
        var bindings = PostgresBindings()
        for value in values { bindings.append(value) }
        return bindings
    }

    /// Queues the decommissioning of the warm instances `condition` (SQL over
    /// `instance`, its binds from $1) picks; their names.
    @discardableResult
    static func retireWarm(_ session: Session, _ condition: PostgresQuery, at date: Date) async throws -> [String] {
        let query = PostgresQuery(
            unsafeSQL: """
                SELECT instance.id, instance.name, instance.applianceID FROM instance
                WHERE instance.warm AND state != \(InstanceState.decommissioned.rawValue) AND NOT \(deletePending) AND \(condition.sql)
                ORDER BY instance.id
                """,
            binds: condition.binds)
        let rows = try await session.rows(query)
        for row in rows {
            _ = try await insertAction(
                session, kind: .delete, instanceID: try row.get("id"), applianceID: try row.get("applianceID"), flavor: nil, expires: nil,
                at: date)
        }
        return try rows.map { try $0.get("name") }
    }
}
