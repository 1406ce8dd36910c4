import Foundation
import Logging
import ServiceLifecycle

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

    init(store: any PoolStore, configuration: PoolConfiguration, events: InstanceEvents, logger: Logger) {
        self.store = store
        self.configuration = configuration
        self.events = events
        self.logger = logger
        (wakeups, waker) = AsyncStream.makeStream(bufferingPolicy: .bufferingNewest(1))
    }

    /// Runs a pass soon instead of at the next interval.
    func wake() { waker.yield() }

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
                await group.next()
                group.cancelAll()
            }
        }
    }

    func pass() async {
        // Replicas: the leader alone keeps the warm pools.
        guard await store.leads() else { return }
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
