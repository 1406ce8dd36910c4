import Crypto
import Foundation

/// An OpenSSH public key line (`TYPE BASE64 [COMMENT]`), checked the way
/// `ssh-keygen -l` reads it: a known type, base64 whose blob names the same
/// type, a sane size, RSA of at least 2048 bits, and a comment that cannot
/// add a line or an option to `authorized_keys`.
public struct SSHPublicKey: Sendable, Equatable {
    /// The key as stored and installed: `TYPE BASE64[ COMMENT]`.
    public var line: String
    public var type: String
    /// `SHA256:` and the unpadded base64 of the blob's SHA-256, as
    /// `ssh-keygen -l` prints it.
    public var fingerprint: String

    static let types: Set<String> = [
        "ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com",
    ]
    /// Longer than any key of the types above (RSA 16384 is about 2.8 KiB).
    static let maximumLength = 8192
    static let maximumCommentLength = 256

    /// Parses `text`, or throws why it is not a usable OpenSSH public key.
    public init(_ text: String) throws(SSHKeyError) {
        let trimmed = text.trimmingCharacters(in: .whitespacesAndNewlines)
        guard !trimmed.isEmpty else { throw SSHKeyError("is empty") }
        guard trimmed.utf8.count <= Self.maximumLength else { throw SSHKeyError("is longer than \(Self.maximumLength) bytes") }
        guard !trimmed.contains(where: { $0.isNewline }) else {
            throw SSHKeyError("holds more than one line; add one key at a time")
        }
        let fields = trimmed.split(separator: " ", maxSplits: 2, omittingEmptySubsequences: true)
        guard fields.count >= 2 else { throw SSHKeyError("must be 'TYPE BASE64 [COMMENT]', as in a .pub file") }
        let type = String(fields[0])
        guard Self.types.contains(type) else {
            if type.contains("=") || type.contains(",") || type.hasPrefix("from") || type.hasPrefix("command") {
                throw SSHKeyError("starts with authorized_keys options; give the bare key, as in a .pub file")
            }
            throw SSHKeyError(
                "has type '\(type.prefix(40))'; use one of \(Self.types.sorted().joined(separator: ", ")) (ssh-keygen -t ed25519 makes one)")
        }
        guard let blob = Data(base64Encoded: String(fields[1])), !blob.isEmpty else {
            throw SSHKeyError("is not valid base64 after its type")
        }
        var reader = BlobReader(blob)
        guard let named = reader.string(), String(decoding: named, as: UTF8.self) == type else {
            throw SSHKeyError("says '\(type)' but its key data is not a \(type) key")
        }
        if type == "ssh-rsa" {
            guard reader.string() != nil, let modulus = reader.string() else { throw SSHKeyError("is a truncated ssh-rsa key") }
            let bits = Self.bits(modulus)
            guard bits >= 2048 else { throw SSHKeyError("is an RSA key of \(bits) bits; use at least 2048 (or ed25519)") }
        } else if type == "ssh-ed25519" {
            guard let point = reader.string(), point.count == 32 else { throw SSHKeyError("is a truncated ssh-ed25519 key") }
        }
        var comment = ""
        if fields.count == 3 {
            comment = String(fields[2])
            guard comment.count <= Self.maximumCommentLength,
                comment.unicodeScalars.allSatisfy({ $0.value >= 0x20 && $0.value != 0x7f })
            else { throw SSHKeyError("has a comment longer than \(Self.maximumCommentLength) characters or with control characters") }
        }
        self.type = type
        self.line = comment.isEmpty ? "\(type) \(fields[1])" : "\(type) \(fields[1]) \(comment)"
        let digest = Data(SHA256.hash(data: blob)).base64EncodedString()
        self.fingerprint = "SHA256:" + digest.replacingOccurrences(of: "=", with: "")
    }

    /// The bit length of an SSH mpint.
    static func bits(_ mpint: Data) -> Int {
        guard let first = mpint.firstIndex(where: { $0 != 0 }) else { return 0 }
        let leading = mpint[first].leadingZeroBitCount
        return (mpint.endIndex - first) * 8 - leading
    }

    /// Reads the length-prefixed strings of an SSH key blob.
    struct BlobReader {
        var data: Data
        var offset: Int

        init(_ data: Data) {
            self.data = data
            self.offset = data.startIndex
        }

        mutating func string() -> Data? {
            guard data.endIndex - offset >= 4 else { return nil }
            let length = data[offset..<offset + 4].reduce(0) { $0 << 8 | Int($1) }
            offset += 4
            guard length <= data.endIndex - offset else { return nil }
            defer { offset += length }
            return data[offset..<offset + length]
        }
    }
}

/// Why a text is not a usable OpenSSH public key.
public struct SSHKeyError: Error, CustomStringConvertible, Equatable {
    public var description: String
    init(_ description: String) { self.description = description }
}
