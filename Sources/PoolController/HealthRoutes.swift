import Foundation
import GRDB
import Hummingbird
import PoolAPI

/// What load balancers and supervisors ask: whether the process serves
/// (`/healthz`) and whether it can do its work (`/readyz`: its database
/// answers and holds exactly the migrations this build knows).
struct HealthRoutes: Sendable {
    let store: any PoolStore

    /// The body of both replies.
    struct Health: Encodable {
        var status: String
        var reason: String?
    }

    func register(in router: Router<BasicRequestContext>) {
        router.get("healthz") { _, _ in try reply(.ok, Health(status: "ok")) }
        router.get("readyz") { _, _ in
            if let problem = await store.readinessProblem() {
                return try reply(.serviceUnavailable, Health(status: "not ready", reason: problem))
            }
            return try reply(.ok, Health(status: "ready"))
        }
    }

    /// Paths probed every few seconds: logged at debug, not at info.
    static let probePaths: Set<String> = ["/healthz", "/readyz", "/metrics"]
}

extension SQLiteStore {
    public func instanceCountsByState() async throws -> [InstanceState: Int] {
        try await database.read { db in
            var counts: [InstanceState: Int] = [:]
            for row in try Row.fetchAll(db, sql: "SELECT state, COUNT(*) AS count FROM instance GROUP BY state") {
                guard let state = InstanceState(rawValue: try row.decode(forColumn: "state")) else { continue }
                counts[state] = try row.decode(forColumn: "count")
            }
            return counts
        }
    }

    /// Why the pool cannot do its work, or nil: the database cannot be
    /// read, or its migrations are not the ones this build knows.
    public func readinessProblem() async -> String? {
        do {
            return try await database.read { db in
                let migrator = Self.migrator
                if try migrator.hasBeenSuperseded(db) {
                    return "the database has migrations this build of corral does not know (a newer corral migrated it); run the newer corral"
                }
                if try !migrator.hasCompletedMigrations(db) {
                    return "the database's migrations are not all applied; restart the pool to apply them"
                }
                return nil
            }
        } catch {
            return "the database cannot be read: \(error)"
        }
    }
}

extension SQLiteStore {
    public func appliedMigrations() async throws -> [String] {
        try await database.read { db in try Self.migrator.appliedIdentifiers(db).sorted() }
    }
}
