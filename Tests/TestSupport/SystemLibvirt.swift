import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// Coordinates tests that use the machine's libvirtd (`qemu:///system`) or
/// depend on libvirt's process-wide event loop.
///
/// Most take the lock shared and run side by side; a test that restarts
/// libvirtd or stops the event loop takes it exclusively. It is a file
/// lock, so it also holds between test processes.
public enum SystemLibvirt {
    public static let uri = "qemu:///system"
    private static let lockPath = "/run/corral-tests-libvirt.lock"

    /// Runs `body` while no test restarts libvirtd.
    public static func shared<T: Sendable>(_ body: () async throws -> T) async throws -> T {
        try await locked(LOCK_SH, body)
    }

    /// Runs `body` while no other test uses libvirtd.
    public static func exclusive<T: Sendable>(_ body: () async throws -> T) async throws -> T {
        try await locked(LOCK_EX, body)
    }

    private static func locked<T: Sendable>(_ mode: Int32, _ body: () async throws -> T) async throws -> T {
        let descriptor = open(lockPath, O_CREAT | O_RDWR | O_CLOEXEC, 0o644)
        guard descriptor >= 0 else { throw SetupError("cannot open \(lockPath): errno \(errno)") }
        defer { close(descriptor) }
        // flock blocks: wait for it on a thread of its own.
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            Thread.detachNewThread {
                while flock(descriptor, mode) != 0 && errno == EINTR {}
                continuation.resume()
            }
        }
        return try await body()
    }
}
