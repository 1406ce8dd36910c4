import Foundation
import Hummingbird
import HummingbirdTesting
import PoolAPI
import Testing

@testable import PoolController

@Suite("Check-ins: POST /api/v1/broker/")
struct CheckInTests {
    @Test("a check-in records stats and last-seen, creates and updates its own instances, and leaves others' alone")
    func records() async throws {
        let pool = try await TestPool.make()
        let watched = try #require(pool.events.watch { _ in true })
        try await pool.app.test(.router) { client in
            let none = try await client.checkIn(pool, "rack-2", instances: [InstanceSummary(name: "theirs", state: .running)])
            #expect(none.isEmpty)
            _ = try await client.checkIn(
                pool, "rack-1", instances: [InstanceSummary(name: "a", state: .onOffer), InstanceSummary(name: "b", state: .running)])
            _ = try await client.checkIn(
                pool, "rack-1",
                instances: [
                    InstanceSummary(name: "a", state: .running), InstanceSummary(name: "b", state: .running),
                    InstanceSummary(name: "theirs", state: .decommissioned),
                ])
        }
        let instances = Dictionary(uniqueKeysWithValues: try await pool.store.instances().map { ($0.name, $0) })
        #expect(instances["a"]?.state == .running)
        #expect(instances["a"]?.appliance == "rack-1")
        #expect(instances["a"]?.owner == "alice")
        #expect(instances["b"]?.state == .running)
        #expect(instances["theirs"]?.state == .running)
        #expect(instances["theirs"]?.appliance == "rack-2")
        let rack = try #require(try await pool.store.appliances().first { $0.name == "rack-1" })
        #expect(rack.stats == TestPool.roomy)
        #expect(rack.lastSeen != nil)

        // New instances and state changes are events; a repeated state is not.
        var seen: [InstanceEvent] = []
        for await item in watched {
            if case .event(let event) = item { seen.append(event) }
            if seen.count == 4 { break }
        }
        #expect(seen.map { "\($0.name) \($0.state.rawValue)" } == ["theirs 4", "a 1", "b 4", "a 4"])
    }

    @Test("a check-in's summary taken before a decommission does not bring the instance back")
    func decommissionedIsFinal() async throws {
        let pool = try await TestPool.make()
        try await pool.app.test(.router) { client in
            _ = try await client.checkIn(pool, "rack-1", instances: [InstanceSummary(name: "gone", state: .suspended)])
            #expect(try await client.report(pool, "rack-1", InstanceReport(name: "gone", state: .decommissioned)).status == .ok)
            // The agent read its instances before it decommissioned this one; the check-in lands after the report.
            _ = try await client.checkIn(pool, "rack-1", instances: [InstanceSummary(name: "gone", state: .suspended)])
        }
        let gone = try #require(try await pool.store.instances().first { $0.name == "gone" })
        #expect(gone.state == .decommissioned)
    }

    @Test("an action is sent at every check-in until its appliance says it is done")
    func actionsUntilDone() async throws {
        let pool = try await TestPool.make()
        try await pool.app.test(.router) { client in
            _ = try await client.checkIn(pool, "rack-1", instances: [InstanceSummary(name: "web", state: .running)])
            let reboot = try await pool.store.enqueueAction(.reboot, instance: "web", expires: nil, at: Date())
            let lease = try await pool.store.enqueueAction(
                .lease, instance: "web", expires: Date(timeIntervalSince1970: 2_000_000_000), at: Date().addingTimeInterval(1))
            #expect(try await client.checkIn(pool, "rack-1") == [reboot, lease])
            #expect(try await client.checkIn(pool, "rack-1") == [reboot, lease])
            #expect(lease.expires == 2_000_000_000)
            // Another appliance cannot mark them done.
            _ = try await client.checkIn(pool, "rack-2", done: [reboot.id])
            #expect(try await client.checkIn(pool, "rack-1", done: [reboot.id]) == [lease])
            #expect(try await client.checkIn(pool, "rack-1", done: [lease.id, "no-such-id"]) == [])
        }
        await #expect(throws: PoolError.notFound(what: "instance", name: "nope")) {
            try await pool.store.enqueueAction(.reboot, instance: "nope", expires: nil, at: Date())
        }
    }

    @Test("bad check-ins are refused by status and message, and change nothing")
    func refusals() async throws {
        let pool = try await TestPool.make()
        let token = pool.token("rack-1")
        let badStats = #"{"vcpus": {"total": 2, "free": 3}, "memory_mib": {"total": 1, "free": 1}, "disk_gib": {"total": 1, "free": 1}, "running": 0}"#
        let cases: [(String, HTTPResponse.Status, String)] = [
            (#"{"appliance": {"apitoken": "\#(token)"}}"#, .badRequest, "missing field 'stats'"),
            (#"{"appliance": {"apitoken": "\#(token)"}, "stats": \#(badStats)}"#, .badRequest, "field 'stats.vcpus.free' must be from 0 to 2 (it was 3)"),
            (
                #"{"appliance": {"apitoken": "\#(token)"}, "stats": {"vcpus": {"total": 2, "free": 1}}}"#, .badRequest,
                "missing field 'stats.memory_mib'"
            ),
            (
                #"{"appliance": {"apitoken": "\#(token)"}, "stats": {"vcpus": {"total": 2, "free": 1}, "memory_mib": {"total": 1, "free": 1}, "disk_gib": {"total": 1, "free": 1}, "running": 0}, "instances": [{"name": "x", "state": 9}]}"#,
                .badRequest, "field 'instances[0].state' is invalid"
            ),
            (#"{"appliance": {"apitoken": "nope"}, "stats": \#(badStats)}"#, .unauthorized, "Token is not valid."),
        ]
        try await pool.app.test(.router) { client in
            for (body, status, message) in cases {
                try await client.execute(uri: "/api/v1/broker/", method: .post, body: ByteBuffer(string: body)) { response in
                    let (got, text) = try refusal(response)
                    #expect(got == status, "\(body)")
                    #expect(text.hasPrefix(message), "\(text)")
                }
            }
            _ = try await pool.store.setAppliance("rack-2", enabled: false)
            try await client.execute(uri: "/api/v1/broker/", method: .post, body: try pool.checkInBody("rack-2")) { response in
                #expect(response.status == .conflict)
            }
        }
        #expect(try await pool.store.instances().isEmpty)
        #expect(try await pool.store.appliances().allSatisfy { $0.stats == nil })
    }
}
