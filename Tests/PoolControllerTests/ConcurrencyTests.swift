import AsyncHTTPClient
import Foundation
import Hummingbird
import HummingbirdTesting
import NIOCore
import PoolAPI
import Testing

@testable import PoolController

@Suite("Many appliances at once over a loopback socket")
struct PoolConcurrencyTests {
    @Test("300 instances on 20 appliances reported by 600 concurrent tasks, plus contested names, leave consistent records")
    func manyReports() async throws {
        let (store, _) = try await makeStore()
        _ = try await store.addUser(name: "ops", superuser: true, maxInstances: 1000, tokenDigest: Token.digest("ops"))
        try await store.addImage(Image(name: "debian", url: "http://images.test/debian.qcow2"))
        try await store.addWisp(Wisp(name: "fallback", owner: "ops", image: "debian", isSystemDefault: true))
        var tokens: [String] = []
        for index in 0..<20 {
            let token = Token.generate()
            tokens.append(token)
            _ = try await store.addAppliance(name: "rack-\(index)", owner: "ops", tokenDigest: Token.digest(token))
        }
        let app = try buildPoolApplication(
            configuration: PoolConfiguration(host: "127.0.0.1", port: 0), store: store, logger: quietLogger)
        let http = HTTPClient(
            eventLoopGroup: HTTPClient.defaultEventLoopGroup,
            // 600 requests wait their turn for 32 connections: on a machine
            // loaded by the rest of the suite a turn took over AHC's default
            // 10 s (getConnectionFromPoolTimeout), so waiting is not bounded
            // tighter than the requests themselves. This test is about
            // consistent records, not latency.
            configuration: .init(
                timeout: .init(connect: .seconds(120)),
                connectionPool: .init(idleTimeout: .seconds(30), concurrentHTTP1ConnectionsPerHostSoftLimit: 32)))
        let allTokens = tokens
        let outcomes = try await app.test(.live) { client in
            let base = "http://127.0.0.1:\(try #require(client.port))"
            // A request that fails on the way is an outcome (status 0), not a
            // thrown error: one would end the test's server while the other
            // tasks are still connecting, and hide which request failed.
            @Sendable func post(_ path: String, _ body: some Encodable) async throws -> Int {
                var request = HTTPClientRequest(url: base + path)
                request.method = .POST
                request.body = .bytes(ByteBuffer(bytes: try JSONEncoder().encode(body)))
                do {
                    let response = try await http.execute(request, timeout: .seconds(120))
                    _ = try await response.body.collect(upTo: 1 << 20)
                    return Int(response.status.code)
                } catch {
                    Issue.record("POST \(path) failed on the way: \(error)")
                    return 0
                }
            }
            return try await withThrowingTaskGroup(of: (String, Int).self) { group in
                for (index, token) in allTokens.enumerated() {
                    for number in 0..<15 {
                        let name = "vm-\(index)-\(number)"
                        // Each instance: starting, then running, in order, in one task; two tasks per instance
                        // race on the same record with the same states.
                        for _ in 0..<2 {
                            group.addTask {
                                for state in [InstanceState.starting, .running] {
                                    let report = InstanceReportRequest(
                                        appliance: ApplianceBlock(apitoken: token),
                                        instance: InstanceReport(name: name, state: state, consoleOutput: ["\(name) \(state)"]))
                                    let status = try await post("/api/v1/instances/\(name)/", report)
                                    guard status == 200 else { return ("report \(name)", status) }
                                }
                                return ("report", 200)
                            }
                        }
                    }
                    // Every appliance also checks in, and contests five names with all the others.
                    group.addTask {
                        let stats = HypervisorStats(
                            vcpus: Capacity(total: 8, free: 8), memoryMiB: Capacity(total: 1024, free: 1024),
                            diskGiB: Capacity(total: 10, free: 10), running: 0)
                        let summary = (0..<5).map { InstanceSummary(name: "contested-\($0)", state: .onOffer) }
                        return ("check-in", try await post("/api/v1/broker/", CheckInRequest(appliance: ApplianceBlock(apitoken: token), stats: stats, instances: summary)))
                    }
                    for contested in 0..<5 {
                        group.addTask {
                            let report = InstanceReportRequest(
                                appliance: ApplianceBlock(apitoken: token), instance: InstanceReport(name: "contested-\(contested)", state: .onOffer))
                            return ("contested", try await post("/api/v1/instances/contested-\(contested)/", report))
                        }
                    }
                }
                return try await group.reduce(into: [(String, Int)]()) { $0.append($1) }
            }
        }
        try await http.shutdown()

        #expect(outcomes.filter { $0.0 == "report" }.count == 600)
        #expect(outcomes.filter { $0.0.hasPrefix("report ") }.isEmpty, "\(outcomes.filter { $0.0.hasPrefix("report ") }.prefix(5))")
        #expect(outcomes.filter { $0.0 == "check-in" }.allSatisfy { $0.1 == 200 })
        // A contested name belongs to exactly one appliance: its reports are 200, the others' 403.
        let contested = outcomes.filter { $0.0 == "contested" }.map(\.1)
        #expect(contested.count == 100)
        #expect(Set(contested).isSubset(of: [200, 403]))
        #expect(contested.filter { $0 == 200 }.count == 5)  // each name's owner reports it once

        let instances = try await store.instances()
        #expect(instances.count == 305)
        for instance in instances where instance.name.hasPrefix("vm-") {
            let parts = instance.name.split(separator: "-")
            #expect(instance.appliance == "rack-\(parts[1])", "\(instance.name)")
            #expect(instance.state == .running, "\(instance.name)")
            #expect(instance.consoleTail == ["\(instance.name) running"], "\(instance.name)")
        }
        let owners = instances.filter { $0.name.hasPrefix("contested-") }
        #expect(owners.count == 5)
        #expect(owners.allSatisfy { $0.state == .onOffer })
        let appliances = try await store.appliances()
        #expect(appliances.allSatisfy { $0.lastSeen != nil && $0.stats != nil })
    }
}
