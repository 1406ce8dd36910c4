import Foundation
import Logging
import ServiceLifecycle
import Synchronization

/// Keeps the templates' warm pools filled: every `intervalSeconds`, and
/// soon after a launch, it retires warm instances past their age, drops
/// failed ones and places replacements. A failed pass is logged.
final class WarmPoolService: Service, Sendable {
    let store: any PoolStore
    let configuration: PoolConfiguration
    let events: InstanceEvents
    let logger: Logger
    private let wakeups: AsyncStream<Void>
    private let waker: AsyncStream<Void>.Continuation
    /// A wake of this replica's own is pending: when it does not lead, the
    /// pass asks the leader instead.
    private let asked = Mutex(false)

    init(store: any PoolStore, configuration: PoolConfiguration, events: InstanceEvents, logger: Logger) {
        self.store = store
        self.configuration = configuration
        self.events = events
        self.logger = logger
        (wakeups, waker) = AsyncStream.makeStream(bufferingPolicy: .bufferingNewest(1))
    }

    /// Runs a pass soon instead of at the next interval (on the leading
    /// replica: this one, or the one it asks).
    func wake() {
        asked.withLock { $0 = true }
        waker.yield()
    }

    func run() async throws {
        let interval = Duration.seconds(configuration.warmPools.intervalSeconds)
        let wakeups = self.wakeups
        await cancelWhenGracefulShutdown {
            await withTaskGroup(of: Void.self) { group in
                // Ticks and wakeups both run a pass.
                group.addTask { [waker = self.waker] in
                    while !Task.isCancelled {
                        try? await Task.sleep(for: interval)
                        waker.yield()
                    }
                }
                group.addTask {
                    await self.pass()
                    for await _ in wakeups {
                        guard !Task.isCancelled else { break }
                        await self.pass()
                    }
                }
                // Other replicas' asks (on SQLite there are none: it returns at once).
                group.addTask { [waker = self.waker, store = self.store, logger = self.logger] in
                    do {
                        try await store.followWarmPoolAsks { waker.yield() }
                    } catch is CancellationError {
                    } catch {
                        logger.error("other replicas' warm-pool asks no longer arrive: \(error)")
                    }
                }
                // All run until shutdown cancels them.
                await group.waitForAll()
            }
        }
    }

    func pass() async {
        let woken = asked.withLock { asked in
            defer { asked = false }
            return asked
        }
        // Replicas: the leader alone keeps the warm pools; a wake here is passed to it.
        guard await store.leads() else {
            if woken { await store.askForWarmPoolPass() }
            return
        }
        do {
            let pass = try await store.maintainWarmPools(
                maxAgeSeconds: configuration.warmPools.maxAgeSeconds,
                applianceStaleAfter: configuration.housekeeping.applianceStaleSeconds, at: Date())
            for instance in pass.started { events.publish(instance.event) }
            if !pass.started.isEmpty || !pass.retired.isEmpty || !pass.dropped.isEmpty {
                logger.info(
                    "warm pools",
                    metadata: [
                        "started": "\(pass.started.map(\.name))", "retired": "\(pass.retired)", "dropped": "\(pass.dropped)",
                    ])
            }
            for shortfall in pass.shortfalls { logger.warning("warm pool not filled: \(shortfall)") }
        } catch {
            logger.error("warm pool pass failed: \(error)")
        }
    }
}
