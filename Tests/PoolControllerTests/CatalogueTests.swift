import Foundation
import HTTPTypes
import HummingbirdTesting
import PoolAPI
import Testing

@testable import PoolController

@Suite("Catalogue changes: deactivation, user limits, template and wisp edits")
struct CatalogueTests {
    @Test("a deactivated flavor or image takes no new instances and is not listed; the running instance keeps it; superusers only")
    func deactivation() async throws {
        let pool = try await TestPool.make()
        try await pool.app.test(.router) { client in
            _ = try await client.checkIn(pool, "rack-1")
            _ = try await client.checkIn(pool, "rack-2")
            let running = try serverInstance(try await client.createSmall(token: pool.token("bob")))
            for (path, list, name) in [
                ("/v1/server-flavor/small", "/v1/server-flavor", "small"), ("/v1/server-image/debian", "/v1/server-image", "debian"),
            ] {
                #expect(try await client.v1(.put, path, token: pool.token("bob"), body: #"{"active": false}"#).status == .forbidden)
                let changed = try await client.v1(.put, path, token: pool.token("root"), body: #"{"active": false}"#)
                #expect(changed.status == .ok)
                let entry = try JSONDecoder().decode(ServerEnvelope<[CatalogueEntry]>.self, from: Data(changed.body.readableBytesView))
                #expect(entry.data == [CatalogueEntry(name: name, active: false)])
                let listed = try await client.v1(.get, list, token: pool.token("bob"))
                #expect(!String(buffer: listed.body).contains(#""id":"\#(name)""#), "\(String(buffer: listed.body))")
                let refused = try await client.createSmall(token: pool.token("bob"))
                #expect(refused.status == .badRequest)
                #expect(try v1Refusal(refused).1.contains("there is no \(list.hasSuffix("flavor") ? "flavor" : "image") '\(name)'"))
                // The running instance keeps it.
                let kept = try serverInstance(try await client.v1(.get, "/v1/server-instance/\(running.id)", token: pool.token("bob")))
                #expect(kept.serverFlavor == running.serverFlavor && kept.serverImage == running.serverImage && kept.status == running.status)
                #expect(try await client.v1(.put, path, token: pool.token("root"), body: #"{"active": true}"#).status == .ok)
                #expect(try await client.createSmall(token: pool.token("bob")).status == .created)
            }
        }
    }

    @Test("a superuser changes a user's limit and lease; instances held beyond a lowered limit keep running")
    func userLimits() async throws {
        let pool = try await TestPool.make()
        try await pool.app.test(.router) { client in
            _ = try await client.checkIn(pool, "rack-1")
            _ = try await client.checkIn(pool, "rack-2")
            let first = try serverInstance(try await client.createSmall(token: pool.token("bob")))
            let path = "/v1/user/bob"
            #expect(try await client.v1(.put, path, token: pool.token("bob"), body: #"{"max-instances": 50}"#).status == .forbidden)
            #expect(try await client.v1(.put, path, token: pool.token("root"), body: #"{"max-instances": -1}"#).status == .badRequest)
            #expect(try await client.v1(.put, path, token: pool.token("root"), body: #"{"max-instances": 1}"#).status == .ok)
            #expect(try await client.createSmall(token: pool.token("bob")).status == .conflict)
            #expect(try await pool.store.instance(id: first.id)?.state == .leased, "kept")
            let changed = try await client.v1(
                .put, path, token: pool.token("root"), body: #"{"max-instances": 3, "lease-seconds": 3600}"#)
            #expect(String(buffer: changed.body).contains(#""lease-seconds":3600"#), "\(String(buffer: changed.body))")
            let before = Date()
            let second = try serverInstance(try await client.createSmall(token: pool.token("bob")))
            let expires = try #require(try await pool.store.instance(id: second.id)?.expires)
            #expect(abs(expires.timeIntervalSince(before) - 3600) < 5)
            // Back to the pool's default (7 days).
            #expect(try await client.v1(.put, path, token: pool.token("root"), body: #"{"lease-seconds": null}"#).status == .ok)
            #expect(try await pool.store.user(named: "bob").leaseSeconds == nil)
        }
    }

    @Test("a template's warm pool shrinks and is rebuilt when it changes; removing it retires its warm instances; a wisp in use is not removed")
    func templateEdits() async throws {
        let pool = try await TestPool.make()
        try await pool.store.addTemplate(Template(name: "web", wisp: "bob-web", flavor: "small", hotStarts: 2))
        for appliance in ["rack-1", "rack-2"] { _ = try await pool.checkInRoomy(appliance, at: Date()) }
        let staleAfter = pool.configuration.housekeeping.applianceStaleSeconds
        let warm = try await pool.store.maintainWarmPools(maxAgeSeconds: 14_400, applianceStaleAfter: staleAfter, at: Date()).started
        #expect(warm.count == 2)
        func deleting() async throws -> Set<String> {
            var names: Set<String> = []
            for appliance in ["rack-1", "rack-2"] {
                names.formUnion(try await pool.store.pendingActions(appliance: appliance).filter { $0.kind == .delete }.map(\.instance))
            }
            return names
        }
        // One fewer: one of the two goes.
        let smaller = try await pool.store.setTemplate("web", wisp: nil, flavor: nil, hotStarts: 1, at: Date())
        #expect(smaller.hotStarts == 1)
        #expect(try await deleting().count == 1)
        // Another flavor: the one left was built for the old one, so it goes too, and the pass builds the new kind.
        try await pool.store.addFlavor(Flavor(name: "medium", vcpus: 2, memory: 1024, disk: 10))
        _ = try await pool.store.setTemplate("web", wisp: nil, flavor: "medium", hotStarts: nil, at: Date())
        #expect(try await deleting() == Set(warm.map(\.name)))
        let rebuilt = try await pool.store.maintainWarmPools(maxAgeSeconds: 14_400, applianceStaleAfter: staleAfter, at: Date()).started
        #expect(rebuilt.count == 1 && rebuilt.allSatisfy { $0.flavor?.name == "medium" })
        await #expect(throws: PoolError.self) { try await pool.store.setTemplate("web", wisp: "nope", flavor: nil, hotStarts: nil, at: Date()) }

        await #expect(throws: PoolError.conflict("wisp 'bob-web' is the wisp of template 'web'; change or remove those first")) {
            try await pool.store.removeWisp("bob-web")
        }
        let retired = try await pool.store.removeTemplate("web", at: Date())
        #expect(retired == rebuilt.map(\.name))
        #expect(try await pool.store.templates().isEmpty)
        // Its warm instances still boot from the wisp until they are gone.
        await #expect(throws: PoolError.self) { try await pool.store.removeWisp("bob-web") }
        for instance in warm + rebuilt {
            _ = try await pool.store.recordReport(
                InstanceReport(name: instance.name, state: .decommissioned), appliance: instance.appliance, consoleLimit: 10,
                maxInstances: 1000, at: Date())
        }
        try await pool.store.removeWisp("bob-web")
        #expect(try await pool.store.wisps().contains { $0.name == "bob-web" } == false)
    }
}
