import AsyncHTTPClient
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
    private let allow: [IPNetwork]
    private let client: HTTPClient

    public init(limits: PoolConfiguration.CallbackLimits) {
        self.limits = limits
        self.allow = limits.allow.compactMap(IPNetwork.init)
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
            return try await withThrowingTaskGroup(of: StartParameters?.self) { group in
                group.addTask {
                    var next = url
                    for _ in 0..<hops {
                        let parameters = try await self.fetch(next)
                        guard !parameters.callbackURL.isEmpty else { return parameters }
                        next = parameters.callbackURL
                    }
                    throw CallbackError(url: next, reason: "the chain is longer than \(hops) callbacks")
                }
                group.addTask {
                    try await Task.sleep(for: .seconds(seconds))
                    return nil
                }
                defer { group.cancelAll() }
                guard let first = try await group.next(), let parameters = first else {
                    throw CallbackError(url: url, reason: "no start parameters within \(seconds) s")
                }
                return parameters
            }
        } catch let error as CallbackError {
            throw error
        } catch {
            throw CallbackError(url: url, reason: "no start parameters within \(seconds) s")
        }
    }

    /// One hop: the guarded fetch of `text`.
    func fetch(_ text: String) async throws(CallbackError) -> StartParameters {
        func refuse(_ reason: String) -> CallbackError { CallbackError(url: text, reason: reason) }
        guard let url = URL(string: text), let scheme = url.scheme?.lowercased(), ["http", "https"].contains(scheme),
            let host = url.host, !host.isEmpty
        else { throw refuse("only absolute http or https URLs are followed") }
        guard url.user == nil, url.password == nil else { throw refuse("URLs carrying credentials are refused") }
        let port = url.port ?? (scheme == "https" ? 443 : 80)
        let bareHost = host.trimmingCharacters(in: CharacterSet(charactersIn: "[]"))
        let addresses: [IPAddressBytes]
        do {
            addresses = try await resolve(host: bareHost, port: port)
        } catch {
            throw refuse("cannot resolve \(host): \(error)")
        }
        guard let first = addresses.first else { throw refuse("\(host) has no address") }
        for address in addresses {
            if let reason = address.specialUse, !allow.contains(where: { $0.contains(address) }) {
                let what = IPAddressBytes(bareHost) != nil ? "\(address) is" : "\(host) resolves to"
                throw refuse(
                    "\(what) a \(reason) address; callbacks may only reach public addresses unless callbacks.allow in the pool's configuration names the network"
                )
            }
        }
        guard limits.ports.isEmpty || limits.ports.contains(port) else {
            throw refuse(
                "port \(port) is not one callbacks may reach (callbacks.ports: \(limits.ports.map(String.init).joined(separator: ", ")))")
        }
        var target = text
        var request = HTTPClientRequest(url: text)
        if scheme == "http" {
            // Connect to the address just checked, not to a new DNS answer;
            // a URL that cannot be pinned is refused, never fetched unpinned.
            guard var components = URLComponents(url: url, resolvingAgainstBaseURL: false) else {
                throw refuse("the URL cannot be pinned to the address checked")
            }
            components.host = first.isIPv6 ? "[\(first)]" : "\(first)"
            guard let pinned = components.string else { throw refuse("the URL cannot be pinned to the address checked") }
            target = pinned
            request = HTTPClientRequest(url: target)
            request.headers.replaceOrAdd(name: "Host", value: url.port.map { "\(host):\($0)" } ?? host)
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

    /// The addresses `host` resolves to (an address literal resolves to itself).
    private func resolve(host: String, port: Int) async throws -> [IPAddressBytes] {
        if let literal = IPAddressBytes(host) { return [literal] }
        return try await NIOThreadPool.singleton.runIfActive {
            var hints = addrinfo()
            hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
            var list: UnsafeMutablePointer<addrinfo>?
            let status = getaddrinfo(host, String(port), &hints, &list)
            guard status == 0, let list else { throw CallbackError(url: host, reason: String(cString: gai_strerror(status))) }
            defer { freeaddrinfo(list) }
            var addresses: [IPAddressBytes] = []
            for entry in sequence(first: list, next: { $0.pointee.ai_next }) {
                guard let address = entry.pointee.ai_addr else { continue }
                switch Int32(address.pointee.sa_family) {
                case AF_INET:
                    address.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { ipv4 in
                        withUnsafeBytes(of: ipv4.pointee.sin_addr) { addresses.append(IPAddressBytes(bytes: Array($0))) }
                    }
                case AF_INET6:
                    address.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { ipv6 in
                        withUnsafeBytes(of: ipv6.pointee.sin6_addr) { addresses.append(IPAddressBytes(bytes: Array($0))) }
                    }
                default: continue
                }
            }
            return addresses
        }
    }
}

/// Why a callback gave no start parameters.
public struct CallbackError: Error, Sendable, Equatable, CustomStringConvertible {
    public var url: String
    public var reason: String

    public var description: String { "callback \(url) refused: \(reason)" }
}

/// An IPv4 (4 bytes) or IPv6 (16 bytes) address.
public struct IPAddressBytes: Sendable, Equatable, CustomStringConvertible {
    public var bytes: [UInt8]

    public init(bytes: [UInt8]) { self.bytes = bytes }

    /// Parses a textual IPv4 or IPv6 address.
    public init?(_ text: String) {
        var ipv4 = in_addr()
        var ipv6 = in6_addr()
        if inet_pton(AF_INET, text, &ipv4) == 1 {
            bytes = withUnsafeBytes(of: ipv4) { Array($0) }
        } else if inet_pton(AF_INET6, text, &ipv6) == 1 {
            bytes = withUnsafeBytes(of: ipv6) { Array($0) }
        } else {
            return nil
        }
    }

    public var isIPv6: Bool { bytes.count == 16 }

    public var description: String {
        var buffer = [CChar](repeating: 0, count: Int(INET6_ADDRSTRLEN))
        return bytes.withUnsafeBytes { raw in
            inet_ntop(isIPv6 ? AF_INET6 : AF_INET, raw.baseAddress, &buffer, socklen_t(buffer.count))
            return String(cString: buffer)
        }
    }

    /// The IPv4 address an IPv6 address carries: IPv4-mapped, -compatible
    /// or -translated, NAT64 (well-known prefix) or 6to4.
    var embeddedIPv4: IPAddressBytes? {
        guard isIPv6 else { return nil }
        if IPNetwork.embeddingLastFour.contains(where: { $0.contains(self) }) {
            return IPAddressBytes(bytes: Array(bytes[12...]))
        }
        if IPNetwork.sixToFour.contains(self) { return IPAddressBytes(bytes: Array(bytes[2..<6])) }
        return nil
    }

    /// What kind of non-public address this is, or nil for a public one.
    /// An IPv6 address is public only in global unicast (2000::/3) outside
    /// the special blocks; one that carries an IPv4 address is what that
    /// address is.
    public var specialUse: String? {
        if let kind = IPNetwork.special.first(where: { $0.network.contains(self) })?.kind { return kind }
        if let ipv4 = embeddedIPv4 { return ipv4.specialUse }
        if isIPv6, !IPNetwork.globalUnicast.contains(self) { return "non-global (outside 2000::/3)" }
        return nil
    }
}

/// An address range in CIDR form.
public struct IPNetwork: Sendable, Equatable {
    public var address: IPAddressBytes
    public var prefixLength: Int

    /// Parses `ADDRESS/PREFIX`, or a lone address (a network of one).
    public init?(_ text: String) {
        let parts = text.split(separator: "/", maxSplits: 1, omittingEmptySubsequences: false).map(String.init)
        guard let first = parts.first, let address = IPAddressBytes(first) else { return nil }
        let maximum = address.bytes.count * 8
        let length = parts.count == 2 ? (parts[1].utf8.allSatisfy { (0x30...0x39).contains($0) } ? Int(parts[1]) : nil) : maximum
        guard let length, (0...maximum).contains(length) else { return nil }
        self.address = address
        self.prefixLength = length
    }

    public func contains(_ other: IPAddressBytes) -> Bool {
        guard other.bytes.count == address.bytes.count else { return false }
        var remaining = prefixLength
        for (mine, theirs) in zip(address.bytes, other.bytes) where remaining > 0 {
            let bits = min(8, remaining)
            let mask = UInt8(truncatingIfNeeded: 0xFF << (8 - bits))
            if mine & mask != theirs & mask { return false }
            remaining -= bits
        }
        return true
    }

    /// Prefixes whose addresses carry an IPv4 address in their last four
    /// bytes: IPv4-mapped, IPv4-translated (SIIT), IPv4-compatible
    /// (deprecated; `::` and `::1` are matched first) and NAT64.
    static let embeddingLastFour = ["::ffff:0:0/96", "::ffff:0:0:0/96", "::/96", "64:ff9b::/96"].compactMap(IPNetwork.init)
    /// 6to4: the IPv4 address is in bytes 2 to 5.
    static let sixToFour = IPNetwork("2002::/16")!
    static let globalUnicast = IPNetwork("2000::/3")!

    /// Ranges that are not the public internet (RFC 6890 and friends).
    static let special: [(network: IPNetwork, kind: String)] = [
        ("0.0.0.0/8", "unspecified"), ("10.0.0.0/8", "private"), ("100.64.0.0/10", "carrier-grade NAT"),
        ("127.0.0.0/8", "loopback"), ("169.254.0.0/16", "link-local (cloud metadata)"), ("172.16.0.0/12", "private"),
        ("192.0.0.0/24", "IETF protocol"), ("192.0.2.0/24", "documentation"), ("192.168.0.0/16", "private"),
        ("198.18.0.0/15", "benchmarking"), ("198.51.100.0/24", "documentation"), ("203.0.113.0/24", "documentation"),
        ("224.0.0.0/4", "multicast"), ("240.0.0.0/4", "reserved"), ("192.88.99.0/24", "6to4 relay anycast"),
        ("::/128", "unspecified"), ("::1/128", "loopback"), ("64:ff9b:1::/48", "local-use NAT64"), ("100::/64", "discard"),
        ("2001::/23", "IETF protocol (Teredo, benchmarking, ORCHID)"), ("2001:db8::/32", "documentation"),
        ("3fff::/20", "documentation"), ("5f00::/16", "SRv6"), ("fc00::/7", "unique local (private)"), ("fe80::/10", "link-local"),
        ("fec0::/10", "site-local"), ("ff00::/8", "multicast"),
    ].compactMap { network, kind in IPNetwork(network).map { ($0, kind) } }
}
