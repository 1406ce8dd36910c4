import Foundation
import Hummingbird
import Logging
import PoolAPI

/// How the pool's HTTP server listens.
public struct PoolConfiguration: Sendable {
    public var host: String
    public var port: Int

    public init(host: String = "127.0.0.1", port: Int = 8080) {
        self.host = host
        self.port = port
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
        router: buildPoolRouter(store: store),
        configuration: .init(address: .hostname(configuration.host, port: configuration.port), serverName: "corral-pool"),
        onServerRunning: { channel in
            await onListening(configuration.host, channel.localAddress?.port ?? configuration.port)
        },
        logger: logger)
}

/// The routes of the appliance API.
public func buildPoolRouter(store: any PoolStore) -> Router<BasicRequestContext> {
    let router = Router(context: BasicRequestContext.self)
    let appliances = ApplianceRoutes(store: store)
    router.post("api/v1/authorization", use: appliances.authorize)
    router.get("api/v1/flavors", use: appliances.flavors)
    return router
}

/// The appliance-facing half of the pool: what agents call.
struct ApplianceRoutes: Sendable {
    let store: any PoolStore

    /// `POST /api/v1/authorization/`: 200 with the appliance's name and
    /// owner; 401 for a body without a token or an unknown token; 409 for a
    /// disabled appliance. Records the appliance's version and location.
    @Sendable func authorize(_ request: Request, context: BasicRequestContext) async throws -> Response {
        let body: AuthorizationRequest
        do {
            body = try await decodeJSON(AuthorizationRequest.self, from: request)
        } catch let error as RequestBodyError {
            return try reply(.unauthorized, Envelope.fail("You must submit a valid JSON object with a token: \(error)"))
        }
        guard let appliance = try await store.appliance(tokenDigest: Token.digest(body.appliance.apitoken)) else {
            return try reply(.unauthorized, Envelope.fail("Token is not valid."))
        }
        guard appliance.enabled else {
            return try reply(
                .conflict,
                Envelope.fail("Appliance '\(appliance.name)' has been disabled by the pool controller; ask the pool's operator to enable it."))
        }
        let seen = try await store.recordCheckIn(appliance.name, block: body.appliance, at: Date())
        return try reply(.ok, Envelope.success(AuthorizationResult(name: seen.name, owner: seen.owner)))
    }

    /// `GET /api/v1/flavors/`: the active flavors of the catalogue.
    @Sendable func flavors(_ request: Request, context: BasicRequestContext) async throws -> Response {
        try reply(.ok, Envelope.success(try await store.flavors().filter(\.active)))
    }
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
