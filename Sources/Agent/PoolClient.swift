import AsyncHTTPClient
import NIOSSL
import Crypto
import Egress
import Foundation
import NIOCore
import PoolAPI
import Synchronization

/// A pool reply that is not a success, or no reply at all.
public enum PoolClientError: Error, CustomStringConvertible, Equatable {
    /// The pool answered with this status and message.
    case refused(status: Int, message: String)
    /// The pool could not be reached or gave no readable reply.
    case unreachable(String)
    /// A reply that was not signed by the pool's pinned key, or was changed
    /// on the way: refused, and never acted on.
    case forged(String)

    public var description: String {
        switch self {
        case .refused(401, let message): "the pool refused the token (401): \(message)"
        case .refused(409, let message): "the pool disabled this appliance (409): \(message)"
        case .refused(let status, let message): "the pool answered \(status): \(message)"
        case .unreachable(let reason): "the pool is unreachable: \(reason)"
        case .forged(let reason): "refused a reply not signed by the pool's pinned key (pool.signing_key): \(reason)"
        }
    }

    /// Whether trying again later can help (the pool was down or broke on
    /// its side), as opposed to a refusal of this request.
    public var isTransient: Bool {
        switch self {
        case .unreachable, .forged: true
        // 502 and 503 are answers about this request (no start parameters).
        case .refused(let status, _): status == 429 || (status >= 500 && status != 502 && status != 503)
        }
    }
}

/// The agent's side of the pool protocol: authorization, flavors,
/// check-ins and instance reports, all carrying the appliance block with
/// its token. The token is never logged.
///
/// With several pool URLs (replicas of one pool), a request that cannot
/// reach one is sent to the next; the one that answered is tried first
/// from then on.
public final class PoolClient: Sendable {
    /// The pool's URLs: replicas sharing one database.
    public let baseURLs: [String]
    /// Which of them answered last.
    private let current = Mutex(0)
    /// The URL requests go to first.
    public var baseURL: String { baseURLs[current.withLock { $0 }] }
    private let block: ApplianceBlock
    private let client: HTTPClient
    private let timeout: TimeAmount
    /// The pool's public key: replies to check-ins and reports must be
    /// signed by it (see ``ReplySignature``). Nil only for `register`,
    /// which has not pinned it yet, and for status queries.
    private let signingKey: Curve25519.Signing.PublicKey?
    private let tokenDigest: String

    /// - Parameter tls: how an https pool is verified; nil: against the
    ///   system's trust store (see ``tlsConfiguration(trusting:)``).
    public init(
        baseURL: String, fallbackURLs: [String] = [], token: String, version: String, signingKey: Curve25519.Signing.PublicKey? = nil,
        timeout: TimeAmount = .seconds(10), tls: TLSConfiguration? = nil
    ) {
        self.baseURLs = ([baseURL] + fallbackURLs).map { $0.hasSuffix("/") ? String($0.dropLast()) : $0 }
        self.block = ApplianceBlock(apitoken: token, version: version, dynamicimages: true)
        self.signingKey = signingKey
        self.tokenDigest = SHA256.hash(data: Data(token.utf8)).map { String(format: "%02x", $0) }.joined()
        // A pool that is down fails a request at its deadline (the client
        // retries connecting until then), so the deadline is short. With
        // replicas to fall back on, a refused connection moves on at once.
        var configuration = HTTPClient.Configuration(
            tlsConfiguration: tls, redirectConfiguration: .disallow, timeout: .init(connect: .seconds(5)))
        configuration.connectionPool.retryConnectionEstablishment = fallbackURLs.isEmpty
        self.client = HTTPClient(eventLoopGroup: HTTPClient.defaultEventLoopGroup, configuration: configuration)
        self.timeout = timeout
    }

    /// A client TLS configuration that trusts only the certificates in the
    /// PEM file at `path` (the pool's CA, or its self-signed certificate):
    /// a pool whose certificate does not chain to them, or does not name the
    /// host the URL names, is refused.
    public static func tlsConfiguration(trusting path: String) throws -> TLSConfiguration {
        let certificates: [NIOSSLCertificate]
        do {
            certificates = try NIOSSLCertificate.fromPEMFile(path)
        } catch {
            throw AgentFatalError("cannot read a PEM certificate from \(path): \(error)")
        }
        guard !certificates.isEmpty else { throw AgentFatalError("\(path) holds no PEM certificate") }
        var configuration = TLSConfiguration.makeClientConfiguration()
        configuration.trustRoots = .certificates(certificates)
        configuration.minimumTLSVersion = .tlsv12
        return configuration
    }

    /// Closes the client's connections; call once, at the end.
    public func shutdown() async {
        try? await client.shutdown()
    }

    /// `POST /api/v1/authorization/`: the appliance's name and owner.
    public func authorize() async throws -> AuthorizationResult {
        try await post("/api/v1/authorization/", AuthorizationRequest(appliance: block), as: AuthorizationResult.self)
    }

    /// `GET /api/v1/signing-key/`: the pool's public key, base64.
    public func poolSigningKey() async throws -> String {
        let result = try await send(HTTPClientRequest(url: ""), path: "/api/v1/signing-key/", as: [String: String].self)
        guard let key = result["ed25519"] else { throw PoolClientError.unreachable("\(baseURL) gave no ed25519 key") }
        return key
    }

    /// `GET /api/v1/flavors/`.
    public func flavors() async throws -> [Flavor] {
        try await send(HTTPClientRequest(url: ""), path: "/api/v1/flavors/", as: [Flavor].self)
    }

