/// One of a user's SSH public keys as `/v1/ssh-key` shows it.
public struct ServerSSHKey: Codable, Sendable, Equatable {
    /// 32 hex digits.
    public var id: String
    public var name: String
    /// The OpenSSH public key line.
    public var publicKey: String
    /// `SHA256:...`, as `ssh-keygen -l` prints it.
    public var fingerprint: String
    /// RFC 3339, UTC.
    public var created: String

    enum CodingKeys: String, CodingKey {
        case id, name, fingerprint, created
        case publicKey = "public-key"
    }

    public init(id: String, name: String, publicKey: String, fingerprint: String, created: String) {
        self.id = id
        self.name = name
        self.publicKey = publicKey
        self.fingerprint = fingerprint
        self.created = created
    }
}
