import Foundation
import PoolAPI
import ServiceLifecycle
import Synchronization

/// Fans instance state changes out to `GET /api/v1/events` watchers in this
/// process. Each watcher sees only what its filter lets through; a slow
/// watcher loses its oldest unsent events rather than holding the pool up.
public final class InstanceEvents: Sendable {
    /// What a watcher receives: an event, or a keep-alive tick.
    public enum Item: Sendable, Equatable {
        case event(InstanceEvent)
        case heartbeat
    }

    private struct Watcher {
        var filter: @Sendable (InstanceEvent) -> Bool
        var continuation: AsyncStream<Item>.Continuation
    }

    private let watchers = Mutex<[UUID: Watcher]>([:])

    public init() {}

    /// A stream of the events `filter` accepts, until the watcher stops
    /// reading or ``finishAll()`` is called.
    public func watch(filter: @escaping @Sendable (InstanceEvent) -> Bool) -> AsyncStream<Item> {
        let id = UUID()
        let (stream, continuation) = AsyncStream.makeStream(of: Item.self, bufferingPolicy: .bufferingNewest(1000))
        continuation.onTermination = { [weak self] _ in
            _ = self?.watchers.withLock { $0.removeValue(forKey: id) }
        }
        watchers.withLock { $0[id] = Watcher(filter: filter, continuation: continuation) }
        return stream
    }

    /// Sends `event` to every watcher whose filter accepts it.
    public func publish(_ event: InstanceEvent) {
        let targets = watchers.withLock { $0.values.filter { $0.filter(event) }.map(\.continuation) }
        for continuation in targets { continuation.yield(.event(event)) }
    }

    /// Sends a keep-alive tick to every watcher (so dead connections are noticed).
    public func heartbeat() {
        let targets = watchers.withLock { $0.values.map(\.continuation) }
        for continuation in targets { continuation.yield(.heartbeat) }
    }

    /// How many watchers are connected.
    public var count: Int { watchers.withLock { $0.count } }

    /// Ends every stream.
    public func finishAll() {
        let targets = watchers.withLock { $0.values.map(\.continuation) }
        for continuation in targets { continuation.finish() }
    }
}

/// Sends keep-alive ticks to watchers every `interval` until shutdown, then
/// ends their streams.
struct HeartbeatService: Service {
    let events: InstanceEvents
    let interval: Duration

    func run() async throws {
        await cancelWhenGracefulShutdown {
            while !Task.isCancelled {
                try? await Task.sleep(for: interval)
                events.heartbeat()
            }
        }
        events.finishAll()
    }
}
