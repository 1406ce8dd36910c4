import Crypto
import Foundation
import GRDB
import PoolAPI

/// Users and appliances: accounts, tokens, check-in facts.
extension SQLiteStore {
    // MARK: Users

    public func addUser(
        name: String, superuser: Bool, maxInstances: Int, tokenDigest: String, manager: String?, leaseSeconds: Int?
    ) async throws -> User {
        try await write(what: "user", name: name) { db in
            let managerID = try manager.map { try Self.userID(db, named: $0) }
            try db.execute(
                sql: """
                    INSERT INTO user (name, uuid, superuser, maxInstances, tokenDigest, managerID, leaseSeconds, createdAt)
                    VALUES (?, ?, ?, ?, ?, ?, ?, ?)
                    """,
                arguments: [name, StoreRules.newID(), superuser, maxInstances, tokenDigest, managerID, leaseSeconds, Date()])
            guard let row = try Row.fetchOne(db, sql: Self.userQuery + " WHERE user.name = ?", arguments: [name]) else {
                throw PoolError.storage("user \(name) vanished")
            }
            return try Self.user(row)
        }
    }

    static let userQuery = """
        SELECT user.*, manager.name AS manager FROM user LEFT JOIN user AS manager ON manager.id = user.managerID
        """

    public func users() async throws -> [User] {
        try await database.read { db in
            try Row.fetchAll(db, sql: Self.userQuery + " ORDER BY user.name").map(Self.user)
        }
    }

    // MARK: Appliances

    static let applianceQuery = """
        SELECT appliance.*, user.name AS owner FROM appliance JOIN user ON user.id = appliance.ownerID
        """

    public func addAppliance(name: String, owner: String, tokenDigest: String) async throws -> Appliance {
        try await write(what: "appliance", name: name) { db in
            let ownerID = try Self.userID(db, named: owner)
            try db.execute(
                sql: "INSERT INTO appliance (name, ownerID, enabled, tokenDigest, createdAt) VALUES (?, ?, 1, ?, ?)",
                arguments: [name, ownerID, tokenDigest, Date()])
            return try Self.appliance(db, named: name)
        }
    }

    public func appliances() async throws -> [Appliance] {
        try await database.read { db in
            try Row.fetchAll(db, sql: Self.applianceQuery + " ORDER BY appliance.name").map(Self.appliance)
        }
    }

    public func setAppliance(_ name: String, enabled: Bool) async throws -> Appliance {
        try await database.write { db in
            try db.execute(sql: "UPDATE appliance SET enabled = ? WHERE name = ?", arguments: [enabled, name])
            guard db.changesCount == 1 else { throw PoolError.notFound(what: "appliance", name: name) }
            return try Self.appliance(db, named: name)
        }
    }

    public func setAppliance(_ name: String, region: String?) async throws -> Appliance {
        try await database.write { db in
            try db.execute(sql: "UPDATE appliance SET region = ? WHERE name = ?", arguments: [region, name])
            guard db.changesCount == 1 else { throw PoolError.notFound(what: "appliance", name: name) }
            return try Self.appliance(db, named: name)
        }
    }

    public func setApplianceToken(_ name: String, tokenDigest: String) async throws {
        try await database.write { db in
            try db.execute(sql: "UPDATE appliance SET tokenDigest = ? WHERE name = ?", arguments: [tokenDigest, name])
            guard db.changesCount == 1 else { throw PoolError.notFound(what: "appliance", name: name) }
        }
    }

    public func appliance(tokenDigest: String) async throws -> Appliance? {
        try await database.read { db in
            try Row.fetchOne(db, sql: Self.applianceQuery + " WHERE appliance.tokenDigest = ?", arguments: [tokenDigest])
                .map(Self.appliance)
        }
    }

    public func recordCheckIn(_ name: String, block: ApplianceBlock, at date: Date) async throws -> Appliance {
        try await database.write { db in
            try db.execute(
                sql: """
                    UPDATE appliance SET version = COALESCE(?, version), latitude = COALESCE(?, latitude),
                    longitude = COALESCE(?, longitude), dynamicImages = COALESCE(?, dynamicImages), lastSeen = ?
                    WHERE name = ?
                    """,
                arguments: [block.version, block.latitude, block.longitude, block.dynamicimages, date, name])
            guard db.changesCount == 1 else { throw PoolError.notFound(what: "appliance", name: name) }
            return try Self.appliance(db, named: name)
        }
    }

    // MARK: Users by token and name

    public func user(tokenDigest: String) async throws -> User? {
        try await database.read { db in
            try Row.fetchOne(db, sql: Self.userQuery + " WHERE user.tokenDigest = ?", arguments: [tokenDigest]).map(Self.user)
        }
    }

    public func signingKey() async throws -> Data {
        try await database.write { db in
            if let key = try Data.fetchOne(db, sql: "SELECT privateKey FROM signingKey WHERE id = 1") { return key }
            let key = Curve25519.Signing.PrivateKey().rawRepresentation
            try db.execute(sql: "INSERT INTO signingKey (id, privateKey, createdAt) VALUES (1, ?, ?)", arguments: [key, Date()])
            return key
        }
    }

    public func user(named name: String) async throws -> User {
        try await database.read { db in
            guard let row = try Row.fetchOne(db, sql: Self.userQuery + " WHERE user.name = ?", arguments: [name]) else {
                throw PoolError.notFound(what: "user", name: name)
            }
            return try Self.user(row)
        }
    }

    public func setUser(_ name: String, enabled: Bool) async throws -> User {
        try await updateUser(name, set: "enabled = ?", enabled)
    }

    public func setUserToken(_ name: String, tokenDigest: String) async throws -> User {
        try await updateUser(name, set: "tokenDigest = ?", tokenDigest)
    }

    /// Sets one column of the user named `name`; the user as changed.
    private func updateUser(_ name: String, set assignment: String, _ value: some DatabaseValueConvertible & Sendable) async throws -> User {
        try await database.write { db in
            try db.execute(sql: "UPDATE user SET \(assignment) WHERE name = ?", arguments: [value, name])
            guard db.changesCount == 1,
                let row = try Row.fetchOne(db, sql: Self.userQuery + " WHERE user.name = ?", arguments: [name])
            else { throw PoolError.notFound(what: "user", name: name) }
            return try Self.user(row)
        }
    }
}
