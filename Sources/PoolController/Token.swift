import Crypto
import Foundation

/// API tokens: 256 random bits from the system's CSPRNG, shown once.
/// The pool stores only their SHA-256 digest and looks tokens up by it, so
/// neither the store nor the lookup's timing reveals a token.
public enum Token {
    /// A new token: 64 hex characters.
    public static func generate() -> String {
        var generator = SystemRandomNumberGenerator()  // getrandom(2) on Linux
        let bytes = (0..<4).flatMap { _ in withUnsafeBytes(of: generator.next() as UInt64) { Array($0) } }
        return hex(bytes)
    }

    /// The digest stored for a token.
    public static func digest(_ token: String) -> String {
        hex(Array(SHA256.hash(data: Data(token.utf8))))
    }

    private static let hexDigits = Array("0123456789abcdef".utf8)

    private static func hex(_ bytes: [UInt8]) -> String {
        String(decoding: bytes.flatMap { [hexDigits[Int($0 >> 4)], hexDigits[Int($0 & 0x0f)]] }, as: UTF8.self)
    }
}
