import Foundation
import Hummingbird
import HummingbirdTesting
import Testing

@testable import PoolController

@Suite("Health probes")
struct HealthTests {
    struct Health: Decodable, Equatable {
        var status: String
        var reason: String?
    }

    @Test("/healthz answers while the process serves; /readyz is 503 with the reason once the database is not the one this build knows")
    func probes() async throws {
        let pool = try await TestPool.make()
        try await pool.app.test(.router) { client in
            func probe(_ path: String) async throws -> (Int, Health) {
                try await client.execute(uri: path, method: .get) { response in
                    #expect(response.headers[.contentType] == "application/json; charset=utf-8")
                    return (Int(response.status.code), try JSONDecoder().decode(Health.self, from: Data(response.body.readableBytesView)))
                }
            }
            #expect(try await probe("/healthz") == (200, Health(status: "ok")))
            #expect(try await probe("/readyz") == (200, Health(status: "ready")))
            // A newer corral migrated the database: this build must not serve it.
            try await TestStores.tamperWithMigrations(pool.store, newer: true)
            let (status, health) = try await probe("/readyz")
            #expect(status == 503)
            #expect(health.status == "not ready")
            #expect(health.reason?.contains("a newer corral migrated it") == true, "\(health)")
            #expect(try await probe("/healthz") == (200, Health(status: "ok")))
            // And one whose migrations are not all applied.
            try await TestStores.tamperWithMigrations(pool.store, newer: false)
            let (behind, why) = try await probe("/readyz")
            #expect(behind == 503)
            #expect(why.reason?.contains("not all applied") == true, "\(why)")
        }
    }
}
