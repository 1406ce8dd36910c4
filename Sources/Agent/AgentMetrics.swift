import Foundation
import GRDB
import Hummingbird
import Libvirt
import Logging
import Prometheus

/// The agent's Prometheus metrics, served at `GET /metrics` on
/// `[metrics] listen`: builds in flight and their steps' durations, the
/// image cache (bytes, hits, misses), this agent's domains by libvirt
/// state, the report outbox (depth, age of the oldest) and check-in round
/// trips. Label values come from closed sets (steps, states, results).
public final class AgentMetrics: Sendable {
    let registry = PrometheusCollectorRegistry()
    let buildsInFlight: Gauge
    let cacheHits: Counter
    let cacheMisses: Counter

    static let stepBuckets: [Duration] = [
        .milliseconds(10), .milliseconds(50), .milliseconds(100), .milliseconds(250), .milliseconds(500), .seconds(1),
        .seconds(2.5), .seconds(5), .seconds(10), .seconds(30), .seconds(60), .seconds(300), .seconds(900), .seconds(3600),
    ]
    static let checkInBuckets: [Duration] = [
        .milliseconds(5), .milliseconds(10), .milliseconds(25), .milliseconds(50), .milliseconds(100), .milliseconds(250),
        .milliseconds(500), .seconds(1), .seconds(2.5), .seconds(5), .seconds(10), .seconds(30), .seconds(60),
    ]

    public init() {
        buildsInFlight = registry.makeGauge(descriptor: Self.name("builds_in_flight", "", "Instance builds running now."))
        cacheHits = registry.makeCounter(
            descriptor: Self.name("image_cache_hits", "total", "Image files found in the cache when a build asked for them."))
        cacheMisses = registry.makeCounter(
            descriptor: Self.name("image_cache_misses", "total", "Image files a build had to download."))
    }

    static func name(_ metric: String, _ unit: String, _ help: String) -> MetricNameDescriptor {
        MetricNameDescriptor(namespace: "corral", subsystem: "agent", metricName: metric, unitName: unit, helpText: help)
    }

    /// One step of a build: `image`, `disk`, `seed`, `define` or `start`.
    func buildStep(_ step: String, _ duration: Duration) {
        registry.makeDurationHistogram(
            descriptor: Self.name("build_step_duration", "seconds", "Time each build step took."),
            labels: [("step", step)], buckets: Self.stepBuckets
        ).record(duration)
    }

    /// One check-in round trip (a held one included), by result (`ok`, `error`).
    func checkIn(_ duration: Duration, ok: Bool) {
        registry.makeDurationHistogram(
            descriptor: Self.name("check_in_duration", "seconds", "Check-in round trips to the pool (held ones last until an action or the period ends)."),
            labels: [("result", ok ? "ok" : "error")], buckets: Self.checkInBuckets
        ).record(duration)
    }

    /// The exposition: the gauges read now (libvirt, the state, the cache), then every metric.
    func render(store: AgentStore, connection: Connection) async -> String {
        let instances = Set(((try? await store.instances()) ?? []).compactMap { UUID(uuidString: $0.uuid) })
        var byState: [String: Int] = [:]
        for state in ["running", "paused", "shut off", "crashed", "other"] { byState[state] = 0 }
        for domain in (try? await connection.domains()) ?? [] where instances.contains(domain.uuid) {
            let state: String
            switch try? await domain.state() {
            case .running: state = "running"
            case .paused: state = "paused"
            case .shutoff: state = "shut off"
            case .crashed: state = "crashed"
            default: state = "other"
            }
            byState[state, default: 0] += 1
        }
        for (state, count) in byState {
            registry.makeGauge(
                descriptor: Self.name("domains", "", "This agent's instances' libvirt domains, by state."), labels: [("state", state)]
            ).set(Double(count))
        }
        let outbox = (try? await store.outboxSummary()) ?? (count: 0, oldest: nil)
        registry.makeGauge(descriptor: Self.name("outbox_reports", "", "Reports waiting for the pool to take them.")).set(Double(outbox.count))
        registry.makeGauge(
            descriptor: Self.name("outbox_oldest_age", "seconds", "Age of the oldest report waiting (0 when none).")
        ).set(outbox.oldest.map { max(0, Date().timeIntervalSince($0)) } ?? 0)
        registry.makeGauge(descriptor: Self.name("image_cache", "bytes", "Bytes of the image files in the cache."))
            .set(Double((try? await store.cachedBytes()) ?? 0))
        return registry.emitToString()
    }

    /// Serves `GET /metrics` at `host`:`port` until cancelled; `onListening`
    /// gets the bound port.
    func serve(
        host: String, port: Int, store: AgentStore, connection: Connection, logger: Logger,
        onListening: @escaping @Sendable (Int) async -> Void
    ) async throws {
        let router = Router()
        router.get("metrics") { _, _ in
            Response(
                status: .ok, headers: [.contentType: "text/plain; version=0.0.4; charset=utf-8"],
                body: .init(byteBuffer: ByteBuffer(string: await self.render(store: store, connection: connection))))
        }
        let app = Application(
            router: router, configuration: .init(address: .hostname(host, port: port), serverName: "corral-agent"),
            onServerRunning: { channel in await onListening(channel.localAddress?.port ?? port) }, logger: logger)
        try await app.runService()
    }
}

extension AgentStore {
    /// How many reports wait in the outbox, and when the oldest was made.
    func outboxSummary() async throws -> (count: Int, oldest: Date?) {
        try await database.read { db in
            let count = try Int.fetchOne(db, sql: "SELECT COUNT(*) FROM outbox") ?? 0
            let oldest = try Date.fetchOne(db, sql: "SELECT createdAt FROM outbox ORDER BY sequence LIMIT 1")
            return (count, oldest)
        }
    }

    /// The bytes of every cached image file.
    func cachedBytes() async throws -> Int64 {
        try await database.read { db in try Int64.fetchOne(db, sql: "SELECT COALESCE(SUM(bytes), 0) FROM cachedFile") ?? 0 }
    }
}
