import AsyncHTTPClient
import Foundation
import HTTPTypes
import Hummingbird
import HummingbirdTesting
import NIOCore
import NIOHTTP1
import PoolAPI
import Testing

@testable import PoolController

/// Free room for a check-in: `vcpus` free of 8, `memory` MiB free of 16 GiB, 50 GiB disk.
func stats(vcpus: Int, memory: Int) -> HypervisorStats {
    HypervisorStats(
        vcpus: Capacity(total: 8, free: vcpus), memoryMiB: Capacity(total: 16384, free: memory), diskGiB: Capacity(total: 100, free: 50),
        running: 0)
}

extension TestPool {
    /// Records a check-in of `appliance` straight in the store, with room for 8 vCPUs and 16000 MiB.
    func checkInRoomy(_ appliance: String, at date: Date) async throws -> RecordedCheckIn {
        try await store.checkIn(appliance, request: CheckInRequest(appliance: .init(apitoken: ""), stats: stats(vcpus: 8, memory: 16000)), maxInstances: 1000, at: date)
    }
}

/// Loopback HTTP for the concurrency claims: real sockets, real parallel requests.
struct LoopbackClient {
    let base: String
    let http: HTTPClient

    /// Sends a request; returns the status and body.
    func send(_ method: HTTPMethod, _ path: String, token: String?, body: String? = nil) async throws -> (Int, Data) {
        var request = HTTPClientRequest(url: base + path)
        request.method = method
        if let token { request.headers.add(name: "X-Auth-Token", value: token) }
        if let body { request.body = .bytes(ByteBuffer(string: body)) }
        let response = try await http.execute(request, timeout: .seconds(60))
        let bytes = try await response.body.collect(upTo: 1 << 20)
        return (Int(response.status.code), Data(bytes.readableBytesView))
    }

    static func withClient<T: Sendable>(_ body: (HTTPClient) async throws -> T) async throws -> T {
        let http = HTTPClient(
            eventLoopGroup: HTTPClient.defaultEventLoopGroup,
            // The connect timeout also bounds the wait for a pooled connection,
            // which hundreds of queued requests on a loaded machine exceed at AHC's 10 s.
            configuration: .init(
                timeout: .init(connect: .seconds(120), read: .seconds(120)),
                connectionPool: .init(idleTimeout: .seconds(30), concurrentHTTP1ConnectionsPerHostSoftLimit: 64)))
        do {
            let result = try await body(http)
            try await http.shutdown()
            return result
        } catch {
            try? await http.shutdown()
            throw error
        }
    }
}

