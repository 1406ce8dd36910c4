import Foundation
import Hummingbird
import PoolAPI
import Prometheus
import Synchronization

/// The pool's Prometheus metrics, served at `GET /metrics` in the text
/// exposition format. One registry per pool application (not the process's
/// global metrics system), so pools built side by side in one process keep
/// their own numbers. Every label value comes from a closed set (routes as
/// declared, methods, statuses, states, phases, reasons) or from stored
/// appliance names, never from a raw request path.
public final class PoolMetrics: Sendable {
    let registry = PrometheusCollectorRegistry()
    private let checkIns: Counter
    let heldCheckIns: Gauge
    private let watchers: Gauge
    /// Appliances whose capacity gauges the last scrape set, to drop the
    /// gauges of appliances removed since.
    private let exportedAppliances = Mutex<Set<String>>([])

    static let requestBuckets: [Duration] = [
        .milliseconds(5), .milliseconds(10), .milliseconds(25), .milliseconds(50), .milliseconds(100), .milliseconds(250),
        .milliseconds(500), .seconds(1), .seconds(2.5), .seconds(5), .seconds(10), .seconds(30), .seconds(60), .seconds(120),
    ]
    static let phaseBuckets: [Duration] = [
        .milliseconds(100), .milliseconds(500), .seconds(1), .seconds(2), .seconds(5), .seconds(10), .seconds(20), .seconds(30),
        .seconds(60), .seconds(120), .seconds(300), .seconds(600), .seconds(1800),
    ]

    public init() {
        checkIns = registry.makeCounter(descriptor: Self.name("check_ins", "total", "Appliance check-ins answered."))
        heldCheckIns = registry.makeGauge(descriptor: Self.name("held_check_ins", "", "Check-ins held open now, waiting for an action."))
        watchers = registry.makeGauge(descriptor: Self.name("event_watchers", "", "Event streams (GET /api/v1/events) connected now."))
    }

    static func name(_ metric: String, _ unit: String, _ help: String) -> MetricNameDescriptor {
        MetricNameDescriptor(namespace: "corral", subsystem: "pool", metricName: metric, unitName: unit, helpText: help)
    }

    /// One answered request: `route` is the declared route (`/v1/server-instance/:id`), or `unmatched`.
    func request(route: String, method: String, status: Int, duration: Duration) {
        registry.makeCounter(
            descriptor: Self.name("http_requests", "total", "HTTP requests answered, by route, method and status."),
            labels: [("route", route), ("method", method), ("status", String(status))]
        ).increment()
        registry.makeDurationHistogram(
            descriptor: Self.name("http_request_duration", "seconds", "Time to answer HTTP requests (held check-ins included), by route and method."),
            labels: [("route", route), ("method", method)], buckets: Self.requestBuckets
        ).record(duration)
    }

    func checkIn() { checkIns.increment() }

    /// An instance created: `warm` when a warm instance was handed out.
    func placement(warm: Bool) {
        registry.makeCounter(
            descriptor: Self.name("placements", "total", "Instances created for users, by kind (a warm hand-out or a cold placement)."),
            labels: [("kind", warm ? "warm" : "cold")]
        ).increment()
    }

    /// A create refused by the store.
    func refusal(_ error: PoolError) {
        let reason =
            switch error {
            case .conflict: "limit"
            case .unavailable: "no_room"
            case .invalid: "invalid"
            case .notFound: "not_found"
            case .forbidden: "forbidden"
            case .tooMany: "too_many"
            case .alreadyExists: "exists"
            case .storage: "storage"
            }
        registry.makeCounter(
            descriptor: Self.name("placement_refusals", "total", "Instance creations refused, by reason."),
            labels: [("reason", reason)]
        ).increment()
    }

    /// A launch phase an appliance reported, `since` the instance was requested.
    func phase(_ phase: LaunchPhase, since requested: Date, at date: Date) {
        let seconds = max(0, min(date.timeIntervalSince(requested), 86_400))
        registry.makeDurationHistogram(
            descriptor: Self.name("launch_phase", "seconds", "Time from an instance's request to each launch phase its appliance reported."),
            labels: [("phase", phase.rawValue)], buckets: Self.phaseBuckets
        ).record(.milliseconds(Int64(seconds * 1000)))
    }

