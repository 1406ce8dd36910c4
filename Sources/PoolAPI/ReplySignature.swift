import Foundation

/// How the pool signs what it tells an appliance to do, so that nobody on
/// the path can inject or change actions or start parameters.
///
/// Each check-in and report an agent sends carries a fresh random nonce in
/// ``nonceHeader``. The pool's `200` reply carries, in ``header``,
/// `ed25519=<base64 signature>` by the pool's Ed25519 key over
/// ``message(tokenDigest:nonce:method:path:body:)``: the appliance's token
/// digest (so a reply to another appliance does not verify), the nonce (so
/// an old reply cannot be replayed), the request line and the body. The
/// agent pins the pool's public key when it registers and refuses any reply
/// that is unsigned or does not verify.
public enum ReplySignature {
    public static let header = "X-Corral-Signature"
    public static let nonceHeader = "X-Corral-Nonce"
    public static let scheme = "ed25519="

    public static func message(tokenDigest: String, nonce: String, method: String, path: String, body: some Sequence<UInt8>)
        -> [UInt8]
    {
        Array("corral-reply-v1\n\(tokenDigest)\n\(nonce)\n\(method) \(path)\n".utf8) + Array(body)
    }

    /// Whether `text` is a nonce an agent sends: 32 to 64 lowercase hex digits.
    public static func isNonce(_ text: String) -> Bool {
        (32...64).contains(text.utf8.count) && text.utf8.allSatisfy { (0x30...0x39).contains($0) || (0x61...0x66).contains($0) }
    }

    /// The 32-byte public key in `text` (base64), or nil.
    public static func publicKeyBytes(_ text: String) -> Data? {
        guard let data = Data(base64Encoded: text), data.count == 32 else { return nil }
        return data
    }
}
