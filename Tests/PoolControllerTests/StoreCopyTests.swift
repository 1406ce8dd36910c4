import Foundation
import PoolAPI
import Testing
import TestSupport

@testable import PoolController

/// `corral pool copy`: a pool moved from SQLite to PostgreSQL.
@Suite("Copying a SQLite pool into PostgreSQL")
struct StoreCopyTests {
    /// Records as JSON, dates to the millisecond (SQLite keeps milliseconds).
    static func json(_ value: some Encodable) throws -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = .sortedKeys
        encoder.dateEncodingStrategy = .custom { date, encoder in
            var container = encoder.singleValueContainer()
            try container.encode(Int64((date.timeIntervalSince1970 * 1000).rounded()))
        }
        return String(decoding: try encoder.encode(value), as: UTF8.self)
    }

    /// Everything the pool shows of a store.
    static func everything(_ store: any PoolStore) async throws -> [String] {
        var parts = [
            try json(try await store.users()), try json(try await store.appliances()), try json(try await store.flavors()),
            try json(try await store.images()), try json(try await store.wisps()), try json(try await store.templates()),
            try json(try await store.instances()), try json(try await store.reservations()),
            try json(try await store.sshKeys(owner: "alice")), try json(try await store.signingKey()),
        ]
        for appliance in ["rack-1", "rack-2"] { parts.append(try json(try await store.pendingActions(appliance: appliance))) }
        for instance in try await store.instances() { parts.append(try json(try await store.timeline(ofInstance: instance.id))) }
        return parts
    }

    @Test("every record arrives as it was, tokens and the signing key still work, new records follow, and a second copy is refused")
    func copy() async throws {
        let (source, _) = try makeSQLiteStore()
        _ = try await source.addUser(name: "root", superuser: true, maxInstances: 100, tokenDigest: Token.digest("root"))
        _ = try await source.addUser(
            name: "alice", superuser: false, maxInstances: 3, tokenDigest: Token.digest("alice"), manager: "root", leaseSeconds: 7200)
        _ = try await source.addUser(name: "bob", superuser: false, maxInstances: 3, tokenDigest: Token.digest("bob"))
        for (name, owner) in [("rack-1", "root"), ("rack-2", "bob")] {
            _ = try await source.addAppliance(name: name, owner: owner, tokenDigest: Token.digest(name))
            _ = try await source.checkIn(
                name, request: CheckInRequest(appliance: ApplianceBlock(apitoken: name), stats: TestPool.roomy), maxInstances: 100,
                at: Date())
        }
        _ = try await source.setAppliance("rack-2", region: "eu")
        try await source.addFlavor(Flavor(name: "small", vcpus: 1, memory: 512, disk: 5))
        try await source.addImage(Image(name: "debian", url: "http://images.test/debian.qcow2", loginUser: "debian"))
        try await source.addWisp(Wisp(name: "web", owner: "root", image: "debian", sshKeys: ["ssh-ed25519 AAAA root"], isSystemDefault: true))
        try await source.addTemplate(Template(name: "quick", wisp: "web", flavor: "small", hotStarts: 1))
        _ = try await source.maintainWarmPools(maxAgeSeconds: 3600, applianceStaleAfter: 300, at: Date())
        _ = try await source.addSSHKey(owner: "alice", name: "laptop", key: try SSHPublicKey(testPublicKeyLine), maxKeys: 5, at: Date())
        let made = try await source.createInstance(
            InstanceRequest(owner: "alice", flavor: "small", users: ["bob"]), defaultLeaseSeconds: 3600, applianceStaleAfter: 300, at: Date())
        _ = try await source.recordReport(
            InstanceReport(
                name: made.name, state: .running, ipAddresses: [IPAddress(version: 4, scope: "private", address: "10.0.2.15")],
                timeline: [TimelineEntry(phase: .sshReachable, at: Date(), detail: "127.0.0.1 port 22001")]),
            appliance: made.appliance, consoleLimit: 10, maxInstances: 100, at: Date())
        _ = try await source.enqueueAction(.reboot, instance: made.name, expires: nil, at: Date())
        _ = try await source.recordReport(
            InstanceReport(name: "offered-1", state: .onOffer), appliance: "rack-2", consoleLimit: 10, maxInstances: 100, at: Date())
        _ = try await source.reserve(
            ReservationRequest(instance: "offered-1"), user: "bob", lifetime: 600, applianceStaleAfter: 300, at: Date())
        let key = try await source.signingKey()

        let target = try await TestStores.postgres()
        let copied = try await target.copyRows(from: source)
        #expect(copied.map(\.table) == PostgresStore.copiedTables)
        #expect(copied.first { $0.table == "instance" }?.rows == 3)
        #expect(copied.first { $0.table == "action" }?.rows == 3, "two starts and a reboot: \(copied)")
        #expect(try await Self.everything(target) == (try await Self.everything(source)))
        #expect(try await target.signingKey() == key, "agents' pinned key still verifies")
        #expect(try await target.user(tokenDigest: Token.digest("alice"))?.name == "alice")
        #expect(try await target.appliance(tokenDigest: Token.digest("rack-2"))?.name == "rack-2")

        // The pool carries on: new rows get new ids.
        _ = try await target.addUser(name: "carol", superuser: false, maxInstances: 1, tokenDigest: Token.digest("carol"))
        let next = try await target.createInstance(
            InstanceRequest(owner: "alice", flavor: "small"), defaultLeaseSeconds: 3600, applianceStaleAfter: 300, at: Date())
        #expect(next.name != made.name)
        // alice's limit counts the copied instance: a third, then no more.
        _ = try await target.createInstance(
            InstanceRequest(owner: "alice", flavor: "small"), defaultLeaseSeconds: 3600, applianceStaleAfter: 300, at: Date())
        await #expect(throws: PoolError.conflict("user 'alice' holds 3 of their 3 instances; delete one first")) {
            _ = try await target.createInstance(
                InstanceRequest(owner: "alice", flavor: "small"), defaultLeaseSeconds: 3600, applianceStaleAfter: 300, at: Date())
        }
        // A second copy into a database that holds a pool changes nothing.
        let before = try await Self.everything(target)
        await #expect(throws: PoolError.self) { _ = try await target.copyRows(from: source) }
        #expect(try await Self.everything(target) == before)
    }
}
