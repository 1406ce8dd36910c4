import CLibvirt
import Foundation

/// Calls that go through the QEMU guest agent (`qemu-guest-agent` in the
/// guest, on the domain's `org.qemu.guest_agent.0` channel). Each fails
/// with libvirt's "guest agent is not connected" until the guest has
/// started its agent. The guest answers these, so treat what it says as
/// the guest's word, not the host's.
extension Domain {
    /// How long libvirt waits for the guest agent's answer to each call.
    public static let guestAgentTimeoutSeconds: Int32 = 10

    /// Whether the guest agent answers `guest-ping` now.
    public func guestAgentAnswers() async -> Bool {
        (try? await guestAgentCommand(#"{"execute":"guest-ping"}"#)) != nil
    }

    /// Replaces `user`'s `~/.ssh/authorized_keys` in the guest with
    /// `keys` (virDomainAuthorizedSSHKeysSet; an empty list empties it).
    public func setAuthorizedSSHKeys(_ keys: [String], user: String) async throws {
        try await withPointer("set SSH keys of") { domain in
            try check(
                virDomainAgentSetResponseTimeout(domain, Self.guestAgentTimeoutSeconds, 0),
                "set the guest agent timeout of domain '\(name)'")
            let result = withCStrings(keys) { pointers in
                pointers.withUnsafeMutableBufferPointer { buffer in
                    buffer.withMemoryRebound(to: UnsafePointer<CChar>?.self) { rebound in
                        virDomainAuthorizedSSHKeysSet(domain, user, rebound.baseAddress, UInt32(keys.count), 0)
                    }
                }
            }
            try check(result, "set SSH keys of user '\(user)' in domain '\(name)'")
        }
    }

    /// `user`'s authorized keys in the guest, as the guest agent reads them.
    public func authorizedSSHKeys(user: String) async throws -> [String] {
        try await withPointer("read SSH keys of") { domain in
            try check(
                virDomainAgentSetResponseTimeout(domain, Self.guestAgentTimeoutSeconds, 0),
                "set the guest agent timeout of domain '\(name)'")
            var keys: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?
            let count = try check(
                virDomainAuthorizedSSHKeysGet(domain, user, &keys, 0), "read SSH keys of user '\(user)' in domain '\(name)'")
            guard let keys else { return [] }
            defer { free(keys) }
            return (0..<Int(count)).compactMap { takeString(keys[$0]) }
        }
    }

    /// Starts `/bin/sh -c script` in the guest as root, with `input` on its
    /// standard input (guest-exec), and returns the guest's process id at
    /// once, without waiting for it to end.
    public func startInGuest(script: String, input: Data) async throws -> Int {
        struct Exec: Encodable {
            struct Arguments: Encodable {
                var path: String
                var arg: [String]
                var inputData: String
                var captureOutput: Bool
                enum CodingKeys: String, CodingKey {
                    case path, arg
                    case inputData = "input-data"
                    case captureOutput = "capture-output"
                }
            }
            var execute = "guest-exec"
            var arguments: Arguments
        }
        struct Reply: Decodable {
            struct Return: Decodable { var pid: Int }
            var `return`: Return
        }
        let command = Exec(
            arguments: .init(path: "/bin/sh", arg: ["-c", script], inputData: input.base64EncodedString(), captureOutput: false))
        let reply = try await guestAgentCommand(String(decoding: try JSONEncoder().encode(command), as: UTF8.self))
        do {
            return try JSONDecoder().decode(Reply.self, from: Data(reply.utf8)).return.pid
        } catch {
            throw LibvirtError(
                operation: "start a process in domain '\(name)'", code: .wrapper,
                message: "the guest agent answered guest-exec with no process id: \(String(reflecting: String(reply.prefix(200))))")
        }
    }

    /// Sends one raw guest agent command (JSON) and returns its raw reply.
    func guestAgentCommand(_ command: String) async throws -> String {
        try await withPointer("send a guest agent command to") { domain in
            try check(
                takeString(virDomainQemuAgentCommand(domain, command, Self.guestAgentTimeoutSeconds, 0)),
                "send a guest agent command to domain '\(name)'")
        }
    }
}

/// Calls `body` with NUL-terminated copies of `strings`, valid only during
/// the call.
private func withCStrings<T>(_ strings: [String], _ body: (inout [UnsafeMutablePointer<CChar>?]) -> T) -> T {
    var pointers: [UnsafeMutablePointer<CChar>?] = strings.map { strdup($0) }
    defer { pointers.forEach { free($0) } }
    return body(&pointers)
}
