import CLibvirt
import NIOPosix

/// Process-wide libvirt set-up, done once before the first connection.
enum Runtime {
    /// libvirt requires the event implementation to be registered before any
    /// connection is opened; keepalive and event callbacks depend on it.
    private static let initialized: Bool = {
        virInitialize()
        // Errors are read per call with virGetLastError; without this libvirt
        // also prints each one to stderr.
        virSetErrorFunc(nil, corral_ignore_error)
        virEventRegisterDefaultImpl()
        return true
    }()

    /// Threads for blocking libvirt calls, so none runs on Swift's
    /// cooperative pool. libvirt's client is thread-safe, so calls on one
    /// connection may run here concurrently.
    static let threadPool: NIOThreadPool = {
        let pool = NIOThreadPool(numberOfThreads: 8)
        pool.start()
        return pool
    }()

    static func ensureInitialized() {
        _ = initialized
        EventLoop.shared.start()
    }
}

/// Runs a blocking libvirt call on the wrapper's thread pool. The body runs
/// start to finish on one thread, so libvirt's per-thread last error is read
/// on the thread of the failing call.
func blocking<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
    try await Runtime.threadPool.runIfActive(body)
}
