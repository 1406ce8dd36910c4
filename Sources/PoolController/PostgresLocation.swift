import Foundation
import NIOSSL
import PostgresNIO

/// Where a PostgreSQL pool database is:
/// `postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE[?sslmode=MODE&sslrootcert=FILE]`
/// (`postgresql://` too). `sslmode` is `disable` (the default), `require`
/// (encrypted, the server's certificate not checked, as libpq's) or
/// `verify-full` (checked against `sslrootcert`, else the system's CAs).
public struct PostgresLocation: Sendable, Equatable {
    public enum TLSMode: String, Sendable, Equatable {
        case disable
        case require
        case verifyFull = "verify-full"
    }

    public var host: String
    public var port: Int
    public var user: String
    public var password: String?
    public var database: String
    public var tls: TLSMode
    public var rootCertificate: String?

    /// Whether `text` names a PostgreSQL database rather than a SQLite file.
    public static func isURL(_ text: String) -> Bool {
        text.hasPrefix("postgres://") || text.hasPrefix("postgresql://")
    }

    /// Parses a URL; a bad one is ``PoolError/invalid(field:reason:)`` of `field`.
    public init(url text: String, field: String = "database.url") throws {
        func refuse(_ reason: String) -> PoolError {
            .invalid(field: field, reason: "\(reason); write postgres://USER:PASSWORD@HOST:PORT/DATABASE")
        }
        guard Self.isURL(text), text.utf8.count <= 2048, let url = URLComponents(string: text) else {
            throw refuse("not a postgres:// URL")
        }
        guard let host = url.host, !host.isEmpty else { throw refuse("it names no host") }
        guard let user = url.user, !user.isEmpty else { throw refuse("it names no user") }
        let database = String(url.path.dropFirst())
        guard !database.isEmpty, !database.contains("/") else { throw refuse("it names no database (the path after the host)") }
        if let port = url.port, !(1...65535).contains(port) { throw refuse("port \(port) is not 1-65535") }
        self.host = host.hasPrefix("[") ? String(host.dropFirst().dropLast()) : host
        self.port = url.port ?? 5432
        self.user = url.user?.removingPercentEncoding ?? user
        self.password = url.password?.removingPercentEncoding
        self.database = database.removingPercentEncoding ?? database
        tls = .disable
        for item in url.queryItems ?? [] {
            switch item.name {
            case "sslmode":
                guard let mode = TLSMode(rawValue: item.value ?? "") else {
                    throw PoolError.invalid(field: field, reason: "sslmode must be disable, require or verify-full")
                }
                tls = mode
            case "sslrootcert":
                guard let path = item.value, path.hasPrefix("/") else {
                    throw PoolError.invalid(field: field, reason: "sslrootcert must be an absolute path to a PEM file")
                }
                rootCertificate = path
            default:
                throw PoolError.invalid(
                    field: field, reason: "unknown parameter '\(item.name.prefix(64))'; only sslmode and sslrootcert are understood")
            }
        }
    }

    /// The URL with its password left out, for logs and errors.
    public var redacted: String {
        let host = self.host.contains(":") ? "[\(self.host)]" : self.host
        return "postgres://\(user)\(password == nil ? "" : ":…")@\(host):\(port)/\(database)"
    }

    /// The TLS configuration `sslmode` asks for; nil for none.
    private func tlsConfiguration() throws -> TLSConfiguration? {
        guard tls != .disable else { return nil }
        var configuration = TLSConfiguration.makeClientConfiguration()
        if tls == .require { configuration.certificateVerification = .none }
        if let rootCertificate {
            let certificates = try? NIOSSLCertificate.fromPEMFile(rootCertificate)
            guard let certificates, !certificates.isEmpty else {
                throw PoolError.invalid(
                    field: "database.url", reason: "sslrootcert \(rootCertificate) holds no PEM certificate that can be read")
            }
            configuration.trustRoots = .certificates(certificates)
        }
        return configuration
    }

    /// The pool of connections' TLS setting.
    func clientTLS() throws -> PostgresClient.Configuration.TLS {
        try tlsConfiguration().map { .require($0) } ?? .disable
    }

    /// The configuration of a connection of the store's own, outside its
    /// pool (the listener's, the leader's).
    func connectionConfiguration() throws -> PostgresConnection.Configuration {
        PostgresConnection.Configuration(
            host: host, port: port, username: user, password: password, database: database,
            tls: try tlsConfiguration().map { .require(try NIOSSLContext(configuration: $0)) } ?? .disable)
    }
}
