import AsyncHTTPClient
import Foundation
import Hummingbird
import HummingbirdTesting
import PoolAPI
import Testing
import TestSupport

@testable import PoolController

@Suite("Prometheus metrics")
struct MetricsTests {
    @Test("/metrics counts what the pool did, as Prometheus' own parser reads it; superusers only unless configured otherwise")
    func poolMetrics() async throws {
        let pool = try await TestPool.make()
        let rack1 = pool.token("rack-1")
        let stats = #"{"vcpus": {"total": 8, "free": 6}, "memory_mib": {"total": 16384, "free": 8192}, "disk_gib": {"total": 100, "free": 50}, "running": 1}"#
        let exposition = try await LoopbackClient.withClient { http in
            try await pool.app.test(.live) { client in
                let api = LoopbackClient(base: "http://127.0.0.1:\(try #require(client.port))", http: http)
                let (checkedIn, _) = try await api.send(
                    .POST, "/api/v1/broker/", token: nil,
                    body: #"{"appliance": {"apitoken": "\#(rack1)"}, "stats": \#(stats), "instances": []}"#)
                #expect(checkedIn == 200)
                // alice may have 2: two placements, then a refusal at her limit.
                var statuses: [Int] = []
                for _ in 0..<3 {
                    statuses.append(
                        try await api.send(
                            .POST, "/v1/server-instance", token: pool.token("alice"),
                            body: #"{"server-image": "debian", "server-flavor": "small"}"#
                        ).0)
                }
                #expect(statuses == [201, 201, 409])
                // rack-1 reports one of them running, with a launch phase.
                let placed = try #require(try await pool.store.instances().first { $0.owner == "alice" })
                let report = #"{"appliance": {"apitoken": "\#(rack1)"}, "instance": {"name": "\#(placed.name)", "state": 4, "timeline": [{"phase": "domain-started", "at": \#(placed.createdAt.timeIntervalSince1970 + 1.5)}]}}"#
                #expect(try await api.send(.POST, "/api/v1/instances/\(placed.name)/", token: nil, body: report).0 == 200)

                #expect(try await api.send(.GET, "/metrics", token: nil).0 == 401)
                #expect(try await api.send(.GET, "/metrics", token: pool.token("alice")).0 == 403)
                let (status, body) = try await api.send(.GET, "/metrics", token: pool.token("root"))
                #expect(status == 200)
                return String(decoding: body, as: UTF8.self)
            }
        }
        let samples = try await parsePrometheusText(exposition)
        #expect(samples.value("corral_pool_check_ins_total") == 1)
        #expect(samples.value("corral_pool_held_check_ins") == 0)
        #expect(samples.value("corral_pool_event_watchers") == 0)
        #expect(samples.value("corral_pool_placements_total", ["kind": "cold"]) == 2)
        #expect(samples.value("corral_pool_placement_refusals_total", ["reason": "limit"]) == 1)
        let created = ["route": "/v1/server-instance", "method": "POST"]
        #expect(samples.value("corral_pool_http_requests_total", created.merging(["status": "201"]) { $1 }) == 2, "\(exposition)")
        #expect(samples.value("corral_pool_http_requests_total", created.merging(["status": "409"]) { $1 }) == 1)
        #expect(samples.value("corral_pool_http_request_duration_seconds_count", created) == 3)
        #expect(samples.value("corral_pool_http_requests_total", ["route": "/metrics", "method": "GET", "status": "401"]) == 1)
        #expect(samples.value("corral_pool_launch_phase_seconds_count", ["phase": "domain-started"]) == 1)
        let phaseSum = try #require(samples.value("corral_pool_launch_phase_seconds_sum", ["phase": "domain-started"]))
        #expect(abs(phaseSum - 1.5) < 0.01)
        #expect(samples.value("corral_pool_launch_phase_seconds_bucket", ["phase": "domain-started", "le": "1.0"]) == 0)
        #expect(samples.value("corral_pool_launch_phase_seconds_bucket", ["phase": "domain-started", "le": "2.0"]) == 1)
        #expect(samples.value("corral_pool_instances", ["state": "running"]) == 1)
        #expect(samples.value("corral_pool_instances", ["state": "leased"]) == 1)
        #expect(samples.value("corral_pool_instances", ["state": "suspended"]) == 0)
        #expect(samples.value("corral_pool_appliances", ["freshness": "fresh"]) == 1)
        #expect(samples.value("corral_pool_appliance_vcpus", ["appliance": "rack-1", "kind": "total"]) == 8)
        #expect(samples.value("corral_pool_appliance_vcpus", ["appliance": "rack-1", "kind": "free"]) == 6)
        #expect(samples.value("corral_pool_appliance_memory_mib", ["appliance": "rack-1", "kind": "total"]) == 16384)
        #expect(samples.contains { $0.family == "corral_pool_http_request_duration_seconds" && $0.type == "histogram" })
    }

    @Test("with [metrics] require_token = false, anyone who reaches the pool may scrape it")
    func openMetrics() async throws {
        let pool = try await TestPool.make { $0.metricsRequireToken = false }
        try await pool.app.test(.router) { client in
            let response = try await client.execute(uri: "/metrics", method: .get) { $0 }
            #expect(response.status == .ok)
            #expect(response.headers[.contentType] == "text/plain; version=0.0.4; charset=utf-8")
            let samples = try await parsePrometheusText(String(decoding: Data(response.body.readableBytesView), as: UTF8.self))
            #expect(samples.value("corral_pool_appliances", ["freshness": "stale"]) == 2, "rack-1 and rack-2 never checked in")
        }
        let configured = try PoolConfiguration.parse("[metrics]\nrequire_token = false\n")
        #expect(configured.metricsRequireToken == false)
        #expect(try PoolConfiguration.parse("").metricsRequireToken == true)
    }
}
