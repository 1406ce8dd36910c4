import Foundation
import Logging
import PostgresNIO
import Testing

@testable import PoolController

/// The stores the pool tests run on. By default SQLite; with
/// `CORRAL_TEST_STORE=postgres`, each store is a fresh database on the
/// PostgreSQL server at `CORRAL_TEST_POSTGRES_URL` (scripts/test runs the
/// pool tests both ways, and sets both up).
enum TestStores {
    static var onPostgres: Bool { ProcessInfo.processInfo.environment["CORRAL_TEST_STORE"] == "postgres" }

    /// The test server (its URL names the database to connect to when creating others).
    static func server() throws -> PostgresLocation {
        guard let url = ProcessInfo.processInfo.environment["CORRAL_TEST_POSTGRES_URL"] else {
            throw PoolError.unavailable(
                "CORRAL_TEST_POSTGRES_URL is not set: run the tests with scripts/test, which starts PostgreSQL and makes the test role")
        }
        return try PostgresLocation(url: url, field: "CORRAL_TEST_POSTGRES_URL")
    }

    /// The URL of a new, empty database on the test server.
    static func freshDatabase() async throws -> String {
        let server = try server()
        let name = "corral_test_" + UUID().uuidString.lowercased().replacingOccurrences(of: "-", with: "")
        let connection: PostgresConnection
        do {
            connection = try await PostgresConnection.connect(configuration: try server.connectionConfiguration(), id: 0, logger: quietLogger)
        } catch {
            throw PoolError.storage("cannot reach the test server \(server.redacted): \(PostgresStore.describe(error))")
        }
        do {
            for try await _ in try await connection.query("CREATE DATABASE \(unescaped: name)", logger: quietLogger) {}
        } catch {
            try? await connection.close()
            throw PoolError.storage("cannot create test database \(name): \(PostgresStore.describe(error))")
        }
        try await connection.close()
        return "postgres://\(server.user):\(server.password ?? "")@\(server.host):\(server.port)/\(name)"
    }

    /// A PostgreSQL store on a fresh database (or on `url`): one replica of
    /// a pool. Two connections each: the whole suite runs at once.
    static func postgres(_ url: String? = nil, connections: Int = 2) async throws -> PostgresStore {
        let database: String
        if let url { database = url } else { database = try await freshDatabase() }
        return try await PostgresStore.open(url: database, logger: quietLogger, maximumConnections: connections)
    }

    /// Makes the database look migrated by a newer corral (`newer`), or
    /// lacking this build's newest migration (`behind`).
    static func tamperWithMigrations(_ store: any PoolStore, newer: Bool) async throws {
        switch store {
        case let store as SQLiteStore:
            try await store.database.write {
                try $0.execute(
                    sql: newer
                        ? "INSERT INTO grdb_migrations (identifier) VALUES ('99-from-a-newer-corral')"
                        : "DELETE FROM grdb_migrations WHERE identifier IN ('99-from-a-newer-corral', '11-instance-indexes')")
            }
        case let store as PostgresStore:
            try await store.write { session in
                if newer {
                    try await session.execute("INSERT INTO corral_migration (identifier, appliedAt) VALUES ('99-from-a-newer-corral', now())")
                } else {
                    try await session.execute("DELETE FROM corral_migration WHERE identifier IN ('99-from-a-newer-corral', '1-pool')")
                }
            }
        default:
            Issue.record("no way to tamper with a \(type(of: store))")
        }
    }
}

/// A fresh store of the kind the run tests (see ``TestStores``), and where it is.
func makeStore() async throws -> (any PoolStore, path: String) {
    if TestStores.onPostgres {
        let url = try await TestStores.freshDatabase()
        return (try await TestStores.postgres(url), url)
    }
    let (store, path) = try makeSQLiteStore()
    return (store, path)
}
