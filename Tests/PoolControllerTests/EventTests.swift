import AsyncHTTPClient
import Foundation
import Hummingbird
import HummingbirdTesting
import NIOCore
import PoolAPI
import Testing

@testable import PoolController

/// A client of `GET /api/v1/events` over a real socket, reading the stream
/// line by line.
final class EventWatcher: Sendable {
    let status: Int
    let contentType: String?
    private let lines: AsyncThrowingStream<String, any Error>
    private let reader: Task<Void, Never>

    init(port: Int, token: String?, client: HTTPClient) async throws {
        var request = HTTPClientRequest(url: "http://127.0.0.1:\(port)/api/v1/events")
        if let token { request.headers.add(name: "X-Auth-Token", value: token) }
        let response = try await client.execute(request, timeout: .seconds(30))
        status = Int(response.status.code)
        contentType = response.headers.first(name: "Content-Type")
        let (lines, continuation) = AsyncThrowingStream.makeStream(of: String.self)
        self.lines = lines
        reader = Task {
            var pending = ""
            do {
                for try await chunk in response.body {
                    pending += String(buffer: chunk)
                    while let newline = pending.firstIndex(of: "\n") {
                        continuation.yield(String(pending[..<newline]))
                        pending = String(pending[pending.index(after: newline)...])
                    }
                }
                continuation.finish()
            } catch {
                continuation.finish(throwing: error)
            }
        }
    }

    /// Waits (at most 10 s) for the `: watching` comment.
    func subscribed() async throws {
        _ = try await next { $0 == ": watching" }
    }

    /// The next instance event's data.
    func nextEvent() async throws -> InstanceEvent {
        let line = try await next { $0.hasPrefix("data: ") }
        return try JSONDecoder().decode(InstanceEvent.self, from: Data(line.dropFirst("data: ".count).utf8))
    }

    /// The next line `matching` accepts, within 10 s.
    func next(_ matching: @escaping @Sendable (String) -> Bool) async throws -> String {
        let lines = self.lines
        return try await withThrowingTaskGroup(of: String.self) { group in
            group.addTask {
                for try await line in lines where matching(line) { return line }
                throw CancellationError()
            }
            group.addTask {
                try await Task.sleep(for: .seconds(10))
                throw CancellationError()
            }
            defer { group.cancelAll() }
            return try await group.next()!
        }
    }

    func close() { reader.cancel() }
}

@Suite("Events: GET /api/v1/events over a loopback socket")
struct EventTests {
    @Test("each watcher sees the changes its token may see, in order")
    func scoped() async throws {
        let pool = try await TestPool.make()
        let http = HTTPClient(eventLoopGroup: HTTPClient.defaultEventLoopGroup)
        try await pool.app.test(.live) { client in
            let port = try #require(client.port)
            let alice = try await EventWatcher(port: port, token: pool.token("alice"), client: http)
            let root = try await EventWatcher(port: port, token: pool.token("root"), client: http)
            let rack2 = try await EventWatcher(port: port, token: pool.token("rack-2"), client: http)
            defer { [alice, root, rack2].forEach { $0.close() } }
            #expect(alice.status == 200)
            #expect(alice.contentType == "text/event-stream")
            for watcher in [alice, root, rack2] { try await watcher.subscribed() }

            _ = try await client.report(pool, "rack-1", InstanceReport(name: "a-1", state: .starting))  // alice's
            _ = try await client.report(pool, "rack-2", InstanceReport(name: "b-1", state: .starting))  // bob's
            _ = try await client.report(pool, "rack-1", InstanceReport(name: "a-1", state: .starting))  // no change
            _ = try await client.report(pool, "rack-1", InstanceReport(name: "a-1", state: .running))

            let a1 = InstanceEvent(name: "a-1", state: .starting, appliance: "rack-1", owner: "alice")
            let b1 = InstanceEvent(name: "b-1", state: .starting, appliance: "rack-2", owner: "bob")
            var a1Running = a1
            a1Running.state = .running
            #expect(try await alice.nextEvent() == a1)
            #expect(try await alice.nextEvent() == a1Running)
            #expect(try await root.nextEvent() == a1)
            #expect(try await root.nextEvent() == b1)
            #expect(try await root.nextEvent() == a1Running)
            #expect(try await rack2.nextEvent() == b1)

            for token in [nil, "nope"] {
                let refused = try await EventWatcher(port: port, token: token, client: http)
                #expect(refused.status == 401)
                refused.close()
            }
            _ = try await pool.store.setAppliance("rack-2", enabled: false)
            let disabled = try await EventWatcher(port: port, token: pool.token("rack-2"), client: http)
            #expect(disabled.status == 409)
            disabled.close()
        }
        try await http.shutdown()
    }

    @Test("housekeeping runs as a service and announces withdrawn offers")
    func housekeepingService() async throws {
        let pool = try await TestPool.make { configuration in
            configuration.housekeeping.intervalSeconds = 1
            configuration.housekeeping.offerStaleSeconds = 1
        }
        let http = HTTPClient(eventLoopGroup: HTTPClient.defaultEventLoopGroup)
        try await pool.app.test(.live) { client in
            let watcher = try await EventWatcher(port: try #require(client.port), token: pool.token("alice"), client: http)
            defer { watcher.close() }
            try await watcher.subscribed()
            _ = try await client.checkIn(pool, "rack-1", instances: [InstanceSummary(name: "offer", state: .onOffer)])
            #expect(try await watcher.nextEvent().state == .onOffer)
            #expect(try await watcher.nextEvent() == InstanceEvent(name: "offer", state: .inactive, appliance: "rack-1", owner: "alice"))
        }
        try await http.shutdown()
        #expect(try await pool.store.instances().first?.state == .inactive)
    }
}
