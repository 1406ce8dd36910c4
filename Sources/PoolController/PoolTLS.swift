import NIOSSL

/// The pool's TLS server configuration, from `[server] tls_certificate`
/// and `tls_key` (PEM files). A file that is missing or unreadable stops
/// the pool at start with the key's name, never a plain-HTTP fallback.
enum PoolTLS {
    static func serverConfiguration(certificate: String, key: String) throws -> TLSConfiguration {
        let chain: [NIOSSLCertificate]
        do {
            chain = try NIOSSLCertificate.fromPEMFile(certificate)
        } catch {
            throw PoolError.invalid(field: "server.tls_certificate", reason: "cannot read a PEM certificate from \(certificate): \(error)")
        }
        guard !chain.isEmpty else {
            throw PoolError.invalid(field: "server.tls_certificate", reason: "\(certificate) holds no PEM certificate")
        }
        let privateKey: NIOSSLPrivateKey
        do {
            privateKey = try NIOSSLPrivateKey(file: key, format: .pem)
        } catch {
            throw PoolError.invalid(field: "server.tls_key", reason: "cannot read a PEM private key from \(key): \(error)")
        }
        var configuration = TLSConfiguration.makeServerConfiguration(
            certificateChain: chain.map { .certificate($0) }, privateKey: .privateKey(privateKey))
        configuration.minimumTLSVersion = .tlsv12
        return configuration
    }
}
