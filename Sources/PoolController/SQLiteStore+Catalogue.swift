import Foundation
import GRDB
import PoolAPI

/// Changes to the catalogue and to users' limits. Nothing running is lost:
/// a deactivated flavor or image keeps its instances, and a changed
/// template or wisp applies to instances made from then on.
extension SQLiteStore {
    /// Activates or deactivates a flavor: an inactive one takes no new
    /// instances (nor warm ones) and is not listed to users.
    public func setFlavor(_ name: String, active: Bool) async throws -> Flavor {
        try await database.write { db in
            try db.execute(sql: "UPDATE flavor SET active = ? WHERE name = ?", arguments: [active, name])
            guard db.changesCount == 1 else { throw PoolError.notFound(what: "flavor", name: name) }
            guard let flavor = try Row.fetchOne(db, sql: "SELECT * FROM flavor WHERE name = ?", arguments: [name]).map(Self.flavor)
            else { throw PoolError.storage("flavor '\(name)' vanished") }
            return flavor
        }
    }

    /// Activates or deactivates an image (an inactive one takes no new
    /// instances and is not listed to users), or changes its login user
    /// (`.some(nil)` clears it).
    public func setImage(_ name: String, active: Bool?, loginUser: String??) async throws -> Image {
        try await database.write { db in
            guard let id = try Int64.fetchOne(db, sql: "SELECT id FROM image WHERE name = ?", arguments: [name]) else {
                throw PoolError.notFound(what: "image", name: name)
            }
            if let active { try db.execute(sql: "UPDATE image SET active = ? WHERE id = ?", arguments: [active, id]) }
            if let loginUser { try db.execute(sql: "UPDATE image SET loginUser = ? WHERE id = ?", arguments: [loginUser, id]) }
            guard let image = try Row.fetchOne(db, sql: "SELECT * FROM image WHERE id = ?", arguments: [id]).map(Self.image)
            else { throw PoolError.storage("image '\(name)' vanished") }
            return image
        }
    }

    /// Changes a user's instance limit and lease length (`.some(nil)`: the
    /// pool's default lease). Instances they hold beyond a lowered limit
    /// keep running; new ones wait until they are under it.
    public func setUserLimits(_ name: String, maxInstances: Int?, leaseSeconds: Int??) async throws -> User {
        try await database.write { db in
            guard try Bool.fetchOne(db, sql: "SELECT 1 FROM user WHERE name = ?", arguments: [name]) == true else {
                throw PoolError.notFound(what: "user", name: name)
            }
            if let maxInstances {
                try db.execute(sql: "UPDATE user SET maxInstances = ? WHERE name = ?", arguments: [maxInstances, name])
            }
            if let leaseSeconds {
                try db.execute(sql: "UPDATE user SET leaseSeconds = ? WHERE name = ?", arguments: [leaseSeconds, name])
            }
            guard let row = try Row.fetchOne(db, sql: Self.userQuery + " WHERE user.name = ?", arguments: [name]) else {
                throw PoolError.storage("user '\(name)' vanished")
            }
            return try Self.user(row)
        }
    }

    /// Changes a template's wisp, flavor or number of warm instances. The
    /// warm-pool pass then retires warm instances beyond `hotStarts`, and
    /// those built from the old wisp or flavor, and places new ones.
    public func setTemplate(_ name: String, wisp: String?, flavor: String?, hotStarts: Int?, at date: Date) async throws -> Template {
        if let hotStarts, hotStarts < 0 { throw PoolError.invalid(field: "hot_starts", reason: "must be 0 or more") }
        return try await database.write { db in
            guard let templateID = try Int64.fetchOne(db, sql: "SELECT id FROM template WHERE name = ?", arguments: [name]) else {
                throw PoolError.notFound(what: "template", name: name)
            }
            if let wisp {
                guard let wispID = try Int64.fetchOne(db, sql: "SELECT id FROM wisp WHERE name = ?", arguments: [wisp]) else {
                    throw PoolError.notFound(what: "wisp", name: wisp)
                }
                try db.execute(sql: "UPDATE template SET wispID = ? WHERE id = ?", arguments: [wispID, templateID])
            }
            if let flavor {
                guard
                    let flavorID = try Int64.fetchOne(db, sql: "SELECT id FROM flavor WHERE name = ? AND active", arguments: [flavor])
                else { throw PoolError.notFound(what: "flavor", name: flavor) }
                try db.execute(sql: "UPDATE template SET flavorID = ? WHERE id = ?", arguments: [flavorID, templateID])
            }
            if let hotStarts {
                try db.execute(sql: "UPDATE template SET hotStarts = ? WHERE id = ?", arguments: [hotStarts, templateID])
                // Fewer warm instances: the newest beyond the number go (the oldest are likeliest ready).
                try Self.retireWarm(
                    db,
                    where: """
                        instance.id IN (SELECT id FROM instance WHERE warm AND templateID = ? AND state NOT IN (0, 7)
                        AND NOT \(Self.deletePending) ORDER BY createdAt DESC, id DESC
                        LIMIT max(0, (SELECT COUNT(*) FROM instance WHERE warm AND templateID = ? AND state NOT IN (0, 7) AND NOT \(Self.deletePending)) - ?))
                        """,
                    arguments: [templateID, templateID, hotStarts], at: date)
            }
            // Warm instances made for what the template was are retired now.
            if wisp != nil || flavor != nil {
                try Self.retireWarm(
                    db,
                    where: """
                        instance.templateID = ? AND (instance.wispID IS NOT (SELECT wispID FROM template WHERE id = ?)
                        OR json_extract(instance.flavor, '$.name') IS NOT (SELECT flavor.name FROM template JOIN flavor ON flavor.id = template.flavorID WHERE template.id = ?))
                        """,
                    arguments: [templateID, templateID, templateID], at: date)
            }
            guard let row = try Row.fetchOne(db, sql: Self.templateQuery + " WHERE template.id = ?", arguments: [templateID]) else {
                throw PoolError.storage("template '\(name)' vanished")
            }
            return try Self.template(row)
        }
    }

