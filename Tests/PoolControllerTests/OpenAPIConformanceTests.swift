import AsyncHTTPClient
import Foundation
import HTTPTypes
import Hummingbird
import HummingbirdTesting
import NIOCore
import PoolAPI
import Testing
import Yams

@testable import PoolController

@Suite("OpenAPI description")
struct OpenAPIConformanceTests {
    /// One request of the walk: what to send, and the documented path and
    /// status its reply must match.
    struct Call: Sendable {
        var template: String
        var uri: String
        var method: HTTPRequest.Method = .post
        var headers: HTTPFields = [:]
        var body: String?
        var status: Int
    }

    @Test("every documented reply is produced by a real request, and every reply matches its schema")
    func conformance() async throws {
        // No system default: bob (no default wisp) gets 503 for his instances.
        // Room for 6 instance records on rack-1 (for the 429s), one event stream per token.
        let pool = try await TestPool.make(systemDefault: false) {
            $0.limits.maxInstancesPerAppliance = 6
            $0.limits.maxEventStreamsPerToken = 1
        }
        // An instance asked for through the user-facing API: rack-1's start
        // action carries its timeline.
        _ = try await pool.checkInRoomy("rack-1", at: Date())
        let rootInstance = try await pool.store.createInstance(
            InstanceRequest(owner: "root", flavor: "small", image: "debian"), defaultLeaseSeconds: 3600, applianceStaleAfter: 300, at: Date())
        try await pool.store.addTemplate(Template(name: "web", wisp: "bob-web", flavor: "small"))
        try await pool.store.addTemplate(Template(name: "big", wisp: "bob-web", flavor: "big"))
        try await pool.store.addTemplate(Template(name: "spare", wisp: "bob-web", flavor: "small"))
        try await pool.store.addWisp(Wisp(name: "unused", owner: "root", image: "debian"))
        _ = try await pool.store.addUser(name: "dora", superuser: false, maxInstances: 1, tokenDigest: Token.digest(Token.generate()))
        // root's creates install root's key (without one they are a 400).
        _ = try await pool.store.addSSHKey(owner: "root", name: "laptop", key: try SSHPublicKey(testPublicKey(1)), maxKeys: 10, at: Date())
        // Shared with alice: she sees it, but may not delete it.
        _ = try await pool.store.changeUsers(ofInstance: rootInstance.id, .add, users: ["alice"], at: Date())
        let served = openAPIDocument(publicURL: "https://pool.example.org")
        let spec = try OpenAPISpec(yaml: served)
        #expect((spec.root["servers"] as? [[String: Any]])?.first?["url"] as? String == "https://pool.example.org")

        let rack1 = pool.token("rack-1")
        let rack2 = pool.token("rack-2")
        func block(_ token: String) -> String { #"{"apitoken": "\#(token)", "version": "1.0"}"# }
        let stats = #"{"vcpus": {"total": 8, "free": 4}, "memory_mib": {"total": 16384, "free": 8192}, "disk_gib": {"total": 100, "free": 50}, "running": 1}"#
        func checkIn(_ token: String, _ instances: String = "[]", hold: Int = 0) -> String {
            #"{"appliance": \#(block(token)), "stats": \#(stats), "instances": \#(instances), "hold_seconds": \#(hold)}"#
        }
        func report(_ token: String, _ name: String, state: Int = 3) -> String {
            #"{"appliance": \#(block(token)), "instance": {"name": "\#(name)", "state": \#(state), "flavor": {"vcpus": 1, "memory": 512, "disk": 5}, "ip_addresses": [{"version": 4, "scope": "private", "address": "10.0.0.5"}], "console_output": ["boot"]}}"#
        }
        let huge = String(repeating: "x", count: (1 << 20) + 1)
        let alice = pool.userHeaders("alice")
        let bids = "/api/v1/bids/"
        let instance = "/api/v1/instances/{name}/"
        var calls: [Call] = [
            Call(template: "/api/v1/authorization/", uri: "/api/v1/authorization/", body: #"{"appliance": \#(block(rack1))}"#, status: 200),
            Call(template: "/api/v1/authorization/", uri: "/api/v1/authorization/", body: #"{"appliance": {}}"#, status: 401),
            Call(template: "/api/v1/authorization/", uri: "/api/v1/authorization/", body: huge, status: 413),
            Call(template: "/api/v1/flavors/", uri: "/api/v1/flavors/", method: .get, status: 200),
            Call(template: "/api/v1/broker/", uri: "/api/v1/broker/", body: checkIn(rack1, #"[{"name": "offer-1", "state": 1}]"#), status: 200),
            Call(template: "/api/v1/broker/", uri: "/api/v1/broker/", body: checkIn(rack2), status: 200),
            Call(template: "/api/v1/broker/", uri: "/api/v1/broker/", body: checkIn(rack1, hold: 1), status: 200),
            Call(template: "/api/v1/broker/", uri: "/api/v1/broker/", body: checkIn(rack1, hold: 999), status: 400),
            Call(template: "/api/v1/broker/", uri: "/api/v1/broker/", body: #"{"appliance": \#(block(rack1))}"#, status: 400),
            Call(template: "/api/v1/broker/", uri: "/api/v1/broker/", body: checkIn("nope"), status: 401),
            Call(template: "/api/v1/broker/", uri: "/api/v1/broker/", body: huge, status: 413),
            Call(template: bids, uri: bids, headers: alice, body: #"{"appliance": "rack-1", "flavor": "small", "lease_seconds": 60}"#, status: 201),
            Call(template: bids, uri: bids, headers: alice, body: #"{"instance": "offer-1", "callback_url": "http://127.0.0.1:9/start"}"#, status: 201),
            Call(template: bids, uri: bids, headers: alice, body: #"{"instance": "offer-1"}"#, status: 409),
            Call(template: bids, uri: bids, headers: alice, body: #"{"flavor": "small"}"#, status: 400),
            Call(template: bids, uri: bids, headers: alice, body: #"{"appliance": "rack-1", "flavor": "huge"}"#, status: 404),
            Call(template: bids, uri: bids, body: "{}", status: 401),
            Call(template: bids, uri: bids, headers: alice, body: huge, status: 413),
            Call(template: bids, uri: bids, method: .get, headers: alice, status: 200),
            Call(template: bids, uri: bids, method: .get, status: 401),
            Call(template: instance, uri: "/api/v1/instances/web-1/", body: report(rack1, "web-1"), status: 200),
            Call(template: instance, uri: "/api/v1/instances/web-2/", body: report(rack1, "web-1"), status: 400),
            Call(template: instance, uri: "/api/v1/instances/web-1/", body: report("nope", "web-1"), status: 401),
            Call(template: instance, uri: "/api/v1/instances/web-1/", body: report(rack2, "web-1"), status: 403),
            Call(template: instance, uri: "/api/v1/instances/b-1/", body: report(rack2, "b-1"), status: 503),
            Call(template: instance, uri: "/api/v1/instances/offer-1/", body: report(rack1, "offer-1"), status: 502),
            Call(template: instance, uri: "/api/v1/instances/web-1/", body: huge, status: 413),
            Call(template: "/openapi.yaml", uri: "/openapi.yaml", method: .get, status: 200),
            Call(template: "/api/v1/events", uri: "/api/v1/events", method: .get, status: 401),
            Call(
                template: "/api/v1/authorization/", uri: "/api/v1/authorization/",
                body: #"{"appliance": {"apitoken": "\#(rack1)", "latitude": 1000}}"#, status: 400),
            Call(template: "/api/v1/signing-key/", uri: "/api/v1/signing-key/", method: .get, status: 200),
        ]
        // The user-facing API.
        func user(_ name: String) -> HTTPFields { pool.userHeaders(name) }
        let bearerRoot: HTTPFields = [.authorization: "Bearer \(pool.token("root"))"]
        let si = "/v1/server-instance"
        let one = "/v1/server-instance/{id}"
        let rootID = rootInstance.id
        let small = #"{"server-image": "debian", "server-flavor": "small"}"#
        calls += [
            Call(template: si, uri: si, headers: user("root"), body: small, status: 201),
            Call(template: si, uri: si, headers: user("root"), body: #"{"server-image": "nope", "server-flavor": "small"}"#, status: 400),
            Call(template: si, uri: si, body: small, status: 401),
            Call(template: si, uri: si, headers: user("bob"), body: #"{"server-image": "debian", "server-flavor": "small", "users": ["alice"]}"#, status: 403),
            Call(template: si, uri: si, headers: user("alice"), body: small, status: 409),
            Call(template: si, uri: si, headers: user("root"), body: huge, status: 413),
            Call(template: si, uri: si, headers: user("root"), body: #"{"server-image": "debian", "server-flavor": "big"}"#, status: 503),
            Call(template: si, uri: si, method: .get, headers: bearerRoot, status: 200),
            Call(template: si, uri: si + "?limit=0", method: .get, headers: user("root"), status: 400),
            Call(template: si, uri: si, method: .get, headers: [HTTPField.Name("X-Auth-Token")!: "nope"], status: 401),
            Call(template: one, uri: "\(si)/\(rootID)", method: .get, headers: user("root"), status: 200),
            Call(
                template: one, uri: "\(si)/\(rootID)", method: .get,
                headers: user("root") + [HTTPField(name: HTTPField.Name("X-Auth-Cloudauth-Id")!, value: "someone-else")], status: 401),
            Call(template: one, uri: "\(si)/\(rootID)", method: .get, headers: user("bob"), status: 404),
            Call(template: one + "/timeline", uri: "\(si)/\(rootID)/timeline", method: .get, headers: user("root"), status: 200),
            Call(template: one + "/timeline", uri: "\(si)/\(rootID)/timeline", method: .get, status: 401),
            Call(template: one + "/timeline", uri: "\(si)/nope/timeline", method: .get, headers: user("root"), status: 404),
            Call(template: one + "/console", uri: "\(si)/web-1/console?lines=5", method: .get, headers: user("alice"), status: 200),
            Call(template: one + "/console", uri: "\(si)/web-1/console?lines=0", method: .get, headers: user("alice"), status: 400),
            Call(template: one + "/console", uri: "\(si)/web-1/console", method: .get, status: 401),
            Call(template: one + "/console", uri: "\(si)/web-1/console", method: .get, headers: user("bob"), status: 404),
            Call(template: one, uri: "\(si)/\(rootID)", method: .put, headers: user("root"), body: #"{"task": {"what": "reboot"}}"#, status: 200),
            Call(template: one, uri: "\(si)/\(rootID)", method: .put, headers: user("root"), body: #"{"task": {"what": "dance"}}"#, status: 400),
            Call(template: one, uri: "\(si)/\(rootID)", method: .put, body: #"{"task": {"what": "reboot"}}"#, status: 401),
            Call(
                template: one, uri: "\(si)/web-1", method: .put, headers: user("alice"),
                body: #"{"task": {"what": "extend-lease", "seconds": 60}}"#, status: 403),
            Call(template: one, uri: "\(si)/nope", method: .put, headers: user("root"), body: #"{"task": {"what": "reboot"}}"#, status: 404),
            Call(template: one, uri: "\(si)/\(rootID)", method: .put, headers: user("root"), body: huge, status: 413),
            Call(template: instance, uri: "/api/v1/instances/gone-1/", body: report(rack1, "gone-1", state: 7), status: 200),
            Call(template: one, uri: "\(si)/gone-1", method: .put, headers: user("root"), body: #"{"task": {"what": "reboot"}}"#, status: 409),
            Call(template: one, uri: "\(si)/gone-1", method: .delete, headers: user("root"), status: 409),
            Call(template: one, uri: "\(si)/\(rootID)", method: .delete, headers: user("alice"), status: 403),
            Call(template: one, uri: "\(si)/\(rootID)", method: .delete, headers: user("root"), status: 200),
            Call(template: one, uri: "\(si)/\(rootID)", method: .delete, status: 401),
            Call(template: one, uri: "\(si)/nope", method: .delete, headers: user("root"), status: 404),
            Call(template: "/v1/server-flavor", uri: "/v1/server-flavor", method: .get, headers: user("bob"), status: 200),
            Call(template: "/v1/server-flavor", uri: "/v1/server-flavor", method: .get, status: 401),
            Call(template: "/v1/server-image", uri: "/v1/server-image", method: .get, headers: user("bob"), status: 200),
            Call(template: "/v1/server-image", uri: "/v1/server-image", method: .get, status: 401),
            // (They stay active: the calls after these still create instances of them.)
            Call(template: "/v1/server-flavor/{id}", uri: "/v1/server-flavor/small", method: .put, headers: user("root"), body: #"{"active": true}"#, status: 200),
            Call(template: "/v1/server-flavor/{id}", uri: "/v1/server-flavor/small", method: .put, headers: user("root"), body: #"{"active": 1}"#, status: 400),
            Call(template: "/v1/server-flavor/{id}", uri: "/v1/server-flavor/small", method: .put, body: #"{"active": true}"#, status: 401),
            Call(template: "/v1/server-flavor/{id}", uri: "/v1/server-flavor/small", method: .put, headers: user("bob"), body: #"{"active": false}"#, status: 403),
            Call(template: "/v1/server-flavor/{id}", uri: "/v1/server-flavor/nope", method: .put, headers: user("root"), body: #"{"active": true}"#, status: 404),
            Call(template: "/v1/server-flavor/{id}", uri: "/v1/server-flavor/small", method: .put, headers: user("root"), body: huge, status: 413),
            Call(template: "/v1/server-image/{id}", uri: "/v1/server-image/debian", method: .put, headers: user("root"), body: #"{"active": true}"#, status: 200),
            Call(template: "/v1/server-image/{id}", uri: "/v1/server-image/debian", method: .put, headers: user("root"), body: #"{}"#, status: 400),
            Call(template: "/v1/server-image/{id}", uri: "/v1/server-image/debian", method: .put, body: #"{"active": true}"#, status: 401),
            Call(template: "/v1/server-image/{id}", uri: "/v1/server-image/debian", method: .put, headers: user("bob"), body: #"{"active": false}"#, status: 403),
            Call(template: "/v1/server-image/{id}", uri: "/v1/server-image/nope", method: .put, headers: user("root"), body: #"{"active": true}"#, status: 404),
            Call(template: "/v1/server-image/{id}", uri: "/v1/server-image/debian", method: .put, headers: user("root"), body: huge, status: 413),
        ]
        // SSH keys.
        let keys = "/v1/ssh-key"
        let key = "/v1/ssh-key/{id}"
        func keyBody(_ name: String, _ text: String) -> String { #"{"name": "\#(name)", "public-key": "\#(text)"}"# }
        calls += [
            Call(template: keys, uri: keys, method: .get, headers: user("root"), status: 200),
            Call(template: keys, uri: keys, method: .get, status: 401),
            Call(template: keys, uri: keys, headers: user("root"), body: keyBody("desk", testPublicKey(2)), status: 201),
            Call(template: keys, uri: keys, headers: user("root"), body: keyBody("bad", "ssh-ed25519 nope"), status: 400),
            Call(template: keys, uri: keys, body: keyBody("desk", testPublicKey(3)), status: 401),
            Call(template: keys, uri: keys, headers: user("root"), body: keyBody("laptop", testPublicKey(3)), status: 409),
            Call(template: keys, uri: keys, headers: user("root"), body: huge, status: 413),
            Call(template: key, uri: keys + "/desk", method: .delete, headers: user("root"), status: 200),
            Call(template: key, uri: keys + "/desk", method: .delete, status: 401),
            Call(template: key, uri: keys + "/desk", method: .delete, headers: user("root"), status: 404),
        ]
        // Users' records and tokens.
        let person = "/v1/user/{name}"
        calls += [
            Call(template: person, uri: "/v1/user/alice", method: .get, headers: user("root"), status: 200),
            Call(template: person, uri: "/v1/user/alice", method: .get, status: 401),
            Call(template: person, uri: "/v1/user/alice", method: .get, headers: user("bob"), status: 404),
            Call(template: person, uri: "/v1/user/bob", method: .put, headers: user("root"), body: #"{"enabled": true}"#, status: 200),
            Call(template: person, uri: "/v1/user/bob", method: .put, headers: user("root"), body: #"{"enabled": 1}"#, status: 400),
            Call(
                template: person, uri: "/v1/user/bob", method: .put, headers: user("root"),
                body: #"{"max-instances": 5, "lease-seconds": null}"#, status: 200),
            Call(template: person, uri: "/v1/user/bob", method: .put, headers: user("root"), body: #"{"lease-seconds": 5}"#, status: 400),
            Call(template: person, uri: "/v1/user/bob", method: .put, headers: user("root"), body: #"{}"#, status: 400),
            Call(template: person, uri: "/v1/user/bob", method: .put, body: #"{"enabled": true}"#, status: 401),
            Call(template: person, uri: "/v1/user/bob", method: .put, headers: user("bob"), body: #"{"enabled": false}"#, status: 403),
            Call(template: person, uri: "/v1/user/nobody", method: .put, headers: user("root"), body: #"{"enabled": true}"#, status: 404),
            Call(template: person, uri: "/v1/user/root", method: .put, headers: user("root"), body: #"{"enabled": false}"#, status: 409),
            Call(template: person, uri: "/v1/user/bob", method: .put, headers: user("root"), body: huge, status: 413),
            Call(template: person + "/token", uri: "/v1/user/dora/token", headers: user("root"), status: 200),
            Call(template: person + "/token", uri: "/v1/user/dora/token", status: 401),
            Call(template: person + "/token", uri: "/v1/user/alice/token", headers: user("bob"), status: 404),
        ]
        // Templates for everyone; templates and wisps changed by superusers.
        let templates = "/v1/server-template"
        let template = "/v1/server-template/{id}"
        let wisps = "/v1/wisp"
        let wisp = "/v1/wisp/{id}"
        calls += [
            Call(template: templates, uri: templates, method: .get, headers: user("bob"), status: 200),
            Call(template: templates, uri: templates, method: .get, status: 401),
            Call(
                template: template, uri: "/v1/server-template/spare", method: .put, headers: user("root"),
                body: #"{"hot-starts": 0, "server-flavor": "small"}"#, status: 200),
            Call(template: template, uri: "/v1/server-template/spare", method: .put, headers: user("root"), body: #"{"wisp": "ghost"}"#, status: 400),
            Call(template: template, uri: "/v1/server-template/spare", method: .put, body: #"{"hot-starts": 1}"#, status: 401),
            Call(template: template, uri: "/v1/server-template/spare", method: .put, headers: user("bob"), body: #"{"hot-starts": 1}"#, status: 403),
            Call(template: template, uri: "/v1/server-template/nope", method: .put, headers: user("root"), body: #"{"hot-starts": 1}"#, status: 404),
            Call(template: template, uri: "/v1/server-template/spare", method: .put, headers: user("root"), body: huge, status: 413),
            Call(template: template, uri: "/v1/server-template/spare", method: .delete, headers: user("root"), status: 200),
            Call(template: template, uri: "/v1/server-template/web", method: .delete, status: 401),
            Call(template: template, uri: "/v1/server-template/web", method: .delete, headers: user("bob"), status: 403),
            Call(template: template, uri: "/v1/server-template/spare", method: .delete, headers: user("root"), status: 404),
            Call(template: wisps, uri: wisps, method: .get, headers: user("root"), status: 200),
            Call(template: wisps, uri: wisps, method: .get, status: 401),
            Call(template: wisps, uri: wisps, method: .get, headers: user("bob"), status: 403),
            Call(
                template: wisp, uri: "/v1/wisp/unused", method: .put, headers: user("root"),
                body: ##"{"post-create": "#!/bin/sh\necho hello\n", "callback-url": null}"##, status: 200),
            Call(template: wisp, uri: "/v1/wisp/unused", method: .put, headers: user("root"), body: #"{"dynamic-image-url": "ftp://x/y"}"#, status: 400),
            Call(template: wisp, uri: "/v1/wisp/unused", method: .put, body: #"{"post-create": ""}"#, status: 401),
            Call(template: wisp, uri: "/v1/wisp/unused", method: .put, headers: user("bob"), body: #"{"post-create": ""}"#, status: 403),
            Call(template: wisp, uri: "/v1/wisp/nope", method: .put, headers: user("root"), body: #"{"post-create": ""}"#, status: 404),
            Call(template: wisp, uri: "/v1/wisp/unused", method: .put, headers: user("root"), body: huge, status: 413),
            Call(template: wisp, uri: "/v1/wisp/bob-web", method: .delete, headers: user("root"), status: 409),
            Call(template: wisp, uri: "/v1/wisp/unused", method: .delete, status: 401),
            Call(template: wisp, uri: "/v1/wisp/unused", method: .delete, headers: user("bob"), status: 403),
            Call(template: wisp, uri: "/v1/wisp/unused", method: .delete, headers: user("root"), status: 200),
            Call(template: wisp, uri: "/v1/wisp/unused", method: .delete, headers: user("root"), status: 404),
        ]
        // rack-1's instance records reach the cap of 6: new names are 429s.
        calls += [
            Call(template: "/api/v1/broker/", uri: "/api/v1/broker/", body: checkIn(rack1, #"[{"name": "new-1", "state": 1}]"#), status: 200),
            Call(template: "/api/v1/broker/", uri: "/api/v1/broker/", body: checkIn(rack1, #"[{"name": "new-3", "state": 1}]"#), status: 429),
            Call(template: instance, uri: "/api/v1/instances/new-4/", body: report(rack1, "new-4"), status: 429),
        ]
        // The token launch API.
        let launch = "/api/stream/{template}"
        calls += [
            Call(template: launch, uri: "/api/stream/web?token=\(pool.token("root"))", status: 201),
            Call(template: launch, uri: "/api/stream/web?preemptible=maybe", headers: user("root"), status: 400),
            Call(template: launch, uri: "/api/stream/web", status: 402),
            Call(template: launch, uri: "/api/stream/web?preemptible=0", headers: user("bob"), status: 403),
            Call(template: launch, uri: "/api/stream/nope", headers: user("root"), status: 404),
            Call(template: launch, uri: "/api/stream/web", headers: user("alice"), status: 409),
            Call(template: launch, uri: "/api/stream/big", headers: user("root"), status: 503),
        ]
        calls += [
            Call(template: "/healthz", uri: "/healthz", method: .get, status: 200),
            Call(template: "/metrics", uri: "/metrics", method: .get, headers: pool.userHeaders("root"), status: 200),
            Call(template: "/metrics", uri: "/metrics", method: .get, status: 401),
            Call(template: "/metrics", uri: "/metrics", method: .get, headers: alice, status: 403),
            Call(template: "/readyz", uri: "/readyz", method: .get, status: 200),
        ]
        // Last: with rack-2 disabled, its calls are refused with 409.
        calls += [
            Call(template: "/api/v1/authorization/", uri: "/api/v1/authorization/", body: #"{"appliance": \#(block(rack2))}"#, status: 409),
            Call(template: "/api/v1/broker/", uri: "/api/v1/broker/", body: checkIn(rack2), status: 409),
            Call(template: instance, uri: "/api/v1/instances/b-1/", body: report(rack2, "b-1"), status: 409),
            Call(template: "/api/v1/events", uri: "/api/v1/events", method: .get, headers: [HTTPField.Name("X-Auth-Token")!: rack2], status: 409),
        ]
        // Then the database as a newer corral would leave it: not ready.
        calls.append(Call(template: "/readyz", uri: "/readyz", method: .get, status: 503))
        let allCalls = calls
        let disableAt = calls.count - 5
        let supersedeAt = calls.count - 1
        let (replies, eventStatuses) = try await pool.app.test(.live) { client in
            var replies: [(Call, Int, String, Data)] = []
            for (index, call) in allCalls.enumerated() {
                if index == disableAt { _ = try await pool.store.setAppliance("rack-2", enabled: false) }
                if index == supersedeAt {
                    try await TestStores.tamperWithMigrations(pool.store, newer: true)
                }
                let (status, contentType, body) = try await client.execute(
                    uri: call.uri, method: call.method, headers: call.headers, body: call.body.map { ByteBuffer(string: $0) }
                ) { response in
                    (Int(response.status.code), response.headers[.contentType] ?? "", Data(response.body.readableBytesView))
                }
                replies.append((call, status, contentType, body))
            }
            // The event stream is read over its own connection.
            let http = HTTPClient(eventLoopGroup: HTTPClient.defaultEventLoopGroup)
            let watcher = try await EventWatcher(port: try #require(client.port), token: pool.token("alice"), client: http)
            try await watcher.subscribed()
            #expect(watcher.contentType == "text/event-stream")
            // A second stream of the same token is over its cap (1 here).
            let second = try await EventWatcher(port: try #require(client.port), token: pool.token("alice"), client: http)
            watcher.close()
            second.close()
            try await http.shutdown()
            return (replies, [watcher.status, second.status])
        }
        var seen: Set<String> = []
        var problems: [String] = []
        for (call, status, contentType, body) in replies {
            let name = "\(call.method.rawValue) \(call.template) \(status)"
            #expect(status == call.status, "\(call.method) \(call.uri): \(String(decoding: body, as: UTF8.self))")
            guard let documented = spec.response(path: call.template, method: call.method.rawValue, status: status) else {
                problems.append("\(name) is not documented")
                continue
            }
            seen.insert(name)
            let mediaType = String(contentType.split(separator: ";").first ?? "")
            guard let schema = spec.schema(documented, contentType: mediaType) else {
                problems.append("\(name): content type \(mediaType) is not documented")
                continue
            }
            if mediaType == "application/json" {
                let value = try JSONDecoder().decode(JSONValue.self, from: body)
                problems += spec.problems(value, schema).map { "\(name): \($0)" }
            } else if mediaType == "text/plain" {
                // The metrics: Prometheus' text format (parsed for real in MetricsTests).
                #expect(String(decoding: body, as: UTF8.self).contains("# TYPE corral_pool_http_requests_total counter"))
            } else {
                // The document itself: YAML, a mapping.
                #expect(mediaType == "application/yaml")
                #expect(schema["type"] as? String == "object")
                #expect((try Yams.load(yaml: String(decoding: body, as: UTF8.self))) is [String: Any])
            }
        }
        #expect(eventStatuses == [200, 429])
        let events = try #require(spec.response(path: "/api/v1/events", method: "GET", status: 200))
        #expect(spec.schema(events, contentType: "text/event-stream") != nil)
        #expect(spec.response(path: "/api/v1/events", method: "GET", status: 429) != nil)
        for status in eventStatuses { seen.insert("GET /api/v1/events \(status)") }
        #expect(
            replies.contains { $0.0.template == "/api/v1/broker/" && String(decoding: $0.3, as: UTF8.self).contains(#""phase":"placed""#) },
            "a start action with its timeline was checked against the schema")
        #expect(problems == [])
        #expect(spec.operations.subtracting(seen).sorted() == [], "documented but never produced")
        // The 502 is also in the instance's record.
        let offered = try #require(try await pool.store.instances().first { $0.name == "offer-1" })
        #expect(offered.lastError?.hasPrefix("callback http://127.0.0.1:9/start refused: 127.0.0.1 is a loopback address") == true)
    }

    @Test("the route table behind 405s is the document's; what the fuzzer found: 405 with Allow, /v1 envelopes, true is no number, encoded paths")
    func fuzzerFindings() async throws {
        let spec = try OpenAPISpec(yaml: openAPIDocument(publicURL: nil))
        var documented: [String: [String]] = [:]
        for (path, item) in spec.paths {
            let methods = (item as? [String: Any] ?? [:]).keys.filter { $0 != "parameters" }.map { $0.uppercased() }.sorted()
            documented[path.hasSuffix("/") ? String(path.dropLast()) : path] = methods
        }
        var table: [String: [String]] = [:]
        for route in RouteTable.routes { table[route.path] = route.methods.sorted() }
        #expect(table == documented)

        let pool = try await TestPool.make()
        _ = try await pool.checkInRoomy("rack-1", at: Date())
        try await pool.app.test(.router) { client in
            // A known path with another method: 405 naming the methods, in each API's envelope.
            let trace = try await client.execute(uri: "/api/v1/flavors/", method: .put) { $0 }
            #expect(trace.status == .methodNotAllowed)
            #expect(trace.headers[.allow] == "GET")
            #expect(try refusal(trace) == (.methodNotAllowed, "PUT is not allowed on /api/v1/flavors/; use GET"))
            let patch = try await client.v1(.patch, "/v1/server-instance/x", token: pool.token("root"))
            #expect(patch.status == .methodNotAllowed)
            #expect(patch.headers[.allow] == "DELETE, GET, PUT")
            #expect(try v1Refusal(patch).0 == .methodNotAllowed)
            // An unknown path under /v1 is a 404 in the /v1 envelope.
            let unknown = try await client.v1(.get, "/v1/server-instance/x/nope", token: pool.token("root"))
            #expect(try v1Refusal(unknown).0 == .notFound)

            // `true` is not a number of seconds.
            let created = try serverInstance(try await client.createSmall(token: pool.token("root")))
            let extended = try await client.v1(
                .put, "/v1/server-instance/\(created.id)", token: pool.token("root"), body: #"{"task": {"what": "extend-lease", "seconds": true}}"#)
            #expect(try v1Refusal(extended) == (.badRequest, "field 'task.seconds' must be a whole number"))
            // A percent-encoded path parameter is decoded.
            let name = try #require(created.hostname)
            let encoded = name.replacingOccurrences(of: "-", with: "%2D")
            #expect(try await client.v1(.get, "/v1/server-instance/\(encoded)", token: pool.token("root")).status == .ok)
            // An empty `token` query leaves the header's token in force.
            try await pool.store.addTemplate(Template(name: "web", wisp: "bob-web", flavor: "small"))
            let launched = try await client.execute(uri: "/api/stream/web?token=", method: .post, headers: pool.userHeaders("root")) { $0 }
            #expect(launched.status == .created)
        }
    }

    @Test("a callback reservation's start parameters come through the instance report; a later success clears the error")
    func callbackThroughReport() async throws {
        try await withCallbackServer { base in
            let pool = try await TestPool.make {
                $0.callbacks.allow = ["127.0.0.0/8"]
                $0.callbacks.ports = []
            }
            try await pool.app.test(.router) { client in
                _ = try await client.checkIn(pool, "rack-2", instances: [InstanceSummary(name: "offer-1", state: .onOffer), InstanceSummary(name: "offer-2", state: .onOffer)])
                #expect(try await client.reserve(pool, "alice", #"{"instance": "offer-1", "callback_url": "\#(base)/hop/3"}"#).status == .created)
                #expect(try await client.reserve(pool, "alice", #"{"instance": "offer-2", "callback_url": "\#(base)/html"}"#).status == .created)
                let good = try await client.report(pool, "rack-2", InstanceReport(name: "offer-1", state: .starting))
                #expect(good.status == .ok)
                let parameters = try #require(try decodeEnvelope(StartParameters.self, good).result)
                #expect(parameters.image.name == "end-of-chain")
                #expect(parameters.callbackURL == "")
                let bad = try await client.report(pool, "rack-2", InstanceReport(name: "offer-2", state: .starting))
                #expect(bad.status == .badGateway)
                let envelope = try decodeEnvelope(NoResult.self, bad)
                #expect(envelope.response == .error)
                #expect(envelope.message == "callback \(base)/html refused: it answered with Content-Type 'text/html'; callbacks must answer application/json")
            }
            let instances = Dictionary(uniqueKeysWithValues: try await pool.store.instances().map { ($0.name, $0) })
            #expect(instances["offer-1"]?.lastError == nil)
            #expect(instances["offer-1"]?.owner == "alice")
            #expect(instances["offer-2"]?.lastError?.contains("text/html") == true)
        }
    }
}
