import Foundation
import Hummingbird
import HummingbirdCore
import HummingbirdTLS
import Logging
import PoolAPI
import ServiceLifecycle

/// Assembles the pool's HTTP application with its background services
/// (housekeeping, event keep-alives); `corral pool serve` and the tests
/// both build it here.
///
/// - Parameter onListening: called with the bound address once the server
///   accepts connections (useful with port 0).
/// - Throws: ``PoolError/invalid(field:reason:)`` when the TLS files named
///   in the configuration cannot be read.
public func buildPoolApplication(
    configuration: PoolConfiguration, store: any PoolStore, logger: Logger, events: InstanceEvents = InstanceEvents(),
    metrics: PoolMetrics = PoolMetrics(),
    onListening: @escaping @Sendable (_ host: String, _ port: Int) async -> Void = { _, _ in }
) throws -> some ApplicationProtocol {
    // An idle connection is closed (a held check-in or an event stream is a
    // request in progress, not idle); at most maxConnections are served at
    // once, and further ones wait in the listen backlog.
    var server = HTTPServerBuilder.http1(configuration: .init(idleTimeout: .seconds(Int64(configuration.idleTimeoutSeconds))))
    if let certificate = configuration.tlsCertificate, let key = configuration.tlsKey {
        server = try .tls(server, tlsConfiguration: PoolTLS.serverConfiguration(certificate: certificate, key: key))
    }
    let fetcher = CallbackFetcher(limits: configuration.callbacks)
    let warmPools = WarmPoolService(store: store, configuration: configuration, events: events, logger: logger)
    return Application(
        router: buildPoolRouter(
            store: store, configuration: configuration, events: events, fetcher: fetcher, warmPools: warmPools, metrics: metrics,
            logger: logger),
        server: server,
        configuration: .init(
            address: .hostname(configuration.host, port: configuration.port), serverName: "corral-pool",
            availableConnectionsDelegate: MaximumAvailableConnections(configuration.maxConnections, logger: logger)),
        services: [
            HousekeepingService(store: store, settings: configuration.housekeeping, events: events, logger: logger),
            HeartbeatService(events: events, interval: .seconds(15)),
            warmPools,
            OtherWritersService(store: store, logger: logger),
            LeadershipService(store: store, warmPools: warmPools),
            EventRelayService(store: store, events: events, logger: logger),
            ShutdownAction { await fetcher.shutdown() },
        ],
        onServerRunning: { channel in
            await onListening(configuration.host, channel.localAddress?.port ?? configuration.port)
        },
        logger: logger)
}

/// The routes of the appliance API, the user-facing API and the token launch API.
func buildPoolRouter(
    store: any PoolStore, configuration: PoolConfiguration = .init(), events: InstanceEvents = InstanceEvents(),
    fetcher: CallbackFetcher? = nil, warmPools: WarmPoolService? = nil, metrics: PoolMetrics = PoolMetrics(),
    logger: Logger = Logger(label: "corral.pool")
) -> Router<BasicRequestContext> {
    let router = Router(context: BasicRequestContext.self)
    router.add(middleware: MetricsMiddleware(metrics: metrics))
    router.add(middleware: RedactingLogRequestsMiddleware(level: .info))
    router.add(middleware: EnvelopeErrorMiddleware())
    let appliances = ApplianceRoutes(
        store: store, configuration: configuration, events: events,
        fetcher: fetcher ?? CallbackFetcher(limits: configuration.callbacks), signer: ReplySigner(store: store), logger: logger,
        metrics: metrics)
    router.post("api/v1/authorization", use: appliances.authorize)
    router.get("api/v1/flavors", use: appliances.flavors)
    router.get("api/v1/signing-key", use: appliances.signingKey)
    router.post("api/v1/broker", use: appliances.checkIn)
    router.post("api/v1/instances/:name", use: appliances.report)
    let reservations = ReservationRoutes(store: store, configuration: configuration, events: events)
    router.post("api/v1/bids", use: reservations.reserve)
    router.get("api/v1/bids", use: reservations.list)
    let warmPools = warmPools ?? WarmPoolService(store: store, configuration: configuration, events: events, logger: logger)
    ServerInstanceRoutes(store: store, configuration: configuration, events: events, warmPools: warmPools, metrics: metrics)
        .register(in: router)
    let templates = TemplateRoutes(store: store, configuration: configuration, events: events, warmPools: warmPools, metrics: metrics)
    router.post("api/stream/:template", use: templates.launch)
    let watchers = EventRoutes(store: store, events: events, limits: configuration.limits)
    router.get("api/v1/events", use: watchers.stream)
    HealthRoutes(store: store).register(in: router)
    router.get("metrics", use: metrics.route(store: store, events: events, configuration: configuration))
    DashboardRoutes(store: store, configuration: configuration, events: events).register(in: router)
    let document = openAPIDocument(publicURL: configuration.publicURL)
    router.get("openapi.yaml") { _, _ in
        Response(
            status: .ok, headers: [.contentType: "application/yaml; charset=utf-8"],
            body: .init(byteBuffer: ByteBuffer(string: document)))
    }
    return router
}

