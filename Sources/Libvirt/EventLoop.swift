import CLibvirt
import Foundation
import ServiceLifecycle
import Synchronization

/// libvirt's default event loop, run on a dedicated thread.
///
/// libvirt delivers domain events, connection-close notices and keepalive
/// pings from this loop, so it runs whenever a connection is open: opening a
/// ``Connection`` starts it. As a `Service` it stops cleanly on graceful
/// shutdown or cancellation; a connection opened afterwards starts it again.
public final class EventLoop: Service, Sendable {
    /// The process's event loop (libvirt allows one default loop a process).
    public static let shared = EventLoop()

    private struct State {
        var running = false
        var stopRequested = false
        var stopWaiters: [CheckedContinuation<Void, Never>] = []
    }

    private let state = Mutex(State())

    private init() {}

    /// Whether the loop thread is running.
    public var isRunning: Bool { state.withLock { $0.running } }

    /// Starts the loop thread unless it is running already. A start while a
    /// stop is pending cancels the stop, so a connection just opened is
    /// never left without a loop.
    func start() {
        let (shouldStart, cancelledStops) = state.withLock { state -> (Bool, [CheckedContinuation<Void, Never>]) in
            guard !state.running else {
                state.stopRequested = false
                defer { state.stopWaiters = [] }
                return (false, state.stopWaiters)
            }
            state.running = true
            state.stopRequested = false
            return (true, [])
        }
        for waiter in cancelledStops { waiter.resume() }
        guard shouldStart else { return }
        let thread = Thread { [self] in self.loop() }
        thread.name = "libvirt-events"
        thread.start()
    }

    private func loop() {
        while !state.withLock({ $0.stopRequested }) {
            if virEventRunDefaultImpl() < 0 {
                // Only fails when no implementation is registered, which
                // Runtime guarantees; avoid a hot loop all the same.
                Thread.sleep(forTimeInterval: 0.1)
            }
        }
        let waiters = state.withLock { state in
            state.running = false
            defer { state.stopWaiters = [] }
            return state.stopWaiters
        }
        for waiter in waiters { waiter.resume() }
    }

    /// Stops the loop thread and waits until it has left the loop.
    public func stop() async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let running = state.withLock { state in
                guard state.running else { return false }
                state.stopRequested = true
                state.stopWaiters.append(continuation)
                return true
            }
            guard running else {
                continuation.resume()
                return
            }
            // A zero timeout makes the blocked virEventRunDefaultImpl return
            // at once, so the loop sees the stop request.
            virEventAddTimeout(0, { timer, _ in virEventRemoveTimeout(timer) }, nil, nil)
        }
    }

    /// Runs the loop until graceful shutdown or cancellation, then stops it.
    public func run() async throws {
        Runtime.ensureInitialized()
        try? await gracefulShutdown()
        await stop()
    }
}
