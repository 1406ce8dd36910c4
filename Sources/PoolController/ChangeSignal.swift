import Foundation
import Synchronization

/// Tells listeners that something of theirs changed (for the pool: that an
/// appliance got new actions, so its held check-ins look again). Each
/// listener listens for one key; a signal wakes only that key's listeners.
public final class ChangeSignal: Sendable {
    private struct Listener {
        var key: String
        var continuation: AsyncStream<Void>.Continuation
    }
    private let listeners = Mutex<[UUID: Listener]>([:])

    public init() {}

    /// Wakes the listeners for `key`; with nil, every listener.
    public func signal(_ key: String? = nil) {
        let woken = listeners.withLock { listeners in
            listeners.values.filter { key == nil || $0.key == key }.map(\.continuation)
        }
        for continuation in woken { continuation.yield() }
    }

    /// The changes for `key` from now until `deadline`: a stream that
    /// yields once per change (changes while the listener is busy fold into
    /// one) and ends at the deadline. Nil when `key` already has `limit`
    /// listeners.
    public func changes(for key: String, until deadline: ContinuousClock.Instant, limit: Int = .max) -> AsyncStream<Void>? {
        let (stream, continuation) = AsyncStream.makeStream(of: Void.self, bufferingPolicy: .bufferingNewest(1))
        let id = UUID()
        let added = listeners.withLock { listeners in
            guard listeners.values.count(where: { $0.key == key }) < limit else { return false }
            listeners[id] = Listener(key: key, continuation: continuation)
            return true
        }
        guard added else { return nil }
        continuation.onTermination = { [weak self] _ in _ = self?.listeners.withLock { $0.removeValue(forKey: id) } }
        // Ends the stream at the deadline (a no-op if it ended before).
        Task {
            try? await Task.sleep(until: deadline)
            continuation.finish()
        }
        return stream
    }
}
