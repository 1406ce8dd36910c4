import Foundation

/// An OpenSSH public key for tests that need one to pass the pool's
/// checks (its private half was never kept).
public let testPublicKeyLine =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIIHZ8JnWc+z3/zJJiKt1Cro4ujEteI339oycafay6epu corral-test"

/// Writes ``testPublicKeyLine`` to `test-key.pub` in `directory`; returns the path.
public func writeTestPublicKey(in directory: URL) throws -> String {
    let path = directory.appendingPathComponent("test-key.pub").path
    try (testPublicKeyLine + "\n").write(toFile: path, atomically: true, encoding: .utf8)
    return path
}