    /// Removes a template: its warm instances are decommissioned; the
    /// instances handed out from it keep running (they forget it).
    public func removeTemplate(_ name: String, at date: Date) async throws -> [String] {
        try await database.write { db in
            guard let templateID = try Int64.fetchOne(db, sql: "SELECT id FROM template WHERE name = ?", arguments: [name]) else {
                throw PoolError.notFound(what: "template", name: name)
            }
            let retired = try Self.retireWarm(db, where: "instance.templateID = ?", arguments: [templateID], at: date)
            try db.execute(sql: "UPDATE instance SET templateID = NULL WHERE templateID = ?", arguments: [templateID])
            try db.execute(sql: "DELETE FROM template WHERE id = ?", arguments: [templateID])
            return retired
        }
    }

    /// Changes what a wisp boots. Instances already made keep what they
    /// booted; warm instances of the templates using it are retired (the
    /// warm-pool pass builds new ones from the wisp as it is now).
    public func setWisp(_ name: String, _ change: WispChange, at date: Date) async throws -> (wisp: Wisp, retired: [String]) {
        if change.image != nil, change.dynamicImageURL != nil {
            throw PoolError.invalid(field: "image", reason: "give a catalogue image or a dynamic image URL, not both")
        }
        return try await database.write { db in
            guard let wispID = try Int64.fetchOne(db, sql: "SELECT id FROM wisp WHERE name = ?", arguments: [name]) else {
                throw PoolError.notFound(what: "wisp", name: name)
            }
            if let image = change.image {
                guard let imageID = try Int64.fetchOne(db, sql: "SELECT id FROM image WHERE name = ? AND active", arguments: [image]) else {
                    throw PoolError.notFound(what: "image", name: image)
                }
                try db.execute(sql: "UPDATE wisp SET imageID = ?, dynamicImageURL = NULL WHERE id = ?", arguments: [imageID, wispID])
            }
            if let url = change.dynamicImageURL {
                try db.execute(sql: "UPDATE wisp SET imageID = NULL, dynamicImageURL = ? WHERE id = ?", arguments: [url, wispID])
            }
            if let keys = change.sshKeys {
                try db.execute(sql: "UPDATE wisp SET sshKeys = ? WHERE id = ?", arguments: [keys.joined(separator: "\n"), wispID])
            }
            if let postCreate = change.postCreate {
                try db.execute(sql: "UPDATE wisp SET postCreate = ? WHERE id = ?", arguments: [postCreate, wispID])
            }
            if let callbackURL = change.callbackURL {
                try db.execute(sql: "UPDATE wisp SET callbackURL = ? WHERE id = ?", arguments: [callbackURL, wispID])
            }
            let retired =
                change.isEmpty
                ? [] : try Self.retireWarm(db, where: "instance.templateID IN (SELECT id FROM template WHERE wispID = ?)", arguments: [wispID], at: date)
            guard let wisp = try Row.fetchOne(db, sql: Self.wispQuery + " WHERE wisp.id = ?", arguments: [wispID]).map(Self.wisp) else {
                throw PoolError.storage("wisp '\(name)' vanished")
            }
            return (wisp, retired)
        }
    }

    /// Removes a wisp no template and no live instance boots from (409
    /// naming them otherwise); decommissioned instances forget it.
    public func removeWisp(_ name: String) async throws {
        try await database.write { db in
            guard let wispID = try Int64.fetchOne(db, sql: "SELECT id FROM wisp WHERE name = ?", arguments: [name]) else {
                throw PoolError.notFound(what: "wisp", name: name)
            }
            let templates = try String.fetchAll(db, sql: "SELECT name FROM template WHERE wispID = ? ORDER BY name", arguments: [wispID])
            guard templates.isEmpty else {
                throw PoolError.conflict(
                    "wisp '\(name)' is the wisp of template \(templates.map { "'\($0)'" }.joined(separator: ", ")); change or remove those first")
            }
            let live = try String.fetchAll(
                db, sql: "SELECT name FROM instance WHERE wispID = ? AND state != ? ORDER BY name LIMIT 5",
                arguments: [wispID, InstanceState.decommissioned.rawValue])
            guard live.isEmpty else {
                throw PoolError.conflict(
                    "wisp '\(name)' is the wisp of live instance \(live.joined(separator: ", ")); delete those first")
            }
            try db.execute(sql: "UPDATE instance SET wispID = NULL WHERE wispID = ?", arguments: [wispID])
            try db.execute(sql: "DELETE FROM wisp WHERE id = ?", arguments: [wispID])
        }
    }

