import Foundation
import Hummingbird
import Logging
import PoolAPI

/// How the pool's HTTP server listens.
public struct PoolConfiguration: Sendable {
    public var host: String
    public var port: Int
    /// How many console lines the pool keeps per instance.
    public var consoleTailLines: Int

    public init(host: String = "127.0.0.1", port: Int = 8080, consoleTailLines: Int = 1000) {
        self.host = host
        self.port = port
        self.consoleTailLines = consoleTailLines
    }
}

/// Assembles the pool's HTTP application; `corral pool serve` and the tests
/// both build it here.
///
/// - Parameter onListening: called with the bound address once the server
///   accepts connections (useful with port 0).
public func buildPoolApplication(
    configuration: PoolConfiguration, store: any PoolStore, logger: Logger,
    onListening: @escaping @Sendable (_ host: String, _ port: Int) async -> Void = { _, _ in }
) -> some ApplicationProtocol {
    Application(
        router: buildPoolRouter(store: store, configuration: configuration),
        configuration: .init(address: .hostname(configuration.host, port: configuration.port), serverName: "corral-pool"),
        onServerRunning: { channel in
            await onListening(configuration.host, channel.localAddress?.port ?? configuration.port)
        },
        logger: logger)
}

/// The routes of the appliance API.
public func buildPoolRouter(store: any PoolStore, configuration: PoolConfiguration = .init()) -> Router<BasicRequestContext> {
    let router = Router(context: BasicRequestContext.self)
    let appliances = ApplianceRoutes(store: store, configuration: configuration)
    router.post("api/v1/authorization", use: appliances.authorize)
    router.get("api/v1/flavors", use: appliances.flavors)
    router.post("api/v1/instances/:name", use: appliances.report)
    return router
}

/// The appliance-facing half of the pool: what agents call.
struct ApplianceRoutes: Sendable {
    let store: any PoolStore
    let configuration: PoolConfiguration

    /// The appliance a request's token names, or the reply refusing it:
    /// 401 for a body without a readable token or an unknown token, 409
    /// for a disabled appliance. Records the appliance as seen.
    private func authenticate(_ body: ByteBuffer) async throws -> Result<Appliance, Refusal> {
        let block: ApplianceBlock
        do {
            block = try decodeJSON(AuthorizationRequest.self, from: body).appliance
        } catch let error as RequestBodyError {
            return .failure(Refusal(.unauthorized, "You must submit a valid JSON object with a token: \(error)"))
        }
        guard let appliance = try await store.appliance(tokenDigest: Token.digest(block.apitoken)) else {
            return .failure(Refusal(.unauthorized, "Token is not valid."))
        }
        guard appliance.enabled else {
            return .failure(
                Refusal(
                    .conflict,
                    "Appliance '\(appliance.name)' has been disabled by the pool controller; ask the pool's operator to enable it."))
        }
        return .success(try await store.recordCheckIn(appliance.name, block: block, at: Date()))
    }

    /// `POST /api/v1/authorization/`: 200 with the appliance's name and
    /// owner, or the refusals of ``authenticate(_:)``. Records the
    /// appliance's version and location.
    @Sendable func authorize(_ request: Request, context: BasicRequestContext) async throws -> Response {
        switch try await authenticate(try await collectBody(request)) {
        case .failure(let refusal): return try refusal.response()
        case .success(let appliance):
            return try reply(.ok, Envelope.success(AuthorizationResult(name: appliance.name, owner: appliance.owner)))
        }
    }

    /// `POST /api/v1/instances/<name>/`: an appliance reports one of its
    /// instances; the reply is how to boot it. 400 when the instance part is
    /// unreadable or names another instance than the URI, 403 when the
    /// instance belongs to another appliance, 503 when the pool has no wisp
    /// for it (the report is kept).
    @Sendable func report(_ request: Request, context: BasicRequestContext) async throws -> Response {
        let body = try await collectBody(request)
        let appliance: Appliance
        switch try await authenticate(body) {
        case .failure(let refusal): return try refusal.response()
        case .success(let authenticated): appliance = authenticated
        }
        let report: InstanceReport
        do {
            report = try decodeJSON(InstanceReportRequest.self, from: body).instance
        } catch let error as RequestBodyError {
            return try Refusal(.badRequest, "\(error)").response()
        }
        let name = context.parameters.get("name") ?? ""
        guard report.name == name else {
            return try Refusal(.badRequest, "instance.name '\(report.name)' must equal the name in the URI, '\(name)'").response()
        }
        do {
            _ = try await store.recordReport(
                report, appliance: appliance.name, consoleLimit: configuration.consoleTailLines, at: Date())
        } catch let error as PoolError {
            guard case .forbidden = error else { throw error }
            return try Refusal(.forbidden, "\(error)").response()
        }
        do {
            return try reply(.ok, Envelope.success(try await store.startParameters(forInstance: name)))
        } catch let error as PoolError {
            guard case .unavailable = error else { throw error }
            return try reply(.serviceUnavailable, Envelope.error("\(error)"))
        }
    }

    /// `GET /api/v1/flavors/`: the active flavors of the catalogue.
    @Sendable func flavors(_ request: Request, context: BasicRequestContext) async throws -> Response {
        try reply(.ok, Envelope.success(try await store.flavors().filter(\.active)))
    }
}

/// A refused request: its status and the message for the envelope.
struct Refusal: Error {
    var status: HTTPResponse.Status
    var message: String

    init(_ status: HTTPResponse.Status, _ message: String) {
        self.status = status
        self.message = message
    }

    func response() throws -> Response { try reply(status, Envelope.fail(message)) }
}

/// A JSON reply with a status.
func reply<T: Encodable>(_ status: HTTPResponse.Status, _ value: T) throws -> Response {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
    return Response(
        status: status,
        headers: [.contentType: "application/json; charset=utf-8"],
        body: .init(byteBuffer: ByteBuffer(bytes: try encoder.encode(value))))
}