/// The OpenAPI description of the appliance API, naming `publicURL` as
/// its server when set.
public func openAPIDocument(publicURL: String?) -> String {
    let text = String(decoding: PackageResources.openapi_yaml, as: UTF8.self)
    guard let publicURL else { return text }
    return text.replacingOccurrences(of: "\n  - url: /\n", with: "\n  - url: \(publicURL)\n")
}

/// Replies to every failure in the envelope: Hummingbird's own errors (an
/// unknown route, say) keep their status; anything unexpected is logged and
/// answered 500 without its details.
struct EnvelopeErrorMiddleware<Context: RequestContext>: RouterMiddleware {
    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        // Under /v1 every refusal is the user-facing API's envelope, also for
        // a path no route matches and for a failure; elsewhere the appliance API's.
        let path = request.uri.path
        let userFacing = path == "/v1" || path.hasPrefix("/v1/")
        func refusal(_ status: HTTPResponse.Status, _ message: String) throws -> Response {
            userFacing
                ? try reply(status, ServerEnvelope<[ServerInstance]>(data: nil, msg: message, success: false))
                : try Refusal(status, message).response()
        }
        do {
            return try await next(request, context)
        } catch let error as Refusal {
            return try refusal(error.status, error.message)
        } catch let error as HTTPError {
            if error.status == .notFound, let allowed = RouteTable.methods(forPath: path), !allowed.contains(request.method.rawValue) {
                var response = try refusal(
                    .methodNotAllowed, "\(request.method.rawValue) is not allowed on \(path.prefix(200)); use \(allowed.joined(separator: " or "))")
                response.headers[.allow] = allowed.joined(separator: ", ")
                return response
            }
            return try refusal(error.status, error.body ?? error.status.reasonPhrase)
        } catch {
            context.logger.error("\(request.method) \(request.uri.path) failed: \(error)")
            return try refusal(.internalServerError, "the pool failed to handle this request; its log says why")
        }
    }
}

/// The methods each route answers, as the OpenAPI document lists them (a
/// test checks the two agree): a known path asked with another method is a
/// 405 naming the right ones, not a 404.
enum RouteTable {
    static let routes: [(path: String, methods: [String])] = [
        ("/api/v1/authorization", ["POST"]), ("/api/v1/flavors", ["GET"]), ("/api/v1/signing-key", ["GET"]),
        ("/api/v1/broker", ["POST"]), ("/api/v1/instances/{name}", ["POST"]), ("/api/v1/bids", ["GET", "POST"]),
        ("/api/v1/events", ["GET"]), ("/api/stream/{template}", ["POST"]), ("/openapi.yaml", ["GET"]),
        ("/healthz", ["GET"]), ("/readyz", ["GET"]), ("/metrics", ["GET"]),
        ("/v1/server-instance", ["GET", "POST"]), ("/v1/server-instance/{id}", ["DELETE", "GET", "PUT"]),
        ("/v1/server-instance/{id}/timeline", ["GET"]), ("/v1/server-instance/{id}/console", ["GET"]),
        ("/v1/server-flavor", ["GET"]), ("/v1/server-image", ["GET"]), ("/v1/server-flavor/{id}", ["PUT"]),
        ("/v1/server-image/{id}", ["PUT"]), ("/v1/user/{name}", ["GET", "PUT"]),
        ("/v1/user/{name}/token", ["POST"]), ("/v1/ssh-key", ["GET", "POST"]), ("/v1/ssh-key/{id}", ["DELETE"]),
        ("/v1/server-template", ["GET"]), ("/v1/server-template/{id}", ["DELETE", "PUT"]), ("/v1/wisp", ["GET"]),
        ("/v1/wisp/{id}", ["DELETE", "PUT"]),
    ]

    /// The methods of the route `path` matches (with or without its
    /// trailing slash), or nil when it matches none.
    static func methods(forPath path: String) -> [String]? {
        let parts = path.split(separator: "/", omittingEmptySubsequences: true)
        for route in routes {
            let pattern = route.path.split(separator: "/", omittingEmptySubsequences: true)
            guard pattern.count == parts.count else { continue }
            if zip(pattern, parts).allSatisfy({ $0.hasPrefix("{") || $0 == $1 }) { return route.methods }
        }
        return nil
    }
}

/// A path parameter, percent-decoded (`i%2D1` is `i-1`); a 400 naming it when
/// it cannot be decoded.
func pathParameter(_ context: some RequestContext, _ name: String) throws -> String {
    let raw = try context.parameters.require(name)
    guard let decoded = raw.removingPercentEncoding else {
        throw Refusal(.badRequest, "the path's \(name) is not valid percent-encoding")
    }
    return decoded
}