    /// Queues the decommissioning of the warm instances `condition` picks
    /// (not yet handed out, not already being deleted); their names.
    @discardableResult
    static func retireWarm(_ db: Database, where condition: String, arguments: StatementArguments, at date: Date) throws -> [String] {
        let rows = try Row.fetchAll(
            db,
            sql: "SELECT instance.id, instance.name, instance.applianceID FROM instance WHERE instance.warm AND state != ? AND NOT \(deletePending) AND \(condition)",
            arguments: [InstanceState.decommissioned.rawValue] + arguments)
        for row in rows {
            _ = try insertAction(
                db, kind: .delete, instanceID: try row.decode(forColumn: "id"), applianceID: try row.decode(forColumn: "applianceID"),
                flavor: nil, expires: nil, at: date)
        }
        return try rows.map { try $0.decode(forColumn: "name") }
    }
}

// MARK: Flavors, images and wisps

extension SQLiteStore {
    // MARK: Flavors

    public func addFlavor(_ flavor: Flavor) async throws {
        // Flavors are unique twice over: by name (checked here, in the same
        // transaction) and by their specs (the constraint the insert hits).
        try await write(what: "flavor with these specs", name: flavor.name) { db in
            if try Bool.fetchOne(db, sql: "SELECT 1 FROM flavor WHERE name = ?", arguments: [flavor.name]) ?? false {
                throw PoolError.alreadyExists(what: "flavor", name: flavor.name)
            }
            try db.execute(
                sql: """
                    INSERT INTO flavor (name, description, vcpus, memory, disk, networkUp, networkDown, rate, ask, hot, active)
                    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                    """,
                arguments: [
                    flavor.name, flavor.description, flavor.vcpus, flavor.memory, flavor.disk, flavor.networkUp,
                    flavor.networkDown, flavor.rate, flavor.ask, flavor.hot, flavor.active,
                ])
        }
    }

    public func flavors() async throws -> [Flavor] {
        try await database.read { db in
            try Row.fetchAll(db, sql: "SELECT * FROM flavor ORDER BY name").map(Self.flavor)
        }
    }

    static func flavor(_ row: Row) throws -> Flavor { try FlavorRecord(row: row).model }

    // MARK: Images and wisps

    public func addImage(_ image: Image) async throws {
        try await write(what: "image", name: image.name) { db in
            try db.execute(
                sql: "INSERT INTO image (name, url, sha256, diskFormat, kernelBoot, loginUser, active) VALUES (?, ?, ?, ?, ?, ?, ?)",
                arguments: [
                    image.name, image.url, image.sha256, image.diskFormat,
                    try image.kernelBoot.map { String(decoding: try JSONEncoder().encode($0), as: UTF8.self) }, image.loginUser,
                    image.active,
                ])
        }
    }

    public func images() async throws -> [Image] {
        try await database.read { db in
            try Row.fetchAll(db, sql: "SELECT * FROM image ORDER BY name").map(Self.image)
        }
    }

    public func addWisp(_ wisp: Wisp) async throws {
        try await write(what: "wisp", name: wisp.name) { db in
            let ownerID = try Self.userID(db, named: wisp.owner)
            var imageID: Int64?
            if let image = wisp.image {
                guard let id = try Int64.fetchOne(db, sql: "SELECT id FROM image WHERE name = ?", arguments: [image]) else {
                    throw PoolError.notFound(what: "image", name: image)
                }
                imageID = id
            }
            if wisp.isDefault {
                try db.execute(sql: "UPDATE wisp SET isDefault = 0 WHERE ownerID = ?", arguments: [ownerID])
            }
            if wisp.isSystemDefault {
                try db.execute(sql: "UPDATE wisp SET isSystemDefault = 0")
            }
            try db.execute(
                sql: """
                    INSERT INTO wisp (name, ownerID, imageID, dynamicImageURL, sshKeys, postCreate, callbackURL, isDefault, isSystemDefault)
                    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
                    """,
                arguments: [
                    wisp.name, ownerID, imageID, wisp.dynamicImageURL, wisp.sshKeys.joined(separator: "\n"),
                    wisp.postCreate, wisp.callbackURL, wisp.isDefault, wisp.isSystemDefault,
                ])
        }
    }

    static let wispQuery = """
        SELECT wisp.*, user.name AS owner, image.name AS image FROM wisp
        JOIN user ON user.id = wisp.ownerID LEFT JOIN image ON image.id = wisp.imageID
        """

    public func wisps() async throws -> [Wisp] {
        try await database.read { db in
            try Row.fetchAll(db, sql: Self.wispQuery + " ORDER BY wisp.name").map(Self.wisp)
        }
    }
}
