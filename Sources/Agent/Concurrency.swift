import Foundation
import Synchronization

/// At most `limit` holders at once; the others wait in order. Waiting is
/// cancellable.
actor Semaphore {
    private let limit: Int
    private var held = 0
    private var waiters: [(id: UUID, continuation: CheckedContinuation<Void, any Error>)] = []

    init(limit: Int) { self.limit = limit }

    func acquire() async throws {
        if held < limit {
            held += 1
            return
        }
        let id = UUID()
        try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, any Error>) in
                if Task.isCancelled {
                    continuation.resume(throwing: CancellationError())
                } else {
                    waiters.append((id, continuation))
                }
            }
        } onCancel: {
            Task { await self.cancel(id) }
        }
    }

    private func cancel(_ id: UUID) {
        guard let index = waiters.firstIndex(where: { $0.id == id }) else { return }
        waiters.remove(at: index).continuation.resume(throwing: CancellationError())
    }

    func release() {
        if waiters.isEmpty {
            held -= 1
        } else {
            // The slot passes straight to the next waiter.
            waiters.removeFirst().continuation.resume()
        }
    }

    func withPermit<T: Sendable>(_ body: @Sendable () async throws -> T) async throws -> T {
        try await acquire()
        do {
            let value = try await body()
            release()
            return value
        } catch {
            release()
            throw error
        }
    }
}

/// One lock per key (an instance's name), so that actions, builds and
/// reconciles of one instance never interleave while different instances
/// proceed side by side.
actor KeyedLocks {
    private var locks: [String: Semaphore] = [:]
    private var users: [String: Int] = [:]

    func withLock<T: Sendable>(_ key: String, _ body: @Sendable () async throws -> T) async throws -> T {
        let lock = locks[key] ?? Semaphore(limit: 1)
        locks[key] = lock
        users[key, default: 0] += 1
        defer {
            users[key, default: 1] -= 1
            if users[key] == 0 {
                users[key] = nil
                locks[key] = nil
            }
        }
        return try await lock.withPermit(body)
    }
}

/// Capped exponential backoff with full jitter: attempt n waits a random
/// time up to min(cap, base * 2^n).
struct Backoff {
    let base: Duration
    let cap: Duration
    private(set) var attempt = 0

    init(base: Duration = .seconds(1), cap: Duration = .seconds(60)) {
        self.base = base
        self.cap = cap
    }

    mutating func next() -> Duration {
        let factor = Double(1 << min(attempt, 20))
        attempt += 1
        let ceiling = min(cap / .seconds(1), (base / .seconds(1)) * factor)
        return .milliseconds(Int(Double.random(in: (ceiling / 2)...ceiling) * 1000))
    }

    mutating func reset() { attempt = 0 }
}

/// A wake-up signal for one waiting loop: `signal()` makes the current
/// (or next) `wait` return; signals while nobody waits collapse into one.
final class Wakeup: Sendable {
    private struct State {
        var pending = false
        var waiter: (id: UUID, continuation: CheckedContinuation<Void, Never>)?
    }

    private let state = Mutex(State())

    init() {}

    func signal() {
        let waiter = state.withLock { state -> CheckedContinuation<Void, Never>? in
            guard let waiter = state.waiter else {
                state.pending = true
                return nil
            }
            state.waiter = nil
            return waiter.continuation
        }
        waiter?.resume()
    }

    /// Returns on a signal, after `timeout`, or when the task is cancelled.
    func wait(timeout: Duration) async {
        let id = UUID()
        let timer = Task {
            try? await Task.sleep(for: timeout)
            self.resume(id)
        }
        await withTaskCancellationHandler {
            await withCheckedContinuation { continuation in
                let now = state.withLock { state -> Bool in
                    if state.pending || Task.isCancelled {
                        state.pending = false
                        return true
                    }
                    state.waiter = (id, continuation)
                    return false
                }
                if now { continuation.resume() }
            }
        } onCancel: {
            self.resume(id)
        }
        timer.cancel()
    }

    private func resume(_ id: UUID) {
        let waiter = state.withLock { state -> CheckedContinuation<Void, Never>? in
            guard let waiter = state.waiter, waiter.id == id else { return nil }
            state.waiter = nil
            return waiter.continuation
        }
        waiter?.resume()
    }
}
