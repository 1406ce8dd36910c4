import AsyncHTTPClient
import Egress
import Foundation
import NIOCore
import NIOPosix
import PoolAPI

/// Follows an instance's callback URL for the appliance: the pool fetches
/// the start parameters from the callback (and from any `callback_url` that
/// reply names, up to `maxHops`), so no appliance ever talks to a third
/// party and no token ever leaves the pool. Each hop is a plain `GET` with no
/// credentials.
///
/// Every hop is guarded: only `http`/`https`; the host's addresses must all
/// be public (loopback, private, link-local, metadata, multicast and other
/// special ranges are refused unless `allow` names them); an `http` request
/// goes to the address that was checked, so a second DNS answer cannot
/// redirect it (and a URL that cannot be pinned so is refused, never
/// fetched unpinned); only the ports in `ports` are reached; redirects are
/// refused; the reply must be JSON start parameters, at most `maxBytes`.
/// The whole chain, every hop's name lookup, headers and body included,
/// must end within `timeoutSeconds`, so a slow or trickling callback holds
/// its appliance's report for no longer than that.
public final class CallbackFetcher: Sendable {
    private let limits: PoolConfiguration.CallbackLimits
    private let guardrail: EgressGuard
    private let client: HTTPClient

    public init(limits: PoolConfiguration.CallbackLimits) {
        self.limits = limits
        self.guardrail = EgressGuard(
            allow: limits.allow.compactMap(IPNetwork.init), ports: limits.ports, purpose: "callbacks",
            allowSetting: "callbacks.allow in the pool's configuration", portsSetting: "callbacks.ports")
        self.client = HTTPClient(
            eventLoopGroup: HTTPClient.defaultEventLoopGroup,
            configuration: .init(redirectConfiguration: .disallow, timeout: .init(connect: .seconds(Int64(limits.timeoutSeconds)))))
        // The chain's deadline (in startParameters) ends every fetch; a
        // hop's own deadline is only a backstop behind it.
    }

    /// Closes the client's connections; call once, at the end.
    public func shutdown() async {
        try? await client.shutdown()
    }

    /// The start parameters at the end of the chain that begins at `url`,
    /// all of it within `timeoutSeconds`.
    public func startParameters(from url: String) async throws(CallbackError) -> StartParameters {
        let seconds = limits.timeoutSeconds
        let hops = limits.maxHops
        do {
            let parameters = try await withDeadline(.seconds(seconds)) {
                var next = url
                for _ in 0..<hops {
                    let parameters = try await self.fetch(next)
                    guard !parameters.callbackURL.isEmpty else { return parameters }
                    next = parameters.callbackURL
                }
                throw CallbackError(url: next, reason: "the chain is longer than \(hops) callbacks")
            }
            guard let parameters else { throw CallbackError(url: url, reason: "no start parameters within \(seconds) s") }
            return parameters
        } catch let error as CallbackError {
            throw error
        } catch {
            throw CallbackError(url: url, reason: "no start parameters within \(seconds) s")
        }
    }

    /// One hop: the guarded fetch of `text`.
    func fetch(_ text: String) async throws(CallbackError) -> StartParameters {
        func refuse(_ reason: String) -> CallbackError { CallbackError(url: text, reason: reason) }
        var request: HTTPClientRequest
        do {
            request = try await guardrail.request(for: text)
        } catch {
            throw refuse(error.reason)
        }
        request.headers.add(name: "Accept", value: "application/json")
        request.headers.add(name: "User-Agent", value: "corral-pool")
        let body: ByteBuffer
        let response: HTTPClientResponse
        do {
            response = try await client.execute(request, timeout: .seconds(Int64(limits.timeoutSeconds) + 1))
            if (300..<400).contains(response.status.code) {
                throw refuse("it answered \(response.status.code) (a redirect); callbacks must answer with JSON directly")
            }
            guard response.status == .ok else { throw refuse("it answered \(response.status.code), not 200") }
            let contentType = response.headers.first(name: "Content-Type")?.lowercased() ?? ""
            guard contentType.hasPrefix("application/json") || contentType.contains("+json") else {
                throw refuse("it answered with Content-Type '\(contentType)'; callbacks must answer application/json")
            }
            body = try await response.body.collect(upTo: limits.maxBytes)
        } catch let error as CallbackError {
            throw error
        } catch is NIOTooManyBytesError {
            throw refuse("the reply is larger than \(limits.maxBytes) bytes")
        } catch let error as HTTPClientError where error == .deadlineExceeded || error == .connectTimeout {
            throw refuse("no reply within \(limits.timeoutSeconds) s")
        } catch {
            throw refuse("the fetch failed: \(error)")
        }
        do {
            return try JSONDecoder().decode(StartParameters.self, from: Data(body.readableBytesView))
        } catch let error as DecodingError {
            throw refuse("the reply is not start parameters: \(describe(error))")
        } catch {
            throw refuse("the reply is not JSON")
        }
    }
}

/// Why a callback gave no start parameters.
public struct CallbackError: Error, Sendable, Equatable, CustomStringConvertible {
    public var url: String
    public var reason: String

    public var description: String { "callback \(url) refused: \(reason)" }
}

