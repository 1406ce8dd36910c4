import Foundation
import Hummingbird
import Logging
import PoolAPI
import ServiceLifecycle

/// The token launch API (the seed's stream handler): a user's token
/// starts an instance from a template, a warm one when one is ready.
struct TemplateRoutes: Sendable {
    let store: any PoolStore
    let configuration: PoolConfiguration
    let events: InstanceEvents
    let warmPools: WarmPoolService

    /// `POST /api/stream/TEMPLATE?token=T[&region=R&topic=T&preemptible=0|1]`:
    /// 201 with the server-instance; 402 without a valid token (in the
    /// query or `X-Auth-Token`); 400 for a bad `preemptible`; 403 for a
    /// non-preemptible instance asked by a non-superuser; 404 for an
    /// unknown template; 409 at the user's limit; 503 when no appliance
    /// (in the region) has room.
    @Sendable func launch(_ request: Request, context: BasicRequestContext) async throws -> Response {
        let query = request.uri.queryParameters
        let token = query["token"].map(String.init) ?? bearerToken(request)
        guard let token, !token.isEmpty, let user = try await store.user(tokenDigest: Token.digest(token)) else {
            throw Refusal(.init(code: 402, reasonPhrase: "Payment Required"), "must include [token] with a valid token")
        }
        let name = try context.parameters.require("template")
        var launch = InstanceRequest(owner: user.name, template: name)
        if let region = query["region"].map(String.init), !region.isEmpty, region != "any" { launch.region = region }
        if let topic = query["topic"].map(String.init), !topic.isEmpty { launch.topic = topic }
        switch query["preemptible"].map({ String($0).lowercased() }) {
        case nil, "", "1", "true": launch.preemptible = true
        case "0", "false": launch.preemptible = false
        case let other?: throw Refusal(.badRequest, "preemptible must be 1, 0, true or false, not '\(other)'")
        }
        if !launch.preemptible, !user.superuser {
            throw Refusal(.forbidden, "token may not create non-preemptible instance")
        }
        let instance: Instance
        do {
            instance = try await store.createInstance(
                launch, defaultLeaseSeconds: configuration.leases.defaultSeconds,
                applianceStaleAfter: configuration.housekeeping.applianceStaleSeconds, at: Date())
        } catch PoolError.notFound(what: "template", let name) {
            throw Refusal(.notFound, "template '\(name)' does not exist on this pool")
        } catch PoolError.conflict(let message) {
            throw Refusal(.conflict, "max instances reached for provided token: \(message)")
        } catch let error as PoolError {
            throw Refusal(error)
        }
        events.publish(instance.event)
        if instance.template != nil { warmPools.wake() }  // a claimed warm instance needs a replacement
        return try reply(.created, Envelope.success(ServerInstance(instance)))
    }
}

/// Keeps the templates' warm pools filled: every `intervalSeconds`, and
/// soon after a launch, it retires warm instances past their age, drops
/// failed ones and places replacements. A failed pass is logged.
final class WarmPoolService: Service, Sendable {
    let store: any PoolStore
    let configuration: PoolConfiguration
    let events: InstanceEvents
    let logger: Logger
    private let wakeups: AsyncStream<Void>
    private let waker: AsyncStream<Void>.Continuation

    init(store: any PoolStore, configuration: PoolConfiguration, events: InstanceEvents, logger: Logger) {
        self.store = store
        self.configuration = configuration
        self.events = events
        self.logger = logger
        (wakeups, waker) = AsyncStream.makeStream(bufferingPolicy: .bufferingNewest(1))
    }

    /// Runs a pass soon instead of at the next interval.
    func wake() { waker.yield() }

    func run() async throws {
        let interval = Duration.seconds(configuration.warmPools.intervalSeconds)
        let wakeups = self.wakeups
        await cancelWhenGracefulShutdown {
            await withTaskGroup(of: Void.self) { group in
                // Ticks and wakeups both run a pass.
                group.addTask { [waker = self.waker] in
                    while !Task.isCancelled {
                        try? await Task.sleep(for: interval)
                        waker.yield()
                    }
                }
                group.addTask {
                    await self.pass()
                    for await _ in wakeups {
                        guard !Task.isCancelled else { break }
                        await self.pass()
                    }
                }
                await group.next()
                group.cancelAll()
            }
        }
    }

    func pass() async {
        do {
            let pass = try await store.maintainWarmPools(
                maxAgeSeconds: configuration.warmPools.maxAgeSeconds,
                applianceStaleAfter: configuration.housekeeping.applianceStaleSeconds, at: Date())
            for instance in pass.started { events.publish(instance.event) }
            if !pass.started.isEmpty || !pass.retired.isEmpty || !pass.dropped.isEmpty {
                logger.info(
                    "warm pools",
                    metadata: [
                        "started": "\(pass.started.map(\.name))", "retired": "\(pass.retired)", "dropped": "\(pass.dropped)",
                    ])
            }
            for shortfall in pass.shortfalls { logger.warning("warm pool not filled: \(shortfall)") }
        } catch {
            logger.error("warm pool pass failed: \(error)")
        }
    }
}

/// Logs each request's method and path, with the query's `token` value
/// redacted (Hummingbird's own request log prints the whole URI).
struct RedactingLogRequestsMiddleware<Context: RequestContext>: RouterMiddleware {
    let level: Logger.Level

    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        context.logger.log(
            level: level, "Request",
            metadata: ["hb.request.path": .string(Self.redacted(path: request.uri.path, query: request.uri.query)), "hb.request.method": .string(request.method.rawValue)])
        return try await next(request, context)
    }

    static func redacted(path: String, query: String?) -> String {
        guard let query, !query.isEmpty else { return path }
        let parts = query.split(separator: "&", omittingEmptySubsequences: false).map { part in
            part.lowercased().hasPrefix("token=") ? "token=REDACTED" : String(part)
        }
        return path + "?" + parts.joined(separator: "&")
    }
}
