import AsyncHTTPClient
import Foundation
import HTTPTypes
import Hummingbird
import HummingbirdTesting
import NIOCore
import PoolAPI
import Testing

@testable import PoolController

@Suite("Launch timeline and held check-ins")
struct TimelineTests {
    @Test("a held check-in is answered as soon as an action is queued, else at its deadline; a hold out of range is a 400")
    func heldCheckIn() async throws {
        let pool = try await TestPool.make()
        _ = try await pool.checkInRoomy("rack-1", at: Date())
        _ = try await pool.store.setAppliance("rack-2", enabled: false)
        try await pool.app.test(.live) { client in
            let loopback = LoopbackClient(base: "http://127.0.0.1:\(try #require(client.port))", http: HTTPClient.shared)
            func checkIn(hold: Int) async throws -> (Int, [Action], String, Duration) {
                let body = CheckInRequest(
                    appliance: ApplianceBlock(apitoken: pool.token("rack-1")), stats: TestPool.roomy, holdSeconds: hold)
                let started = ContinuousClock.now
                let (status, data) = try await loopback.send(
                    .POST, "/api/v1/broker/", token: nil, body: String(decoding: try JSONEncoder().encode(body), as: UTF8.self))
                let envelope = try JSONDecoder().decode(Envelope<CheckInResult>.self, from: data)
                return (status, envelope.result?.actions ?? [], envelope.message ?? "", ContinuousClock.now - started)
            }

            // Nothing pending: the reply comes at the deadline, empty.
            let (status, idle, _, waited) = try await checkIn(hold: 1)
            #expect(status == 200)
            #expect(idle.isEmpty)
            #expect(waited >= .milliseconds(900), "the pool held the check-in (\(waited))")

            // A check-in held for a minute gets the start of an instance created meanwhile.
            async let held = checkIn(hold: 60)
            try await Task.sleep(for: .milliseconds(500))
            let created = ContinuousClock.now
            let (createStatus, createData) = try await loopback.send(
                .POST, "/v1/server-instance", token: pool.token("alice"), body: #"{"server-image": "debian", "server-flavor": "small"}"#)
            #expect(createStatus == 201, "\(String(decoding: createData, as: UTF8.self))")
            let (heldStatus, actions, _, heldFor) = try await held
            #expect(heldStatus == 200)
            #expect(actions.map(\.kind) == [.start])
            #expect(heldFor < .seconds(30), "answered when the action was queued, not at the deadline (\(heldFor))")
            #expect(ContinuousClock.now >= created)

            let (refused, _, message, _) = try await checkIn(hold: 500)
            #expect(refused == 400)
            #expect(message.contains("hold_seconds"), "\(message)")
        }
    }

    @Test("the pool records request, placement and the first running report, takes the agent's phases, and shows them to who sees the instance")
    func timeline() async throws {
        let pool = try await TestPool.make()
        _ = try await pool.checkInRoomy("rack-1", at: Date())
        _ = try await pool.store.setAppliance("rack-2", enabled: false)
        try await pool.app.test(.router) { client in
            let before = Date().timeIntervalSince1970
            let instance = try serverInstance(try await client.createSmall(token: pool.token("alice")))
            let after = Date().timeIntervalSince1970

            // The start action carries the pool's phases to the agent.
            let start = try #require(try await client.checkIn(pool, "rack-1").first { $0.kind == .start })
            let given = try #require(start.timeline)
            #expect(given.map(\.phase) == [.requested, .placed])
            #expect(given.allSatisfy { (before - 0.001)...(after + 0.001) ~= $0.at })
            #expect(given[0].at <= given[1].at)

            // The agent's report: its phases are taken, a time for a pool phase is not.
            let name = try #require(instance.hostname)
            let base = Date()
            try await Task.sleep(for: .milliseconds(10))
            let agentPhases: [LaunchPhase] = [.pickedUp, .imageReady, .seedWritten, .domainDefined, .domainStarted]
            var reported = agentPhases.enumerated().map { TimelineEntry(phase: $1, at: base.addingTimeInterval(Double($0) * 0.001)) }
            reported.append(TimelineEntry(phase: .requested, at: Date().addingTimeInterval(-86_400)))
            #expect(try await client.report(pool, "rack-1", InstanceReport(name: name, state: .starting, timeline: reported)).status == .ok)
            #expect(
                try await client.report(
                    pool, "rack-1", InstanceReport(name: name, state: .running, timeline: reported + [TimelineEntry(phase: .postCreateDone, at: base.addingTimeInterval(60), detail: "guest uptime 9.5 s")])
                ).status == .ok)
            let firstRunning = try #require(try await pool.store.timeline(ofInstance: name).first { $0.phase == .runningReported })
            try await Task.sleep(for: .milliseconds(20))
            #expect(try await client.report(pool, "rack-1", InstanceReport(name: name, state: .running)).status == .ok)

            func timeline(_ user: String) async throws -> (HTTPResponse.Status, [ServerTimelineEntry]) {
                let response = try await client.v1(.get, "/v1/server-instance/\(instance.id)/timeline", token: pool.token(user))
                let envelope = try JSONDecoder().decode(ServerEnvelope<[ServerTimelineEntry]>.self, from: Data(response.body.readableBytesView))
                return (response.status, envelope.data ?? [])
            }
            let (status, entries) = try await timeline("alice")
            #expect(status == .ok)
            #expect(entries.map(\.phase) == ["requested", "placed"] + agentPhases.map(\.rawValue) + ["running-reported", "post-create-done"])
            #expect(entries.first?.seconds == 0)
            #expect(entries.map(\.seconds) == entries.map(\.seconds).sorted())
            #expect(entries.last?.detail == "guest uptime 9.5 s")
            let runningAt = try #require(entries.first { $0.phase == "running-reported" })
            #expect(abs(runningAt.seconds - (firstRunning.at - given[0].at)) < 0.002, "a later running report does not move it")
            #expect(entries.first?.at.hasSuffix("Z") == true && entries.first?.at.contains(".") == true, "RFC 3339 with milliseconds")

            #expect(try await timeline("root").0 == .ok)
            let (hidden, nothing) = try await timeline("bob")
            #expect(hidden == .notFound)
            #expect(nothing.isEmpty)
        }
    }

