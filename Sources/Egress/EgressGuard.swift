import AsyncHTTPClient
import Foundation
import NIOPosix

#if canImport(Glibc)
import Glibc
#endif

/// Where an outgoing request to a URL someone else chose may go: the
/// pool's callbacks and the agent's image downloads both pass through one.
///
/// Only `http`/`https` URLs without credentials; every address the host
/// resolves to must be public (loopback, private, link-local, metadata,
/// multicast and the other special ranges of ``IPAddressBytes/specialUse``
/// are refused unless `allow` names them); only the ports in `ports` (any
/// when empty). An `http` request goes to the address that was checked, so
/// a second DNS answer cannot redirect it, and a URL that cannot be pinned
/// so is refused, never sent unpinned. A redirect is a new URL: send it
/// through ``request(for:)`` again, or refuse it.
public struct EgressGuard: Sendable {
    public var allow: [IPNetwork]
    public var ports: [Int]
    /// What the requests are for, in refusals: "callbacks".
    public var purpose: String
    /// The settings that widen the guard, in refusals:
    /// "callbacks.allow in the pool's configuration".
    public var allowSetting: String
    public var portsSetting: String

    public init(allow: [IPNetwork], ports: [Int], purpose: String, allowSetting: String, portsSetting: String) {
        self.allow = allow
        self.ports = ports
        self.purpose = purpose
        self.allowSetting = allowSetting
        self.portsSetting = portsSetting
    }

    /// The request to send for `text`, once the URL, its addresses and its
    /// port have passed; otherwise why not.
    public func request(for text: String) async throws(EgressRefusal) -> HTTPClientRequest {
        guard let url = URL(string: text), let scheme = url.scheme?.lowercased(), ["http", "https"].contains(scheme),
            let host = url.host, !host.isEmpty
        else { throw EgressRefusal("only absolute http or https URLs are followed") }
        guard url.user == nil, url.password == nil else { throw EgressRefusal("URLs carrying credentials are refused") }
        let port = url.port ?? (scheme == "https" ? 443 : 80)
        let bareHost = host.trimmingCharacters(in: CharacterSet(charactersIn: "[]"))
        let addresses: [IPAddressBytes]
        do {
            addresses = try await Self.resolve(host: bareHost, port: port)
        } catch {
            throw EgressRefusal("cannot resolve \(host): \(error)")
        }
        guard let first = addresses.first else { throw EgressRefusal("\(host) has no address") }
        for address in addresses {
            if let reason = address.specialUse, !allow.contains(where: { $0.contains(address) }) {
                let what = IPAddressBytes(bareHost) != nil ? "\(address) is" : "\(host) resolves to"
                throw EgressRefusal(
                    "\(what) a \(reason) address; \(purpose) may only reach public addresses unless \(allowSetting) names the network")
            }
        }
        guard ports.isEmpty || ports.contains(port) else {
            throw EgressRefusal(
                "port \(port) is not one \(purpose) may reach (\(portsSetting): \(ports.map(String.init).joined(separator: ", ")))")
        }
        guard scheme == "http" else { return HTTPClientRequest(url: text) }
        // Connect to the address just checked, not to a new DNS answer.
        guard var components = URLComponents(url: url, resolvingAgainstBaseURL: false) else {
            throw EgressRefusal("the URL cannot be pinned to the address checked")
        }
        components.host = first.isIPv6 ? "[\(first)]" : "\(first)"
        guard let pinned = components.string else { throw EgressRefusal("the URL cannot be pinned to the address checked") }
        var request = HTTPClientRequest(url: pinned)
        request.headers.replaceOrAdd(name: "Host", value: url.port.map { "\(host):\($0)" } ?? host)
        return request
    }

    /// The addresses `host` resolves to (an address literal resolves to itself).
    static func resolve(host: String, port: Int) async throws -> [IPAddressBytes] {
        if let literal = IPAddressBytes(host) { return [literal] }
        return try await NIOThreadPool.singleton.runIfActive {
            var hints = addrinfo()
            hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
            var list: UnsafeMutablePointer<addrinfo>?
            let status = getaddrinfo(host, String(port), &hints, &list)
            guard status == 0, let list else { throw EgressRefusal(String(cString: gai_strerror(status))) }
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

/// Why the guard refused a URL.
public struct EgressRefusal: Error, Sendable, Equatable, CustomStringConvertible {
    public var reason: String
    public init(_ reason: String) { self.reason = reason }
    public var description: String { reason }
}

/// Runs `work`, or gives up once `limit` has passed: nil then, and `work`
/// is cancelled. For a deadline on a whole exchange (name lookup, headers
/// and a body that may trickle), which a client's own timeouts do not give.
public func withDeadline<T: Sendable>(_ limit: Duration, _ work: @Sendable @escaping () async throws -> T) async throws -> T? {
    try await withThrowingTaskGroup(of: T?.self) { group in
        group.addTask { try await work() }
        group.addTask {
            try await Task.sleep(for: limit)
            return nil
        }
        defer { group.cancelAll() }
        guard let first = try await group.next() else { return nil }
        return first
    }
}
