import Foundation
import Logging
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
        /// The digest of the token that opened it (for the per-token cap).
        var key: String
        /// Who opened it: `user:NAME` or `appliance:NAME`.
        var principal: String
        var filter: @Sendable (InstanceEvent) -> Bool
        var continuation: AsyncStream<Item>.Continuation
    }

    private let watchers = Mutex<[UUID: Watcher]>([:])
    /// Where this process's events also go (to the other replicas).
    private let relay = Mutex<(@Sendable (InstanceEvent) -> Void)?>(nil)

    public init() {}

    /// Sends every event published from now on to `relay` as well.
    public func relay(to relay: @escaping @Sendable (InstanceEvent) -> Void) {
        self.relay.withLock { $0 = relay }
    }

    /// A stream of the events `filter` accepts, until the watcher stops
    /// reading or ``finish(key:)`` or ``finishAll()`` is called; nil when
    /// `key` already holds `limit` streams.
    public func watch(
        key: String = "", principal: String = "", limit: Int = .max, filter: @escaping @Sendable (InstanceEvent) -> Bool
    ) -> AsyncStream<Item>? {
        let id = UUID()
        let (stream, continuation) = AsyncStream.makeStream(of: Item.self, bufferingPolicy: .bufferingNewest(1000))
        let added = watchers.withLock { watchers in
            guard watchers.values.count(where: { $0.key == key }) < limit else { return false }
            watchers[id] = Watcher(key: key, principal: principal, filter: filter, continuation: continuation)
            return true
        }
        guard added else { return nil }
        continuation.onTermination = { [weak self] _ in
            _ = self?.watchers.withLock { $0.removeValue(forKey: id) }
        }
        return stream
    }

    /// Ends the streams `principal` opened (its token was disabled or replaced).
    public func finish(principal: String) {
        let targets = watchers.withLock { $0.values.filter { $0.principal == principal }.map(\.continuation) }
        for continuation in targets { continuation.finish() }
    }

    /// Sends `event` to every watcher whose filter accepts it, and to the relay.
    public func publish(_ event: InstanceEvent) {
        deliver(event)
        relay.withLock { $0 }?(event)
    }

    /// Sends `event` to this process's watchers only (an event another replica published).
    public func deliver(_ event: InstanceEvent) {
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

/// Carries events between replicas: this process's to the store (which
/// tells the others), and theirs to this process's watchers, in order.
struct EventRelayService: Service {
    let store: any PoolStore
    let events: InstanceEvents
    let logger: Logger

    func run() async throws {
        let (outgoing, continuation) = AsyncStream.makeStream(of: InstanceEvent.self, bufferingPolicy: .bufferingNewest(10_000))
        events.relay { continuation.yield($0) }
        defer { continuation.finish() }
        await cancelWhenGracefulShutdown {
            await withTaskGroup(of: Void.self) { group in
                group.addTask {
                    for await event in outgoing { await store.announce(event) }
                }
                group.addTask {
                    do {
                        try await store.followAnnouncements { events.deliver($0) }
                    } catch is CancellationError {
                    } catch {
                        logger.error("events from the other replicas no longer arrive: \(error)")
                    }
                }
                // Both run until shutdown cancels them (on SQLite there is
                // nothing to follow, and announcing does nothing).
                await group.waitForAll()
            }
        }
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