    @Test("the console route shows the newest reported lines to those who see the instance, `lines` bounded")
    func console() async throws {
        let pool = try await TestPool.make()
        try await pool.app.test(.router) { client in
            _ = try await client.checkIn(pool, "rack-1")
            let instance = try serverInstance(try await client.createSmall(token: pool.token("alice")))
            let name = try #require(instance.hostname)
            let lines = (1...150).map { "line \($0)" }
            let report = InstanceReport(name: name, state: .suspended, consoleOutput: lines, error: "boot timed out")
            #expect(try await client.report(pool, "rack-1", report).status == .ok)

            func console(_ user: String, _ query: String = "") async throws -> (HTTPResponse.Status, ServerEnvelope<[String]>) {
                let response = try await client.v1(.get, "/v1/server-instance/\(instance.id)/console\(query)", token: pool.token(user))
                return (response.status, try JSONDecoder().decode(ServerEnvelope<[String]>.self, from: Data(response.body.readableBytesView)))
            }
            let (status, standard) = try await console("alice")
            #expect(status == .ok)
            #expect(standard.data == Array(lines.suffix(100)), "100 lines by default, oldest first")
            #expect(try await console("alice", "?lines=3").1.data == ["line 148", "line 149", "line 150"])
            #expect(try await console("root", "?lines=1000").1.data == lines)
            for bad in ["0", "1001", "abc", "-5"] {
                let (refused, envelope) = try await console("alice", "?lines=\(bad)")
                #expect(refused == .badRequest)
                #expect(envelope.msg == "query 'lines' must be a whole number from 1 to 1000, not '\(bad)'")
            }
            let (hidden, nothing) = try await console("bob")
            #expect(hidden == .notFound)
            #expect(nothing.data == nil)
            // The instance shows why it is ERROR.
            let shown = try await client.v1(.get, "/v1/server-instance/\(instance.id)", token: pool.token("alice"))
            let object = try #require(try JSONSerialization.jsonObject(with: Data(shown.body.readableBytesView)) as? [String: Any])
            let data = try #require((object["data"] as? [[String: Any]])?.first)
            #expect(data["status"] as? String == "ERROR")
            #expect(data["last-error"] as? String == "boot timed out")
        }
    }
}
