import Foundation
import Logging
import ServiceLifecycle

/// Runs the store's housekeeping every `intervalSeconds` until shutdown:
/// lapses unclaimed reservations, withdraws offers not reported for
/// `offerStaleSeconds`, purges dead records after `purgeAfterSeconds`, and
/// tells event watchers about withdrawn offers. A failed pass is logged and
/// the next one runs on time.
struct HousekeepingService: Service {
    let store: any PoolStore
    let settings: PoolConfiguration.Housekeeping
    let events: InstanceEvents
    let logger: Logger

    func run() async throws {
        await cancelWhenGracefulShutdown {
            while !Task.isCancelled {
                // Replicas: the leader alone keeps house.
                if await store.leads() { await pass() }
                try? await Task.sleep(for: .seconds(settings.intervalSeconds))
            }
        }
    }

    func pass() async {
        do {
            let result = try await store.housekeep(
                at: Date(), offerStaleAfter: settings.offerStaleSeconds, purgeAfter: settings.purgeAfterSeconds)
            for event in result.withdrawn { events.publish(event) }
            if result != HousekeepingResult() {
                logger.info(
                    "housekeeping",
                    metadata: ["withdrawn": "\(result.withdrawn.count)", "lapsed": "\(result.lapsed)", "purged": "\(result.purged)"])
            }
        } catch {
            logger.error("housekeeping failed: \(error)")
        }
    }
}
