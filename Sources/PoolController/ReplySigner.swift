import Crypto
import Foundation
import HTTPTypes
import Hummingbird
import PoolAPI
import Synchronization

/// Signs the pool's replies to appliances (see ``ReplySignature``) with the
/// key kept in the store, loaded once.
final class ReplySigner: Sendable {
    private let store: any PoolStore
    private let cached = Mutex<Curve25519.Signing.PrivateKey?>(nil)

    init(store: any PoolStore) { self.store = store }

    func key() async throws -> Curve25519.Signing.PrivateKey {
        if let key = cached.withLock({ $0 }) { return key }
        let key = try Curve25519.Signing.PrivateKey(rawRepresentation: try await store.signingKey())
        cached.withLock { $0 = key }
        return key
    }

    /// The public key, base64, as agents pin it.
    func publicKey() async throws -> String {
        try await key().publicKey.rawRepresentation.base64EncodedString()
    }

    /// A `200` reply carrying `value`, signed for the appliance whose token
    /// is `token` and the request's nonce. 400 for a malformed nonce.
    func reply<T: Encodable>(_ value: T, to request: Request, token: String) async throws -> Response {
        // Absent, the signature covers an empty nonce; present, it must be one.
        let sent = request.headers[HTTPField.Name(ReplySignature.nonceHeader)!]
        let nonce = sent ?? ""
        guard sent == nil || ReplySignature.isNonce(nonce) else {
            throw Refusal(.badRequest, "header \(ReplySignature.nonceHeader) must be 32 to 64 lowercase hex digits")
        }
        let body = try replyBody(value)
        let message = ReplySignature.message(
            tokenDigest: Token.digest(token), nonce: nonce, method: request.method.rawValue, path: request.uri.path, body: body)
        let signature = try await key().signature(for: message)
        var response = PoolController.reply(.ok, json: body)
        response.headers[HTTPField.Name(ReplySignature.header)!] = ReplySignature.scheme + signature.base64EncodedString()
        return response
    }
}
