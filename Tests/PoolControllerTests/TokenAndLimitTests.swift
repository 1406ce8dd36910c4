import AsyncHTTPClient
import Foundation
import HTTPTypes
import Hummingbird
import HummingbirdTesting
import NIOCore
import PoolAPI
import Testing

@testable import PoolController

extension EventWatcher {
    /// Whether the stream ends (the pool closed it) within 10 s.
    func ends() async -> Bool {
        do {
            _ = try await next { _ in false }
            return false
        } catch {
            return true
        }
    }
}

/// The user view in a `/v1/user` reply.
private func userView(_ response: TestResponse) throws -> UserView {
    let envelope = try JSONDecoder().decode(ServerEnvelope<[UserView]>.self, from: Data(response.body.readableBytesView))
    return try #require(envelope.data?.first)
}

@Suite("User tokens, per-token caps and pages")
struct TokenAndLimitTests {
    @Test("a rotated or disabled user token is refused everywhere, its open event streams end; only a superuser disables")
    func rotateAndDisable() async throws {
        let pool = try await TestPool.make()
        let http = HTTPClient(eventLoopGroup: HTTPClient.defaultEventLoopGroup)
        try await pool.app.test(.live) { client in
            let port = try #require(client.port)
            let alice = pool.token("alice")
            let root = pool.token("root")
            /// Every route a user token opens, and what a refused token gets there.
            func refusedEverywhere(_ token: String, _ reason: String) async throws {
                let list = try await client.v1(.get, "/v1/server-instance", token: token)
                #expect(try v1Refusal(list) == (.unauthorized, reason))
                let bids = try await client.execute(
                    uri: "/api/v1/bids/", method: .get, headers: [HTTPField.Name("X-Auth-Token")!: token]) { $0 }
                #expect(bids.status == .unauthorized)
                let launch = try await client.execute(uri: "/api/stream/web?token=\(token)", method: .post) { $0 }
                #expect(launch.status.code == 402)
                let watcher = try await EventWatcher(port: port, token: token, client: http)
                #expect(watcher.status == 401)
                watcher.close()
            }

            // Alice rotates her own token: the old one is refused at once,
            // and her open stream ends.
            let stream = try await EventWatcher(port: port, token: alice, client: http)
            try await stream.subscribed()
            let rotated = try await client.v1(.post, "/v1/user/alice/token", token: alice)
            #expect(rotated.status == .ok)
            let view = try userView(rotated)
            let newToken = try #require(view.token)
            #expect(view.name == "alice" && view.enabled && newToken != alice)
            #expect(await stream.ends(), "the stream of the replaced token ended")
            try await refusedEverywhere(alice, "Token is not valid.")
            #expect(try await client.v1(.get, "/v1/server-instance", token: newToken).status == .ok)
            #expect(try await pool.store.user(tokenDigest: Token.digest(newToken))?.name == "alice")

            // Only oneself or a superuser: bob sees no alice (404), and may not disable.
            #expect(try await client.v1(.post, "/v1/user/alice/token", token: pool.token("bob")).status == .notFound)
            #expect(try await client.v1(.get, "/v1/user/alice", token: pool.token("bob")).status == .notFound)
            let bobDisables = try await client.v1(.put, "/v1/user/bob", token: pool.token("bob"), body: #"{"enabled": false}"#)
            #expect(try v1Refusal(bobDisables) == (.forbidden, "only a superuser may change users"))
            let selfDisable = try await client.v1(.put, "/v1/user/root", token: root, body: #"{"enabled": false}"#)
            #expect(try v1Refusal(selfDisable).0 == .conflict)
            let badBody = try await client.v1(.put, "/v1/user/alice", token: root, body: #"{"enabled": "no"}"#)
            #expect(try v1Refusal(badBody) == (.badRequest, "field 'enabled' must be true or false"))

            // A superuser disables alice: refused everywhere, her stream ends at once.
            let second = try await EventWatcher(port: port, token: newToken, client: http)
            try await second.subscribed()
            let disabled = try await client.v1(.put, "/v1/user/alice", token: root, body: #"{"enabled": false}"#)
            #expect(try userView(disabled).enabled == false)
            #expect(await second.ends())
            try await refusedEverywhere(newToken, User.refusalOfDisabled("alice"))
            let enabled = try await client.v1(.put, "/v1/user/alice", token: root, body: #"{"enabled": true}"#)
            #expect(try userView(enabled).enabled)
            #expect(try await client.v1(.get, "/v1/server-instance", token: newToken).status == .ok)

            // Disabled from another process (the store, as `corral pool user
            // disable` does): the stream ends at its next keep-alive.
            let third = try await EventWatcher(port: port, token: newToken, client: http)
            try await third.subscribed()
            _ = try await pool.store.setUser("alice", enabled: false)
            pool.events.heartbeat()
            #expect(try await third.next { $0 == "event: revoked" } == "event: revoked")
            #expect(await third.ends())
        }
        try await http.shutdown()
    }

    @Test("per-token caps: event streams and held check-ins beyond the limit are 429")
    func caps() async throws {
        let pool = try await TestPool.make {
            $0.limits.maxEventStreamsPerToken = 2
            $0.limits.maxHeldCheckInsPerAppliance = 1
        }
        let http = HTTPClient(eventLoopGroup: HTTPClient.defaultEventLoopGroup)
        try await pool.app.test(.live) { client in
            let port = try #require(client.port)
            var open: [EventWatcher] = []
            for _ in 0..<2 {
                let watcher = try await EventWatcher(port: port, token: pool.token("bob"), client: http)
                try await watcher.subscribed()
                open.append(watcher)
            }
            let third = try await EventWatcher(port: port, token: pool.token("bob"), client: http)
            #expect(third.status == 429)
            third.close()
            // Another token has its own allowance.
            let alice = try await EventWatcher(port: port, token: pool.token("alice"), client: http)
            #expect(alice.status == 200)
            alice.close()
            open.forEach { $0.close() }

            // One held check-in of rack-1 at a time; rack-2 is not affected.
            func heldCheckIn(_ appliance: String, hold: Int) async throws -> Int {
                var request = HTTPClientRequest(url: "http://127.0.0.1:\(port)/api/v1/broker/")
                request.method = .POST
                let body = CheckInRequest(
                    appliance: ApplianceBlock(apitoken: pool.token(appliance)), stats: TestPool.roomy, instances: [], done: [],
                    holdSeconds: hold)
                request.body = .bytes(ByteBuffer(bytes: try JSONEncoder().encode(body)))
                return Int(try await http.execute(request, timeout: .seconds(30)).status.code)
            }
            async let held = heldCheckIn("rack-1", hold: 4)
            try await Task.sleep(for: .milliseconds(500))
            #expect(try await heldCheckIn("rack-1", hold: 4) == 429)
            #expect(try await heldCheckIn("rack-2", hold: 1) == 200)
            #expect(try await heldCheckIn("rack-1", hold: 0) == 200, "an unheld check-in is never capped")
            #expect(try await held == 200)
        }
        try await http.shutdown()
    }

    @Test("a new action wakes only its own appliance's held check-ins")
    func keyedWakeups() async throws {
        let pool = try await TestPool.make()
        try await pool.app.test(.router) { client in
            _ = try await client.report(pool, "rack-1", InstanceReport(name: "a-1", state: .running))
        }
        let deadline = ContinuousClock.now + .seconds(2)
        let mine = try #require(pool.store.actionsChanged.changes(for: "rack-1", until: deadline))
        let other = try #require(pool.store.actionsChanged.changes(for: "rack-2", until: deadline))
        _ = try await pool.store.enqueueAction(.reboot, instance: "a-1", expires: nil, at: Date())
        var woken = 0
        for await _ in mine { woken += 1; break }
        var otherWoken = 0
        for await _ in other { otherWoken += 1 }
        #expect(woken == 1)
        #expect(otherWoken == 0, "rack-2's held check-in was not woken by rack-1's action")
        #expect(pool.store.actionsChanged.changes(for: "x", until: .now + .seconds(1), limit: 0) == nil)
    }

    @Test("GET /v1/server-instance pages by id with limit and marker, within what the caller sees")
    func pages() async throws {
        let pool = try await TestPool.make { $0.limits.defaultPageSize = 4 }
        try await pool.app.test(.router) { client in
            for index in 0..<7 { _ = try await client.report(pool, "rack-1", InstanceReport(name: "a-\(index)", state: .running)) }
            for index in 0..<3 { _ = try await client.report(pool, "rack-2", InstanceReport(name: "b-\(index)", state: .running)) }
            func all(_ user: String, limit: Int?) async throws -> [ServerInstance] {
                var seen: [ServerInstance] = []
                var marker: String?
                while true {
                    var query: [String] = []
                    if let limit { query.append("limit=\(limit)") }
                    if let marker { query.append("marker=\(marker)") }
                    let response = try await client.v1(
                        .get, "/v1/server-instance" + (query.isEmpty ? "" : "?" + query.joined(separator: "&")), token: pool.token(user))
                    #expect(response.status == .ok)
                    let page = try serverEnvelope(response).data ?? []
                    #expect(page.count <= limit ?? 4)
                    seen += page
                    guard page.count == (limit ?? 4), let last = page.last?.id else { return seen }
                    marker = last
                }
            }
            let alice = try await all("alice", limit: 3)
            #expect(alice.count == 7)
            #expect(alice.map(\.id) == alice.map(\.id).sorted(), "in id order")
            #expect(Set(alice.map(\.id)).count == 7, "no instance twice")
            #expect(try await all("bob", limit: nil).count == 3)
            #expect(try await all("root", limit: 1000).count == 10)
            #expect(try await all("root", limit: nil).count == 10)

            for query in ["limit=0", "limit=1001", "limit=x", "marker=../x", "marker=" + String(repeating: "g", count: 32)] {
                let response = try await client.v1(.get, "/v1/server-instance?\(query)", token: pool.token("alice"))
                #expect(response.status == .badRequest, "\(query)")
                #expect(try v1Refusal(response).1.hasPrefix("query '"), "\(query)")
            }
        }
    }
}
