import Foundation
import GRDB
import PoolAPI

/// Which SSH keys an instance's guest holds, and the `keys` actions that
/// change them in running guests (through the QEMU guest agent).
extension SQLiteStore {
    /// The wisp an instance boots from: its own, else its owner's default,
    /// else the system default.
    static func bootWisp(_ db: Database, wispID: Int64?, ownerID: Int64) throws -> Wisp? {
        let row =
            try wispID.flatMap { try Row.fetchOne(db, sql: wispQuery + " WHERE wisp.id = ?", arguments: [$0]) }
            ?? Row.fetchOne(db, sql: wispQuery + " WHERE wisp.ownerID = ? AND wisp.isDefault", arguments: [ownerID])
            ?? Row.fetchOne(db, sql: wispQuery + " WHERE wisp.isSystemDefault")
        return try row.map(wisp)
    }

    /// Every key of the users an instance is shared with (not its owner),
    /// in the order they were granted.
    static func grantedKeys(_ db: Database, instanceID: Int64) throws -> [String] {
        try String.fetchAll(
            db,
            sql: """
                SELECT sshKey.publicKey FROM instanceUser JOIN instance ON instance.id = instanceUser.instanceID
                JOIN sshKey ON sshKey.userID = instanceUser.userID
                WHERE instanceUser.instanceID = ? AND instanceUser.userID != instance.ownerID
                ORDER BY instanceUser.addedAt, sshKey.createdAt, sshKey.id
                """,
            arguments: [instanceID])
    }

    /// The boot wisp's keys that reach an instance: none from a wisp with a
    /// callback, and none from a template's wisp when the instance is not
    /// its owner's (a warm instance handed out, or a cold launch by another
    /// user): those are the template owner's keys.
    static func wispKeys(_ db: Database, _ wisp: Wisp?, instanceID: Int64) throws -> [String] {
        guard let wisp, wisp.callbackURL?.isEmpty ?? true else { return [] }
        let foreign = try Bool.fetchOne(
            db,
            sql: """
                SELECT instance.handOutAction IS NOT NULL OR (instance.templateID IS NOT NULL AND user.name IS NOT ?)
                FROM instance JOIN user ON user.id = instance.ownerID WHERE instance.id = ?
                """,
            arguments: [wisp.owner, instanceID])
        return foreign == false ? wisp.sshKeys : []
    }

    /// The keys an instance's login user should hold now: its wisp's (see
    /// ``wispKeys(_:_:instanceID:)``), those its create (or hand-out) chose,
    /// and its users' keys.
    static func authorizedKeys(_ db: Database, instanceID: Int64) throws -> [String] {
        guard
            let row = try Row.fetchOne(db, sql: "SELECT wispID, ownerID, sshKeys FROM instance WHERE id = ?", arguments: [instanceID])
        else { throw PoolError.storage("instance \(instanceID) vanished") }
        var keys: [String] = []
        func add(_ more: [String]) {
            for key in more where !keys.contains(key) { keys.append(key) }
        }
        let wisp = try bootWisp(db, wispID: try row.decode(forColumn: "wispID"), ownerID: try row.decode(forColumn: "ownerID"))
        add(try wispKeys(db, wisp, instanceID: instanceID))
        add(StoreRules.scriptLines(try row.decode(forColumn: "sshKeys") as String? ?? ""))
        add(try grantedKeys(db, instanceID: instanceID))
        return keys
    }

    /// Queues a `keys` action giving the instance's guest the keys it should
    /// hold now (and `run` to start once after), unless the instance is gone
    /// or its image names no login user. Nil when nothing was queued.
    static func queueKeys(_ db: Database, instanceID: Int64, run: String?, at date: Date) throws -> Action? {
        guard
            let row = try Row.fetchOne(db, sql: instanceQuery + " WHERE instance.id = ?", arguments: [instanceID])
        else { throw PoolError.storage("instance \(instanceID) vanished") }
        let instance = try instance(row)
        guard let user = instance.loginUser, ![.decommissioned, .inactive].contains(instance.state) else { return nil }
        return try insertAction(
            db, kind: .keys, instanceID: instanceID, applianceID: try row.decode(forColumn: "applianceID"), flavor: nil, expires: nil,
            at: date, keys: try authorizedKeys(db, instanceID: instanceID), user: user, run: run)
    }
}
