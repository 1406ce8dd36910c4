import AsyncHTTPClient
import Foundation
import HTTPTypes
import Hummingbird
import HummingbirdTesting
import NIOCore
import PoolAPI
import Testing

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
        let pool = try await TestPool.make(systemDefault: false)
        // An instance asked for through the user-facing API: rack-1's start
        // action carries its timeline.
        _ = try await pool.checkInRoomy("rack-1", at: Date())
        _ = try await pool.store.createInstance(
            InstanceRequest(owner: "root", flavor: "small", image: "debian"), defaultLeaseSeconds: 3600, applianceStaleAfter: 300, at: Date())
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
        ]
        // Last: with rack-2 disabled, its calls are refused with 409.
        calls += [
            Call(template: "/api/v1/authorization/", uri: "/api/v1/authorization/", body: #"{"appliance": \#(block(rack2))}"#, status: 409),
            Call(template: "/api/v1/broker/", uri: "/api/v1/broker/", body: checkIn(rack2), status: 409),
            Call(template: instance, uri: "/api/v1/instances/b-1/", body: report(rack2, "b-1"), status: 409),
            Call(template: "/api/v1/events", uri: "/api/v1/events", method: .get, headers: [HTTPField.Name("X-Auth-Token")!: rack2], status: 409),
        ]
        let allCalls = calls
        let disableAt = calls.count - 4
        let (replies, eventStatus) = try await pool.app.test(.live) { client in
            var replies: [(Call, Int, String, Data)] = []
            for (index, call) in allCalls.enumerated() {
                if index == disableAt { _ = try await pool.store.setAppliance("rack-2", enabled: false) }
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
            watcher.close()
            try await http.shutdown()
            return (replies, watcher.status)
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
            } else {
                #expect(schema["type"] as? String == "string")
            }
        }
        let events = try #require(spec.response(path: "/api/v1/events", method: "GET", status: eventStatus))
        #expect(spec.schema(events, contentType: "text/event-stream") != nil)
        seen.insert("GET /api/v1/events \(eventStatus)")
        #expect(
            replies.contains { $0.0.template == "/api/v1/broker/" && String(decoding: $0.3, as: UTF8.self).contains(#""phase":"placed""#) },
            "a start action with its timeline was checked against the schema")
        #expect(problems == [])
        #expect(spec.operations.subtracting(seen).sorted() == [], "documented but never produced")
        // The 502 is also in the instance's record.
        let offered = try #require(try await pool.store.instances().first { $0.name == "offer-1" })
        #expect(offered.lastError?.hasPrefix("callback http://127.0.0.1:9/start refused: 127.0.0.1 is a loopback address") == true)
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