    /// `POST /api/v1/broker/`: the pending actions. With `holdSeconds`, a
    /// pool with nothing pending holds its reply that long, answering as
    /// soon as an action is queued.
    public func checkIn(stats: HypervisorStats, instances: [InstanceSummary], done: [String], holdSeconds: Int = 0)
        async throws -> [Action]
    {
        let request = CheckInRequest(
            appliance: block, stats: stats, instances: instances, done: done, holdSeconds: holdSeconds > 0 ? holdSeconds : nil)
        return try await post(
            "/api/v1/broker/", request, as: CheckInResult.self, timeout: timeout + .seconds(Int64(holdSeconds)), signed: true
        ).actions
    }

    /// `POST /api/v1/instances/<name>/`: the instance's start parameters.
    public func report(_ report: InstanceReport, timeout: TimeAmount? = nil) async throws -> StartParameters {
        let name = report.name.addingPercentEncoding(withAllowedCharacters: .urlPathAllowed.subtracting(["/"])) ?? report.name
        return try await post(
            "/api/v1/instances/\(name)/", InstanceReportRequest(appliance: block, instance: report), as: StartParameters.self,
            timeout: timeout, signed: true)
    }

    private func post<Body: Encodable, Result: Codable & Sendable>(
        _ path: String, _ body: Body, as type: Result.Type, timeout: TimeAmount? = nil, signed: Bool = false
    ) async throws -> Result {
        var request = HTTPClientRequest(url: "")
        request.method = .POST
        request.headers.add(name: "Content-Type", value: "application/json")
        request.body = .bytes(ByteBuffer(bytes: try JSONEncoder().encode(body)))
        return try await send(request, path: path, as: type, timeout: timeout, signed: signed)
    }

    /// Sends `request` to `path` at the pool's URLs in turn, from the one
    /// that answered last, until one answers; the last one's error if none does.
    private func send<Result: Codable & Sendable>(
        _ request: HTTPClientRequest, path: String, as type: Result.Type, timeout: TimeAmount? = nil, signed: Bool = false
    ) async throws -> Result {
        let first = current.withLock { $0 }
        var failure: PoolClientError?
        for offset in 0..<baseURLs.count {
            let index = (first + offset) % baseURLs.count
            var attempt = request
            attempt.url = baseURLs[index] + path
            do {
                let result = try await send(attempt, to: baseURLs[index], path: path, as: type, timeout: timeout, signed: signed)
                if index != first { current.withLock { $0 = index } }
                return result
            } catch let error as PoolClientError {
                guard case .unreachable = error else { throw error }
                failure = error
            }
        }
        throw failure ?? PoolClientError.unreachable("no pool URL")
    }

    /// Sends `request` (for `path`) to `baseURL`; with `signed` and a pinned
    /// key, a success must carry the pool's signature over this request's
    /// fresh nonce, the request line and the body, or it is ``PoolClientError/forged(_:)``.
    private func send<Result: Codable & Sendable>(
        _ request: HTTPClientRequest, to baseURL: String, path: String, as type: Result.Type, timeout: TimeAmount?, signed: Bool
    ) async throws -> Result {
        var request = request
        request.headers.add(name: "Accept", value: "application/json")
        request.headers.add(name: "User-Agent", value: "corral-agent")
        var generator = SystemRandomNumberGenerator()
        let nonce = (0..<2).map { _ in String(format: "%016llx", generator.next() as UInt64) }.joined()
        let verifying = signed ? signingKey : nil
        if verifying != nil { request.headers.add(name: ReplySignature.nonceHeader, value: nonce) }
        let status: Int
        let body: ByteBuffer
        let signature: String?
        // The deadline covers the whole exchange, a trickling body included.
        let limit = timeout ?? self.timeout
        do {
            let client = self.client
            let request = request
            guard
                let reply = try await withDeadline(.nanoseconds(limit.nanoseconds), {
                    let response = try await client.execute(request, timeout: limit)
                    let body = try await response.body.collect(upTo: 16 << 20)
                    return (Int(response.status.code), response.headers.first(name: ReplySignature.header), body)
                })
            else { throw PoolClientError.unreachable("\(baseURL): no whole reply within \(limit.nanoseconds / 1_000_000_000) s") }
            (status, signature, body) = reply
        } catch let error as PoolClientError {
            throw error
        } catch {
            throw PoolClientError.unreachable("\(baseURL): \(error)")
        }
        let data = Data(body.readableBytesView)
        if status == 200 || status == 201, let key = verifying {
            guard let signature, signature.hasPrefix(ReplySignature.scheme),
                let bytes = Data(base64Encoded: String(signature.dropFirst(ReplySignature.scheme.count)))
            else { throw PoolClientError.forged("the reply to \(path) carries no signature") }
            let message = ReplySignature.message(
                tokenDigest: tokenDigest, nonce: nonce, method: request.method.rawValue, path: path, body: data)
            guard key.isValidSignature(bytes, for: message) else {
                throw PoolClientError.forged("the reply to \(path) does not match its signature (changed on the way, or not from this pool)")
            }
        }
        if status == 200 || status == 201 {
            do {
                let envelope = try JSONDecoder().decode(Envelope<Result>.self, from: data)
                if envelope.response == .success, let result = envelope.result { return result }
                throw PoolClientError.refused(status: status, message: envelope.message ?? "no result in the reply")
            } catch let error as PoolClientError {
                throw error
            } catch {
                throw PoolClientError.unreachable("\(baseURL) gave an unreadable reply: \(error)")
            }
        }
        let message = (try? JSONDecoder().decode(Envelope<NoResult>.self, from: data))?.message
        throw PoolClientError.refused(status: status, message: message ?? String(decoding: data.prefix(200), as: UTF8.self))
    }
}
