import Foundation
import GRDB

/// Users' SSH keys.
extension SQLiteStore {
    public func addSSHKey(owner: String, name: String, key: SSHPublicKey, maxKeys: Int, at date: Date) async throws -> SSHKey {
        try await database.write { db in
            let userID = try Self.userID(db, owner)
            let count = try Int.fetchOne(db, sql: "SELECT COUNT(*) FROM sshKey WHERE userID = ?", arguments: [userID]) ?? 0
            let clash = try String.fetchOne(
                db, sql: "SELECT name FROM sshKey WHERE userID = ? AND fingerprint = ?", arguments: [userID, key.fingerprint])
            try StoreRules.checkNewKey(count: count, maxKeys: maxKeys, clash: clash, fingerprint: key.fingerprint)
            guard try Int.fetchOne(db, sql: "SELECT 1 FROM sshKey WHERE userID = ? AND name = ?", arguments: [userID, name]) == nil else {
                throw PoolError.alreadyExists(what: "SSH key", name: name)
            }
            let stored = SSHKey(id: StoreRules.newID(), name: name, publicKey: key.line, fingerprint: key.fingerprint, createdAt: date)
            try db.execute(
                sql: "INSERT INTO sshKey (uuid, userID, name, publicKey, fingerprint, createdAt) VALUES (?, ?, ?, ?, ?, ?)",
                arguments: [stored.id, userID, name, stored.publicKey, stored.fingerprint, date])
            return stored
        }
    }

    public func sshKeys(owner: String) async throws -> [SSHKey] {
        try await database.read { db in
            try Self.sshKeys(db, userID: try Self.userID(db, owner))
        }
    }

    public func deleteSSHKey(owner: String, key: String) async throws -> SSHKey {
        try await database.write { db in
            let userID = try Self.userID(db, owner)
            guard let row = try Row.fetchOne(
                db, sql: "SELECT * FROM sshKey WHERE userID = ? AND \(Self.idOrName(key))", arguments: [userID, key])
            else { throw PoolError.notFound(what: "SSH key", name: key) }
            let stored = try Self.sshKey(row)
            try db.execute(sql: "DELETE FROM sshKey WHERE uuid = ?", arguments: [stored.id])
            return stored
        }
    }

    static func userID(_ db: Database, _ name: String) throws -> Int64 {
        guard let id = try Int64.fetchOne(db, sql: "SELECT id FROM user WHERE name = ?", arguments: [name]) else {
            throw PoolError.notFound(what: "user", name: name)
        }
        return id
    }

    static func sshKeys(_ db: Database, userID: Int64) throws -> [SSHKey] {
        try Row.fetchAll(db, sql: "SELECT * FROM sshKey WHERE userID = ? ORDER BY createdAt, name", arguments: [userID]).map(sshKey)
    }

    static func sshKey(_ row: Row) throws -> SSHKey {
        SSHKey(
            id: try row.decode(forColumn: "uuid"), name: try row.decode(forColumn: "name"),
            publicKey: try row.decode(forColumn: "publicKey"), fingerprint: try row.decode(forColumn: "fingerprint"),
            createdAt: try row.decode(forColumn: "createdAt"))
    }

    /// The public key lines a create installs: the named keys of the owner
    /// (ids or names), or all of them when `chosen` is nil.
    static func chosenKeys(_ db: Database, ownerID: Int64, _ chosen: [String]?) throws -> [String] {
        try StoreRules.chosenKeys(try sshKeys(db, userID: ownerID), chosen)
    }
}
