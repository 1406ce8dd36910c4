import Foundation
import Synchronization

/// Tells every listener that something changed (for the pool: that the
/// action table did, so a held check-in looks again).
public final class ChangeSignal: Sendable {
    private let listeners = Mutex<[UUID: AsyncStream<Void>.Continuation]>([:])

    public init() {}

    public func signal() {
        for listener in listeners.withLock({ Array($0.values) }) { listener.yield() }
    }

    /// The changes from now until `deadline`: a stream that yields once per
    /// change (changes while the listener is busy fold into one) and ends at
    /// the deadline.
    public func changes(until deadline: ContinuousClock.Instant) -> AsyncStream<Void> {
        let (stream, continuation) = AsyncStream.makeStream(of: Void.self, bufferingPolicy: .bufferingNewest(1))
        let id = UUID()
        listeners.withLock { $0[id] = continuation }
        continuation.onTermination = { [weak self] _ in _ = self?.listeners.withLock { $0.removeValue(forKey: id) } }
        // Ends the stream at the deadline (a no-op if it ended before).
        Task {
            try? await Task.sleep(until: deadline)
            continuation.finish()
        }
        return stream
    }
}