/// Wakes held check-ins for actions that other processes (the admin CLI)
/// commit to the store, until shutdown.
struct OtherWritersService: Service {
    let store: any PoolStore
    let logger: Logger

    func run() async throws {
        do {
            try await cancelWhenGracefulShutdown { try await store.followOtherWriters(every: .milliseconds(200)) }
        } catch is CancellationError {
        } catch {
            // Check-ins still see these actions at their next call.
            logger.error("actions queued by other processes no longer wake held check-ins: \(error)")
        }
    }
}

/// Asks every 2 s whether this process leads the pool-wide passes (see
/// ``PoolStore/leads()``), so a replica takes over within seconds of the
/// leader's end; a new leader fills the warm pools at once.
struct LeadershipService: Service {
    let store: any PoolStore
    let warmPools: WarmPoolService

    func run() async throws {
        await cancelWhenGracefulShutdown {
            var leading = false
            while !Task.isCancelled {
                let leads = await store.leads()
                if leads, !leading { warmPools.wake() }
                leading = leads
                try? await Task.sleep(for: .seconds(2))
            }
        }
    }
}

/// Runs `action` when the service group shuts down.
struct ShutdownAction: Service {
    let action: @Sendable () async -> Void

    func run() async throws {
        try? await gracefulShutdown()
        await action()
    }
}

/// A refused request: its status and the message for the envelope. Thrown
/// from a route, it becomes the reply.
struct Refusal: HTTPResponseError {
    var status: HTTPResponse.Status
    var message: String

    init(_ status: HTTPResponse.Status, _ message: String) {
        self.status = status
        self.message = message
    }

    /// The reply for a ``PoolError``: 404 for what does not exist, 409 for
    /// a clash, 400 for a bad value, 403 for another's, 503 for what the pool
    /// cannot serve yet, 429 for a cap reached.
    init(_ error: PoolError) {
        switch error {
        case .notFound: self.init(.notFound, "\(error)")
        case .alreadyExists, .conflict: self.init(.conflict, "\(error)")
        case .invalid: self.init(.badRequest, "\(error)")
        case .forbidden: self.init(.forbidden, "\(error)")
        case .unavailable: self.init(.serviceUnavailable, "\(error)")
        case .tooMany: self.init(.tooManyRequests, "\(error)")
        case .storage: self.init(.internalServerError, "\(error)")
        }
    }

    func response() throws -> Response {
        try reply(status, status.code >= 500 ? Envelope.error(message) : Envelope.fail(message))
    }

    func response(from request: Request, context: some RequestContext) throws -> Response { try response() }
}

/// Runs a store operation, turning its ``PoolError``s into refusals.
func refusingPoolErrors<T>(_ body: () async throws -> T) async throws -> T {
    do {
        return try await body()
    } catch let error as PoolError {
        throw Refusal(error)
    }
}

/// Decodes a request body, refusing (400) what cannot be read.
func decodeRequest<T: Decodable>(_ type: T.Type, from body: ByteBuffer) throws -> T {
    do {
        return try decodeJSON(T.self, from: body)
    } catch let error as RequestBodyError {
        throw Refusal(.badRequest, "\(error)")
    }
}

/// A JSON reply with a status.
func reply<T: Encodable>(_ status: HTTPResponse.Status, _ value: T) throws -> Response {
    reply(status, json: try replyBody(value))
}

/// The JSON body of a reply carrying `value`.
func replyBody<T: Encodable>(_ value: T) throws -> Data {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
    return try encoder.encode(value)
}

/// A reply whose body is `json`.
func reply(_ status: HTTPResponse.Status, json: Data) -> Response {
    Response(
        status: status,
        headers: [.contentType: "application/json; charset=utf-8"],
        body: .init(byteBuffer: ByteBuffer(bytes: json)))
}

/// The token a user-facing request carries: `X-Auth-Token: TOKEN` or
/// `Authorization: Bearer TOKEN`.
func bearerToken(_ request: Request) -> String? {
    if let token = request.headers[.init("X-Auth-Token")!], !token.isEmpty { return token }
    if let authorization = request.headers[.authorization], authorization.lowercased().hasPrefix("bearer ") {
        let token = authorization.dropFirst("bearer ".count).trimmingCharacters(in: .whitespaces)
        return token.isEmpty ? nil : token
    }
    return nil
}

/// Logs each request's method and path, with the query's `token` value
/// redacted (Hummingbird's own request log prints the whole URI).
struct RedactingLogRequestsMiddleware<Context: RequestContext>: RouterMiddleware {
    let level: Logger.Level

    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        context.logger.log(
            level: HealthRoutes.probePaths.contains(request.uri.path) ? .debug : level, "Request",
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
