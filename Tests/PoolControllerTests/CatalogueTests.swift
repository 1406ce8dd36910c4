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
            // What the fuzzer found: a null where null means nothing was read as left out.
            let null = try await client.v1(.put, path, token: pool.token("root"), body: #"{"enabled": false, "max-instances": null}"#)
            #expect(try v1Refusal(null) == (.badRequest, "field 'max-instances' must not be null; leave it out instead"))
            #expect(try await pool.store.user(named: "bob").enabled)
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

    @Test("superusers change and remove templates and wisps through the API: warm instances of the old kind are retired, bad values are 400s that change nothing")
    func templatesAndWispsThroughTheAPI() async throws {
        let pool = try await TestPool.make()
        try await pool.store.addTemplate(Template(name: "web", wisp: "bob-web", flavor: "small", hotStarts: 1))
        _ = try await pool.checkInRoomy("rack-1", at: Date())
        let staleAfter = pool.configuration.housekeeping.applianceStaleSeconds
        let warm = try await pool.store.maintainWarmPools(maxAgeSeconds: 14_400, applianceStaleAfter: staleAfter, at: Date()).started
        #expect(warm.count == 1)
        @Sendable func deleting() async throws -> [String] {
            try await pool.store.pendingActions(appliance: "rack-1").filter { $0.kind == .delete }.map(\.instance)
        }
        try await pool.app.test(.router) { client in
            let root = pool.token("root")
            // Everyone sees the templates.
            let listed = try await client.v1(.get, "/v1/server-template", token: pool.token("bob"))
            let templates = try JSONDecoder().decode(ServerEnvelope<[ServerTemplate]>.self, from: Data(listed.body.readableBytesView))
            #expect(templates.data == [ServerTemplate(name: "web", wisp: "bob-web", serverFlavor: "small", hotStarts: 1)])
            // Bad values are refused by name, and the wisp is as it was.
            let before = try await pool.store.wisps()
            for (body, message) in [
                (#"{"ssh-keys": ["ssh-ed25519 AAAA"]}"#, "field 'ssh-keys[0]': the text "),
                (#"{"post-create": "echo no interpreter"}"#, "field 'post-create': "),
                (#"{"server-image": "gentoo"}"#, "server-image: there is no active image 'gentoo'"),
                (#"{"server-image": "debian", "dynamic-image-url": "http://images.test/x.qcow2"}"#, "field 'dynamic-image-url': give server-image"),
                (#"{"callback-url": "file:///etc/shadow"}"#, "field 'callback-url' must be an http or https URL"),
                (#"{"ssh-keys": "one"}"#, "field 'ssh-keys' must be a list"),
                (#"{"colour": "red"}"#, "unknown field 'colour'; allowed: 'server-image', 'dynamic-image-url', 'ssh-keys', 'post-create', 'callback-url'"),
                (#"{}"#, "give at least one of"),
            ] {
                let response = try await client.v1(.put, "/v1/wisp/bob-web", token: root, body: body)
                let (status, text) = try v1Refusal(response)
                #expect(status == .badRequest && text.hasPrefix(message), "PUT \(body): \(text)")
            }
            #expect(try await pool.store.wisps() == before)
            #expect(try await deleting().isEmpty)
            // A new script and key: the warm instance built from the old wisp is retired.
            let key = testPublicKey(4)
            let changed = try await client.v1(
                .put, "/v1/wisp/bob-web", token: root, body: ##"{"post-create": "#!/bin/sh\ntouch /done\n", "ssh-keys": ["\##(key)"]}"##)
            #expect(changed.status == .ok)
            let wisp = try #require(try await pool.store.wisps().first { $0.name == "bob-web" })
            #expect(wisp.postCreate == "#!/bin/sh\ntouch /done\n")
            #expect(wisp.sshKeys == [try SSHPublicKey(key).line])
            #expect(try await deleting() == warm.map(\.name))
            // Only superusers.
            let refused = try await client.v1(.put, "/v1/server-template/web", token: pool.token("bob"), body: #"{"hot-starts": 0}"#)
            #expect(try v1Refusal(refused) == (.forbidden, "only a superuser may change templates"))
            let unknownFlavor = try await client.v1(.put, "/v1/server-template/web", token: root, body: #"{"server-flavor": "huge"}"#)
            #expect(try v1Refusal(unknownFlavor) == (.badRequest, "server-flavor: there is no flavor 'huge' (or it is inactive)"))
            let tooMany = try await client.v1(.put, "/v1/server-template/web", token: root, body: #"{"hot-starts": 101}"#)
            #expect(try v1Refusal(tooMany) == (.badRequest, "field 'hot-starts' must be a whole number from 0 to 100"))
            let none = try await client.v1(.put, "/v1/server-template/web", token: root, body: #"{"hot-starts": 0}"#)
            #expect(none.status == .ok)
            #expect(try await pool.store.templates().first?.hotStarts == 0)
            // A wisp in use stays; the template goes, then the wisp can.
            let inUse = try await client.v1(.delete, "/v1/wisp/bob-web", token: root)
            #expect(try v1Refusal(inUse).0 == .conflict)
            #expect(try await client.v1(.delete, "/v1/server-template/web", token: root).status == .ok)
            #expect(try await pool.store.templates().isEmpty)
        }
    }
}