@Suite("Placement, limits and warm pools")
struct PlacementTests {
    @Test("with no room, the 503 names each enabled appliance not counted: never checked in, or stale since when")
    func waitingForAppliances() async throws {
        let pool = try await TestPool.make()
        _ = try await pool.store.addAppliance(name: "rack-3", owner: "root", tokenDigest: Token.digest(Token.generate()))
        _ = try await pool.store.setAppliance("rack-3", enabled: false)
        // rack-1 checked in an hour ago (a pool database left from an earlier run); rack-2 never.
        _ = try await pool.checkInRoomy("rack-1", at: Date().addingTimeInterval(-3600))
        try await pool.app.test(.router) { client in
            let response = try await client.createSmall(token: pool.token("root"))
            let (status, message) = try v1Refusal(response)
            #expect(status == .serviceUnavailable)
            // "3600 s ago", give or take the seconds a loaded machine takes.
            let seconds = message.firstMatch(of: /last seen (\d+) s ago/).flatMap { Int($0.1) } ?? -1
            #expect((3600...3630).contains(seconds), "\(message)")
            let seen = message.replacingOccurrences(of: "last seen \(seconds) s ago", with: "last seen 3600 s ago")
            #expect(
                seen
                    == "no appliance has room for flavor 'small' (1 vCPUs, 512 MiB, 5 GiB): appliance 'rack-1' was last seen 3600 s ago (stale after 300 s); appliance 'rack-2' has not checked in yet; try again once it has checked in"
            )
            #expect(try await pool.store.instances().isEmpty, "a refused placement stores nothing")
            // Once rack-2 has checked in, the same request is placed there.
            _ = try await client.checkIn(pool, "rack-2")
            #expect(try await client.createSmall(token: pool.token("root")).status == .created)
        }
    }

    @Test("placement takes the enabled, fresh appliance with the most room left, spreads, and says 503 when none has room")
    func placement() async throws {
        let pool = try await TestPool.make()
        for name in ["rack-3", "rack-4"] {
            _ = try await pool.store.addAppliance(name: name, owner: "root", tokenDigest: Token.digest(Token.generate()))
        }
        // rack-3 would have the most room, but is disabled; rack-4 too, but it is stale.
        let old = Date().addingTimeInterval(-3600)
        _ = try await pool.checkInRoomy("rack-3", at: Date())
        _ = try await pool.store.setAppliance("rack-3", enabled: false)
        _ = try await pool.checkInRoomy("rack-4", at: old)
        try await pool.app.test(.router) { client in
            // rack-1: 2 vCPUs and 2 GiB free; rack-2: 4 vCPUs and 4 GiB free.
            _ = try await client.execute(
                uri: "/api/v1/broker/", method: .post, body: try pool.checkInBody("rack-1", stats: stats(vcpus: 2, memory: 2048))) { _ in }
            _ = try await client.execute(
                uri: "/api/v1/broker/", method: .post, body: try pool.checkInBody("rack-2", stats: stats(vcpus: 4, memory: 4096))) { _ in }
            var placed: [String] = []
            for _ in 0..<6 {
                let response = try await client.createSmall(token: pool.token("root"))
                #expect(response.status == .created, "\(String(buffer: response.body))")
                let name = try #require(try serverInstance(response).hostname)
                placed.append(try #require(try await pool.store.instance(id: name)).appliance)
            }
            // Most memory left first: rack-2 until it has no more than rack-1, then in turn, until vCPUs run out.
            #expect(placed == ["rack-2", "rack-2", "rack-2", "rack-1", "rack-2", "rack-1"])
            let full = try await client.createSmall(token: pool.token("root"))
            let (status, message) = try v1Refusal(full)
            #expect(status == .serviceUnavailable)
            #expect(message.hasPrefix("no appliance has room for flavor 'small' (1 vCPUs, 512 MiB, 5 GiB)"))
            #expect(try await pool.store.instances().count == 6, "a refused placement stores nothing")

            // Once rack-1 acknowledges its starts and reports room again, it takes more.
            let actions = try await client.checkIn(pool, "rack-1")
            _ = try await client.execute(
                uri: "/api/v1/broker/", method: .post,
                body: try pool.checkInBody("rack-1", done: actions.map(\.id), stats: stats(vcpus: 1, memory: 1024))) { _ in }
            let again = try await client.createSmall(token: pool.token("root"))
            #expect(again.status == .created)
            #expect(try await pool.store.instance(id: try #require(try serverInstance(again).hostname))?.appliance == "rack-1")
        }
    }

    @Test("50 concurrent creates over loopback from a user with room for 3 make exactly 3 instances")
    func limitUnderConcurrency() async throws {
        let pool = try await TestPool.make()
        let token = Token.generate()
        _ = try await pool.store.addUser(name: "eve", superuser: false, maxInstances: 3, tokenDigest: Token.digest(token))
        for appliance in ["rack-1", "rack-2"] {
            _ = try await pool.checkInRoomy(appliance, at: Date())
        }
        let statuses = try await LoopbackClient.withClient { http in
            try await pool.app.test(.live) { client in
                let api = LoopbackClient(base: "http://127.0.0.1:\(try #require(client.port))", http: http)
                return try await withThrowingTaskGroup(of: Int.self) { group in
                    for _ in 0..<50 {
                        group.addTask {
                            try await api.send(.POST, "/v1/server-instance", token: token, body: #"{"server-image": "debian", "server-flavor": "small"}"#).0
                        }
                    }
                    return try await group.reduce(into: [Int]()) { $0.append($1) }
                }
            }
        }
        #expect(statuses.filter { $0 == 201 }.count == 3)
        #expect(statuses.filter { $0 == 409 }.count == 47)
        #expect(try await pool.store.instances().filter { $0.owner == "eve" }.count == 3)
    }

    @Test("a template's warm instances: kept filled, each handed to one user under concurrency, replaced, retired, dropped")
    func warmPools() async throws {
        let began = Date().timeIntervalSince1970
        let pool = try await TestPool.make()
        try await pool.store.addTemplate(Template(name: "web", wisp: "bob-web", flavor: "small", hotStarts: 2))
        for appliance in ["rack-1", "rack-2"] {
            _ = try await pool.checkInRoomy(appliance, at: Date())
        }
        let staleAfter = pool.configuration.housekeeping.applianceStaleSeconds
        let first = try await pool.store.maintainWarmPools(maxAgeSeconds: 14_400, applianceStaleAfter: staleAfter, at: Date())
        #expect(first.started.count == 2)
        #expect(first.started.allSatisfy { $0.warm && $0.owner == "bob" && $0.template == "web" && $0.state == .leased })
        #expect(Set(first.started.map(\.appliance)) == ["rack-1", "rack-2"], "spread")
        // Filled: a second pass starts nothing.
        #expect(try await pool.store.maintainWarmPools(maxAgeSeconds: 14_400, applianceStaleAfter: staleAfter, at: Date()).started.isEmpty)

        var tokens: [String] = []
        for index in 0..<10 {
            let token = Token.generate()
            tokens.append(token)
            _ = try await pool.store.addUser(name: "user-\(index)", superuser: false, maxInstances: 1, tokenDigest: Token.digest(token))
        }
        let warmNames = Set(first.started.map(\.name))
        let userTokens = tokens
        try await LoopbackClient.withClient { http in
            try await pool.app.test(.live) { client in
                let api = LoopbackClient(base: "http://127.0.0.1:\(try #require(client.port))", http: http)
                // Not ready until reported running: a launch now gets a new instance, and warm ones stay warm.
                let (coldStatus, coldBody) = try await api.send(.POST, "/api/stream/web", token: pool.token("alice"))
                #expect(coldStatus == 201)
                let cold = try JSONDecoder().decode(Envelope<ServerInstance>.self, from: coldBody).result
                #expect(cold.map { !warmNames.contains($0.hostname ?? "") } == true)
                // Nor when running until its SSH server answered (the first boot
                // would race the hand-out's keys).
                func reportRunning(timeline: [TimelineEntry]?) async throws {
                    for instance in first.started {
                        let report = InstanceReportRequest(
                            appliance: ApplianceBlock(apitoken: pool.token(instance.appliance)),
                            instance: InstanceReport(name: instance.name, state: .running, timeline: timeline))
                        let (status, _) = try await api.send(
                            .POST, "/api/v1/instances/\(instance.name)/", token: nil,
                            body: String(decoding: try JSONEncoder().encode(report), as: UTF8.self))
                        #expect(status == 200)
                    }
                }
                try await reportRunning(timeline: nil)
                let (booting, bootingBody) = try await api.send(.POST, "/api/stream/web", token: pool.token("alice"))
                #expect(booting == 201)
                let stillCold = try JSONDecoder().decode(Envelope<ServerInstance>.self, from: bootingBody).result
                #expect(stillCold.map { !warmNames.contains($0.hostname ?? "") } == true)
                try await reportRunning(timeline: [TimelineEntry(phase: .sshReachable, at: Date(), detail: "127.0.0.1 port 22001")])
                // Ten users at once: each warm instance goes to exactly one of them.
                let replies = try await withThrowingTaskGroup(of: (String, Int, ServerInstance?).self) { group in
                    for (index, token) in userTokens.enumerated() {
                        group.addTask {
                            let (status, body) = try await api.send(.POST, "/api/stream/web?token=\(token)&topic=ai", token: nil)
                            return ("user-\(index)", status, try? JSONDecoder().decode(Envelope<ServerInstance>.self, from: body).result)
                        }
                    }
                    return try await group.reduce(into: [(String, Int, ServerInstance?)]()) { $0.append($1) }
                }
                #expect(replies.allSatisfy { $0.1 == 201 }, "\(replies.map(\.1))")
                let handed = replies.filter { warmNames.contains($0.2?.hostname ?? "") }
                #expect(handed.count == 2)
                #expect(Set(handed.compactMap { $0.2?.hostname }) == warmNames, "each warm instance to one user")
                #expect(Set(replies.compactMap { $0.2?.id }).count == 10, "no instance given twice")
                for (user, _, instance) in handed {
                    let id = try #require(instance?.id)
                    let stored = try #require(try await pool.store.instance(id: id))
                    #expect(stored.owner == user)
                    #expect(!stored.warm)
                    #expect(stored.topic == "ai")
                    // BUILD to the new owner until the guest holds their keys.
                    #expect(instance?.status == "BUILD")
                    #expect(stored.rekeying)
                }
            }
        }
        // The handed-out instances get their lease, and their new owner's keys
        // (these users have none: the template owner's are dropped all the same).
        let pending = try await pool.checkInRoomy("rack-1", at: Date()).actions
            + pool.checkInRoomy("rack-2", at: Date()).actions
        let leases = pending.filter { $0.kind == .lease }
        #expect(Set(leases.map(\.instance)) == warmNames)
        let rekeys = pending.filter { $0.kind == .keys }
        #expect(Set(rekeys.map(\.instance)) == warmNames)
        #expect(rekeys.allSatisfy { $0.keys == [] && $0.user == "debian" && $0.run == nil }, "\(rekeys)")
        for action in rekeys {
            let stored = try #require(try await pool.store.instances().first { $0.name == action.instance })
            _ = try await pool.store.recordReport(
                InstanceReport(name: action.instance, state: .running, keysApplied: action.id), appliance: stored.appliance,
                consoleLimit: 10, maxInstances: 1000, at: Date())
            let now = try #require(try await pool.store.instances().first { $0.name == action.instance })
            #expect(!now.rekeying)
            #expect(ServerInstance.status(of: now) == "ACTIVE")
        }
        // A week from the hand-out, which happened since the test began.
        let latest = Date().timeIntervalSince1970 + 7 * 86_400
        #expect(leases.allSatisfy { ((began + 7 * 86_400 - 1)...(latest + 1)).contains(Double($0.expires ?? 0)) })

        // Replacements, then retirement after 4 hours, and a failed one dropped.
        // (The live pool's warm-pool service may have started some already, woken by the launches.)
        _ = try await pool.store.maintainWarmPools(maxAgeSeconds: 14_400, applianceStaleAfter: staleAfter, at: Date())
        let refilled = try await pool.store.instances().filter { $0.warm && $0.state == .leased }
        #expect(refilled.count == 2)
        #expect(Set(refilled.map(\.name)).isDisjoint(with: warmNames))
        let failed = try #require(refilled.first)
        _ = try await pool.store.recordReport(
            InstanceReport(name: failed.name, state: .suspended, error: "image: checksum mismatch"), appliance: failed.appliance,
            consoleLimit: 10, maxInstances: 1000, at: Date())
        let later = Date().addingTimeInterval(5 * 3600)
        for appliance in ["rack-1", "rack-2"] {
            _ = try await pool.checkInRoomy(appliance, at: later)
        }
        let aged = try await pool.store.maintainWarmPools(maxAgeSeconds: 14_400, applianceStaleAfter: staleAfter, at: later)
        #expect(Set(aged.retired + aged.dropped) == Set(refilled.map(\.name)))
        #expect(aged.dropped == [failed.name])
        #expect(aged.retired == [refilled[1].name])
        #expect(aged.started.count == 2, "retired ones are replaced")
        let deletes = try await pool.checkInRoomy(failed.appliance, at: later).actions.filter { $0.kind == .delete }
        #expect(deletes.contains { $0.instance == failed.name })
        // Warm instances are the pool's, not their wisp owner's: bob does not see or count them.
        let bob = try #require(try await pool.store.users().first { $0.name == "bob" })
        let visible = try await pool.store.instances().filter { ServerInstanceRoutes.sees(bob, $0, managed: []) }
        #expect(visible.allSatisfy { !$0.warm })
    }

    @Test("a warm instance whose first boot finished is handed out before an older one whose SSH server merely answers")
    func settledWarmFirst() async throws {
        let pool = try await TestPool.make()
        try await pool.store.addTemplate(Template(name: "web", wisp: "bob-web", flavor: "small", hotStarts: 2))
        _ = try await pool.checkInRoomy("rack-1", at: Date())
        let staleAfter = pool.configuration.housekeeping.applianceStaleSeconds
        let started = try await pool.store.maintainWarmPools(maxAgeSeconds: 14_400, applianceStaleAfter: staleAfter, at: Date()).started
        #expect(started.count == 2)
        let sorted = try await pool.store.instances().filter(\.warm).sorted { $0.createdAt < $1.createdAt || ($0.createdAt == $1.createdAt && $0.name < $1.name) }
        let (older, newer) = (try #require(sorted.first), try #require(sorted.last))
        #expect(older.name != newer.name)
        // The older one: SSH answers, cloud-init still running. The newer one: settled.
        for (instance, phases) in [(older, [LaunchPhase.sshReachable]), (newer, [.sshReachable, .postCreateDone])] {
            _ = try await pool.store.recordReport(
                InstanceReport(
                    name: instance.name, state: .running,
                    timeline: phases.map { TimelineEntry(phase: $0, at: Date(), detail: $0 == .sshReachable ? "127.0.0.1 port 22001" : "") }),
                appliance: "rack-1", consoleLimit: 10, maxInstances: 1000, at: Date())
        }
        let handed = try await pool.store.createInstance(
            InstanceRequest(owner: "alice", template: "web"), defaultLeaseSeconds: 3600, applianceStaleAfter: staleAfter, at: Date())
        #expect(handed.name == newer.name, "the settled one, not the older one still booting")
        let next = try await pool.store.createInstance(
            InstanceRequest(owner: "alice", template: "web"), defaultLeaseSeconds: 3600, applianceStaleAfter: staleAfter, at: Date())
        #expect(next.name == older.name, "a booting warm instance still beats a cold launch")
    }

    @Test("token launch API: 402 without a valid token, 403 non-preemptible for users, 404 unknown template, 409 at the limit, region")
    func tokenLaunch() async throws {
        let pool = try await TestPool.make()
        try await pool.store.addTemplate(Template(name: "web", wisp: "bob-web", flavor: "small"))
        _ = try await pool.store.setAppliance("rack-1", region: "eu")
        _ = try await pool.store.setAppliance("rack-2", region: "us")
        try await pool.app.test(.router) { client in
            _ = try await client.checkIn(pool, "rack-1")
            _ = try await client.checkIn(pool, "rack-2")
            func launch(_ query: String) async throws -> TestResponse {
                try await client.execute(uri: "/api/stream/" + query, method: .post) { $0 }
            }
            for query in ["web", "web?token=", "web?token=wrong"] {
                let response = try await launch(query)
                #expect(response.status.code == 402)
                #expect(try decodeEnvelope(NoResult.self, response).message == "must include [token] with a valid token")
                #expect(try decodeEnvelope(NoResult.self, response).response == .fail)
            }
            let alice = pool.token("alice")
            #expect(try refusal(try await launch("nope?token=\(alice)")) == (.notFound, "template 'nope' does not exist on this pool"))
            #expect(try refusal(try await launch("web?token=\(alice)&preemptible=0")) == (.forbidden, "token may not create non-preemptible instance"))
            #expect(try refusal(try await launch("web?token=\(alice)&preemptible=maybe")).0 == .badRequest)
            #expect(try refusal(try await launch("web?token=\(alice)&region=mars")).0 == .serviceUnavailable)

            let inUS = try await launch("web?token=\(alice)&region=us")
            #expect(inUS.status == .created)
            let instance = try #require(try decodeEnvelope(ServerInstance.self, inUS).result)
            #expect(try await pool.store.instance(id: instance.id)?.appliance == "rack-2")
            #expect(try await pool.store.instance(id: instance.id)?.preemptible == true)
            _ = try await launch("web?token=\(alice)&region=any")
            let (status, message) = try refusal(try await launch("web?token=\(alice)"))
            #expect(status == .conflict)
            #expect(message.hasPrefix("max instances reached for provided token"))

            let root = try await launch("web?token=\(pool.token("root"))&preemptible=false")
            #expect(root.status == .created)
            let kept = try #require(try decodeEnvelope(ServerInstance.self, root).result)
            #expect(try await pool.store.instance(id: kept.id)?.preemptible == false)
        }
        #expect(RedactingLogRequestsMiddleware<BasicRequestContext>.redacted(path: "/api/stream/web", query: "region=eu&token=secret&topic=ai")
            == "/api/stream/web?region=eu&token=REDACTED&topic=ai")
    }
}
