import Foundation
import PoolAPI
import Testing
import TestSupport

@testable import PoolController

/// A fresh SQLite store in its own directory.
func makeSQLiteStore() throws -> (SQLiteStore, path: String) {
    let directory = FileManager.default.temporaryDirectory.appendingPathComponent("corral-pool-\(UUID().uuidString)")
    let path = directory.appendingPathComponent("pool.sqlite").path
    return (try SQLiteStore(path: path), path)
}

@Suite("Pool store on SQLite")
struct StoreTests {
    @Test("users and appliances are stored with token digests only, and survive a reopen")
    func persistence() async throws {
        let (store, path) = try makeSQLiteStore()
        let token = Token.generate()
        #expect(token.count == 64)
        #expect(token != Token.generate())
        _ = try await store.addUser(name: "alice", superuser: false, maxInstances: 3, tokenDigest: Token.digest("u"))
        let appliance = try await store.addAppliance(name: "rack-1", owner: "alice", tokenDigest: Token.digest(token))
        #expect(appliance.owner == "alice")
        #expect(appliance.enabled)

        let reopened = try SQLiteStore(path: path)
        #expect(try await reopened.users().map(\.name) == ["alice"])
        #expect(try await reopened.appliance(tokenDigest: Token.digest(token))?.name == "rack-1")
        #expect(try await reopened.appliance(tokenDigest: Token.digest(token + "x")) == nil)

        // The token itself is nowhere in the file.
        let bytes = try Data(contentsOf: URL(fileURLWithPath: path))
        #expect(bytes.range(of: Data(token.utf8)) == nil)
    }

    @Test("a refused change stores nothing")
    func refusals() async throws {
        let (store, _) = try await makeStore()
        _ = try await store.addUser(name: "alice", superuser: false, maxInstances: 3, tokenDigest: "d1")
        await #expect(throws: PoolError.alreadyExists(what: "user", name: "alice")) {
            try await store.addUser(name: "alice", superuser: true, maxInstances: 9, tokenDigest: "d2")
        }
        await #expect(throws: PoolError.notFound(what: "user", name: "bob")) {
            try await store.addAppliance(name: "rack-1", owner: "bob", tokenDigest: "d3")
        }
        #expect(try await store.appliances().isEmpty)
        #expect(try await store.users().map(\.superuser) == [false])

        try await store.addFlavor(Flavor(name: "small", vcpus: 1, memory: 512, disk: 5))
        await #expect(throws: PoolError.alreadyExists(what: "flavor with these specs", name: "also-small")) {
            try await store.addFlavor(Flavor(name: "also-small", vcpus: 1, memory: 512, disk: 5))
        }
        await #expect(throws: PoolError.alreadyExists(what: "flavor", name: "small")) {
            try await store.addFlavor(Flavor(name: "small", vcpus: 2, memory: 512, disk: 5))
        }
        #expect(try await store.flavors().map(\.name) == ["small"])
        await #expect(throws: PoolError.notFound(what: "appliance", name: "ghost")) {
            try await store.setAppliance("ghost", enabled: false)
        }
    }

    @Test("rotating a token retires the old one at once")
    func rotation() async throws {
        let (store, _) = try await makeStore()
        _ = try await store.addUser(name: "alice", superuser: false, maxInstances: 3, tokenDigest: "u")
        _ = try await store.addAppliance(name: "rack-1", owner: "alice", tokenDigest: Token.digest("old"))
        try await store.setApplianceToken("rack-1", tokenDigest: Token.digest("new"))
        #expect(try await store.appliance(tokenDigest: Token.digest("old")) == nil)
        #expect(try await store.appliance(tokenDigest: Token.digest("new"))?.name == "rack-1")
    }

    @Test("a check-in that changes nothing writes nothing; a changed state, new stats, a done action or a 5 s gap is recorded")
    func quietCheckIns() async throws {
        let pool = try await TestPool.make()
        let store = pool.store
        let start = Date(timeIntervalSince1970: 1_900_000_000)
        func checkIn(_ seconds: TimeInterval, state: InstanceState = .running, memory: Int = 16000, done: [String] = []) async throws -> [Action] {
            try await store.checkIn(
                "rack-1",
                request: CheckInRequest(
                    appliance: .init(apitoken: ""), stats: stats(vcpus: 8, memory: memory), instances: [InstanceSummary(name: "web-1", state: state)],
                    done: done),
                maxInstances: 1000, at: start.addingTimeInterval(seconds)
            ).actions
        }
        func seen() async throws -> (appliance: Date?, reported: Date?, state: InstanceState?) {
            let appliance = try await store.appliances().first { $0.name == "rack-1" }
            let instance = try await store.instances().first { $0.name == "web-1" }
            return (appliance?.lastSeen, instance?.reportedAt, instance?.state)
        }
        _ = try await checkIn(0)
        #expect(try await seen() == (start, start, .running))
        // The same a second later: nothing is written.
        _ = try await checkIn(1)
        #expect(try await seen() == (start, start, .running))
        // A new state is recorded at once.
        _ = try await checkIn(2, state: .suspended)
        #expect(try await seen().state == .suspended)
        #expect(try await seen().appliance == start.addingTimeInterval(2))
        // New stats are recorded at once.
        _ = try await checkIn(3, state: .suspended, memory: 8000)
        #expect(try await store.appliances().first { $0.name == "rack-1" }?.stats?.memoryMiB.free == 8000)
        // An action done is recorded, and no longer offered.
        let reboot = try await store.enqueueAction(.reboot, instance: "web-1", expires: nil, at: start.addingTimeInterval(3))
        #expect(try await checkIn(3.5, state: .suspended, memory: 8000).map(\.id) == [reboot.id])
        #expect(try await checkIn(3.6, state: .suspended, memory: 8000, done: [reboot.id]).isEmpty)
        #expect(try await store.pendingActions(appliance: "rack-1").isEmpty)
        // Unchanged, but 5 s after it was last written: seen again.
        _ = try await checkIn(9, state: .suspended, memory: 8000)
        #expect(try await seen() == (start.addingTimeInterval(9), start.addingTimeInterval(9), .suspended))
    }
}