    /// The exposition: the gauges read from the store now, then every metric.
    func render(store: any PoolStore, events: InstanceEvents, staleAfter: Int, at date: Date) async throws -> String {
        watchers.set(Double(events.count))
        let counts = try await store.instanceCountsByState()
        for state in InstanceState.allCases {
            registry.makeGauge(
                descriptor: Self.name("instances", "", "Instance records by state (decommissioned ones until purged)."),
                labels: [("state", state.description)]
            ).set(Double(counts[state] ?? 0))
        }
        let appliances = try await store.appliances()
        var byFreshness = ["fresh": 0, "stale": 0, "disabled": 0]
        var exported: Set<String> = []
        for appliance in appliances {
            let seenLately = appliance.lastSeen.map { date.timeIntervalSince($0) <= TimeInterval(staleAfter) } ?? false
            let freshness = !appliance.enabled ? "disabled" : seenLately ? "fresh" : "stale"
            byFreshness[freshness, default: 0] += 1
            guard let stats = appliance.stats else { continue }
            exported.insert(appliance.name)
            for (metric, capacity) in [("vcpus", stats.vcpus), ("memory_mib", stats.memoryMiB), ("disk_gib", stats.diskGiB)] {
                for (kind, value) in [("total", capacity.total), ("free", capacity.free)] {
                    capacityGauge(metric, appliance: appliance.name, kind: kind).set(Double(value))
                }
            }
        }
        for (freshness, count) in byFreshness {
            registry.makeGauge(
                descriptor: Self.name("appliances", "", "Appliances by freshness: fresh (seen recently), stale, disabled."),
                labels: [("freshness", freshness)]
            ).set(Double(count))
        }
        let gone = exportedAppliances.withLock { previous in
            defer { previous = exported }
            return previous.subtracting(exported)
        }
        for name in gone {
            for metric in ["vcpus", "memory_mib", "disk_gib"] {
                for kind in ["total", "free"] { registry.unregisterGauge(capacityGauge(metric, appliance: name, kind: kind)) }
            }
        }
        return registry.emitToString()
    }

    private func capacityGauge(_ metric: String, appliance: String, kind: String) -> Gauge {
        registry.makeGauge(
            descriptor: Self.name("appliance_\(metric)", "", "Capacity each appliance reported at its last check-in (total and free)."),
            labels: [("appliance", appliance), ("kind", kind)])
    }
}

/// Counts every answered request by its declared route.
struct MetricsMiddleware: RouterMiddleware {
    typealias Context = BasicRequestContext
    let metrics: PoolMetrics

    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        let started = ContinuousClock.now
        let route = context.endpointPath ?? "unmatched"
        do {
            let response = try await next(request, context)
            metrics.request(route: route, method: request.method.rawValue, status: Int(response.status.code), duration: .now - started)
            return response
        } catch {
            let status = (error as? any HTTPResponseError)?.status.code ?? 500
            metrics.request(route: route, method: request.method.rawValue, status: Int(status), duration: .now - started)
            throw error
        }
    }
}

extension PoolMetrics {
    /// `GET /metrics`: the exposition, for superusers unless `[metrics]
    /// require_token = false`.
    func route(store: any PoolStore, events: InstanceEvents, configuration: PoolConfiguration) -> @Sendable (Request, BasicRequestContext) async throws -> Response {
        { request, _ in
            if configuration.metricsRequireToken {
                let user = try await authenticateUser(request, store: store)
                guard user.superuser else { throw Refusal(.forbidden, "only superusers may read /metrics ([metrics] require_token)") }
            }
            let text = try await self.render(
                store: store, events: events, staleAfter: configuration.housekeeping.applianceStaleSeconds, at: Date())
            return Response(
                status: .ok, headers: [.contentType: "text/plain; version=0.0.4; charset=utf-8"],
                body: .init(byteBuffer: ByteBuffer(string: text)))
        }
    }
}
